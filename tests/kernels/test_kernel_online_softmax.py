"""The hand-written device helpers of `kernels/online_softmax.py`, checked elementwise through
small test kernels: expm1/log1p (no libdevice under the interpreter) and the top-k tail logit,
which must equal the one `fastkd.losses.topk_teacher_logits` builds."""
from __future__ import annotations

import pytest
import torch
import triton
import triton.language as tl

from fastkd import losses
from fastkd.kernels.online_softmax import expm1, load_topk_teacher, log1p, row_launch_config

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"


@triton.jit
def _expm1_log1p_kernel(x_ptr, expm1_ptr, log1p_ptr, n, BLOCK: tl.constexpr):
    i = tl.arange(0, BLOCK)
    x = tl.load(x_ptr + i, mask=i < n)
    tl.store(expm1_ptr + i, expm1(x), mask=i < n)
    tl.store(log1p_ptr + i, log1p(x), mask=i < n)


@triton.jit
def _tail_kernel(values_ptr, indices_ptr, lse_ptr, tail_ptr, num_topk, num_classes,
                 BLOCK_TOPK: tl.constexpr):
    row = tl.program_id(0).to(tl.int64)
    _, _, _, tail = load_topk_teacher(values_ptr + row * num_topk, 1,
                                      indices_ptr + row * num_topk, 1, tl.load(lse_ptr + row),
                                      num_topk, num_classes, BLOCK_TOPK)
    tl.store(tail_ptr + row, tail)


def test_expm1_and_log1p_are_accurate_near_zero_and_away_from_it():
    x = torch.tensor([0.0, 1e-30, 1e-8, -1e-7, 3e-4, -0.0999, 0.0999, 0.1, -0.1, 0.5, -0.69, 0.69,
                      1.0, -3.0, -20.0], device=DEVICE)
    out_expm1, out_log1p = torch.empty_like(x), torch.empty_like(x)
    _expm1_log1p_kernel[(1,)](x, out_expm1, out_log1p, x.numel(), BLOCK=16)
    x64 = x.double()
    torch.testing.assert_close(out_expm1.double(), torch.expm1(x64), rtol=1e-6, atol=0)
    keep = x > -1
    torch.testing.assert_close(out_log1p.double()[keep], torch.log1p(x64)[keep], rtol=1e-6,
                               atol=0)


@pytest.mark.parametrize("k", [1, 5, 37])
def test_tail_logit_matches_the_reference_reconstruction(k):
    teacher = torch.randn(4, 37, device=DEVICE) * 3
    teacher[3, :30] = -30.0  # a row whose top-k holds almost all the mass
    topk = losses.topk_from_logits(teacher, k)
    tail = torch.empty(4, device=DEVICE)
    _tail_kernel[(4,)](topk.values.contiguous(), topk.indices.contiguous(), topk.logsumexp, tail,
                       k, 37, BLOCK_TOPK=max(triton.next_power_of_2(k), 2))
    rebuilt = losses.topk_teacher_logits(topk, 37)
    if k == 37:
        assert torch.all(tail == float("-inf"))
        return
    is_tail = torch.ones_like(rebuilt, dtype=torch.bool).scatter(1, topk.indices, False)
    expected = rebuilt[is_tail].view(4, 37 - k)[:, 0]
    torch.testing.assert_close(tail, expected, rtol=1e-6, atol=1e-5)


def test_row_launch_config_covers_small_and_huge_rows():
    assert row_launch_config(10) == (16, 1)
    assert row_launch_config(1000) == (1024, 4)
    assert row_launch_config(21843) == (4096, 8)
