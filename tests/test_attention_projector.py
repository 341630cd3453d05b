"""ScaleKD's cross-attention projector: shapes, the attention formula of deep-optimization/
ScaleKD's `AttentionProjector` (`mmcls/models/dis_losses/fmd.py`) against a plain re-statement, queries passed or learnt, and the token/grid layout."""
from __future__ import annotations

import pytest
import torch

from fastkd.attention_projector import (CrossAttentionProjector, default_num_heads, grid_to_tokens,
                                        tokens_to_grid)


def projector(**overrides) -> CrossAttentionProjector:
    args = dict(student_channels=12, student_hw=(6, 6), teacher_channels=16, query_hw=(3, 3),
                num_heads=4, softmax_scale=5.0)
    args.update(overrides)
    return CrossAttentionProjector(**args)


@pytest.mark.parametrize("student_hw,query_hw", [((6, 6), (3, 3)), ((4, 4), (4, 4)), ((2, 3), (5, 5))])
def test_output_is_query_grid_tokens_of_teacher_width(student_hw, query_hw):
    cap = projector(student_hw=student_hw, query_hw=query_hw)
    out = cap(torch.randn(2, 12, *student_hw))
    assert out.shape == (2, query_hw[0] * query_hw[1], 16)


def test_attention_matches_the_formula():
    """softmax(q kᵀ · (C_t/h)^{-1/2} · softmax_scale) v, then proj, LN, + MLP (ScaleKD
    `WindowMultiheadPosAttention` in `mmcls/models/dis_losses/attention.py`)."""
    torch.manual_seed(0)
    cap = projector().eval()
    x = torch.randn(2, 12, 6, 6)
    keys = (cap.student_conv(x) + cap.pos_embed).flatten(2).transpose(1, 2)          # B×36×12
    grid = cap.query_embed.weight.T.reshape(1, 16, 3, 3).expand(2, -1, -1, -1)
    queries = cap.query_conv(grid).flatten(2).transpose(1, 2)                          # B×9×16
    q, k, v = cap.q(queries), cap.k(keys), cap.v(keys)
    heads = []
    for h in range(4):
        sl = slice(4 * h, 4 * h + 4)
        logits = q[..., sl] @ k[..., sl].transpose(1, 2) * 4 ** -0.5 * 5.0
        heads.append(logits.softmax(-1) @ v[..., sl])
    attended = cap.proj(torch.cat(heads, dim=-1))
    normed = torch.nn.functional.layer_norm(attended, (16,), cap.norm.weight, cap.norm.bias)
    expected = normed + cap.mlp(normed)
    torch.testing.assert_close(cap(x), expected, rtol=1e-5, atol=1e-5)


def test_passed_queries_replace_the_learnt_ones_and_get_gradients():
    cap = projector(learnable_queries=False)
    assert cap.query_embed is None
    queries = torch.randn(2, 9, 16, requires_grad=True)
    cap(torch.randn(2, 12, 6, 6), queries=queries).sum().backward()
    assert queries.grad is not None and queries.grad.abs().sum() > 0
    with pytest.raises(ValueError, match="no learnable queries"):
        cap(torch.randn(2, 12, 6, 6))


def test_queries_differ_per_sample_when_passed():
    cap = projector(learnable_queries=False).eval()
    x = torch.randn(1, 12, 6, 6).expand(2, -1, -1, -1)
    out = cap(x, queries=torch.randn(2, 9, 16))
    assert not torch.allclose(out[0], out[1])


def test_wrong_student_grid_is_a_clear_error():
    with pytest.raises(ValueError, match="training input size"):
        projector()(torch.randn(2, 12, 5, 5))


def test_heads_must_divide_teacher_channels():
    with pytest.raises(ValueError, match="heads"):
        projector(num_heads=5)


@pytest.mark.parametrize("channels,head_dim,heads", [(768, 32, 24), (1024, 64, 16), (384, 64, 6),
                                                     (48, 64, 1), (96, 32, 3), (40, 16, 2)])
def test_default_num_heads(channels, head_dim, heads):
    assert default_num_heads(channels, head_dim) == heads


def test_token_grid_layout_is_the_official_view():
    tokens = torch.randn(2, 12, 5)  # B × (3·4) × C, raster order
    grid = tokens_to_grid(tokens, (3, 4))
    torch.testing.assert_close(grid, tokens.permute(0, 2, 1).contiguous().view(2, 5, 3, 4))
    assert grid[1, :, 2, 1].equal(tokens[1, 2 * 4 + 1])
    torch.testing.assert_close(grid_to_tokens(grid), tokens)
