"""CRD (Tian et al., ICLR 2020, "Contrastive Representation Distillation"), OFAKD's baseline."""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Literal

import torch
import torch.distributed as dist
import torch.nn as nn
import torch.nn.functional as F
from torch import Tensor

from fastkd.losses import nce_loss
from fastkd.models import forward_taps
from fastkd.projectors import pooled_dim

from . import register
from .base import Distiller, Needs

@dataclass(frozen=True)
class CRDParams:
    feat_dim: int = 128              # embedding width (`--crd-feat-dim`)
    num_negatives: int = 16384       # K (`--crd-k`)
    temperature: float = 0.07        # `--crd-temperature`
    momentum: float = 0.5            # memory update momentum (`--crd-momentum`)
    kd_weight: float = 1.0           # `--kd-loss-weight`
    num_samples: int | None = None   # N, training-set size: the memory bank has one row per sample
    # "other_class": the K negatives of a sample are drawn among the samples of the other
    # classes, as OFAKD trains (its dataset's `contrast_index`); "uniform": among all N rows
    # (the CRD memory's own alias sampler, unused by OFAKD's training script)
    negatives: Literal["other_class", "uniform"] = "other_class"


def _gather_ranks(x: Tensor) -> Tensor:
    """`x` from every DDP rank, concatenated (equal batch sizes per rank, as the sampler gives)."""
    if not (dist.is_available() and dist.is_initialized()) or dist.get_world_size() == 1:
        return x
    parts = [torch.empty_like(x) for _ in range(dist.get_world_size())]
    dist.all_gather(parts, x.contiguous())
    return torch.cat(parts)


class OtherClassNegatives(nn.Module):
    """Draws K negative rows per sample uniformly, with replacement, among the samples whose
    class differs from the sample's own (OFAKD `ImageNetInstanceSample.__getitem__`:
    `np.random.choice(cls_negative[target], k, replace=True)`), from the training labels by
    dataset index: soft (mixup) batch labels play no part.

    The samples sorted by class (stable) put each class in one contiguous run; drawing an
    offset r in [0, N − n_y) and skipping the run of class y (r += n_y once r reaches its
    start) is a uniform draw over the other classes, without a per-class index list.
    """

    def __init__(self, labels: Tensor):
        super().__init__()
        labels = torch.as_tensor(labels, dtype=torch.long).flatten()
        counts = torch.bincount(labels)
        if len(labels) == 0 or counts.max() == len(labels):
            raise ValueError("crd: negatives 'other_class' needs samples of at least two "
                             "classes in the training split (use negatives: uniform)")
        # constants rebuilt from the dataset index on every start: kept out of checkpoints
        self.register_buffer("labels", labels, persistent=False)
        self.register_buffer("by_class", torch.argsort(labels, stable=True), persistent=False)
        self.register_buffer("class_start", torch.cumsum(counts, 0) - counts, persistent=False)
        self.register_buffer("class_count", counts, persistent=False)

    def forward(self, indices: Tensor, k: int) -> Tensor:
        """B×k dataset rows; padded samples (index −1) draw for row 0's class (masked later)."""
        own = self.labels[indices.clamp_min(0)]
        count, start = self.class_count[own][:, None], self.class_start[own][:, None]
        # a 62-bit draw reduced mod (N − n_y): bias below N / 2^62, and no float rounding
        raw = torch.randint(0, 2 ** 62, (len(indices), k), device=indices.device)
        offset = raw % (len(self.labels) - count)
        return self.by_class[torch.where(offset >= start, offset + count, offset)]


class ContrastMemory(nn.Module):
    """Two N×D banks of unit embeddings (student side, teacher side), one row per training
    sample, initialised uniform in ±1/√(D/3) (OFAKD `ContrastMemory`).

    Scores are `exp(⟨m, v⟩ / τ) / Z` of an embedding v against K + 1 rows of the *other* side's
    bank: its own sample's row first, then K negative rows, drawn by `OtherClassNegatives` when
    the training labels are given (OFAKD's training), else uniformly over all N rows (OFAKD's
    alias sampler over uniform weights is uniform; it may draw the positive's own row).
    Z per side is fixed at the first batch: `mean(exp(·)) · N`. Rows of the batch's samples
    are then moved towards the new embeddings with momentum and re-normalised. Under DDP the
    update and Z use every rank's batch, so all ranks keep the same banks (OFAKD updates each
    rank's copy from its own batch only). Padded samples (index −1: the sampler's wrap-around
    without `drop_last`) read row 0 and update nothing.
    """

    def __init__(self, dim: int, num_samples: int, num_negatives: int, temperature: float,
                 momentum: float, sample_labels: Tensor | None = None):
        super().__init__()
        self.num_samples, self.num_negatives = num_samples, num_negatives
        self.other_class = None
        if sample_labels is not None:
            if len(sample_labels) != num_samples:
                raise ValueError(f"crd: {len(sample_labels)} training labels for a memory bank "
                                 f"of num_samples={num_samples} rows")
            self.other_class = OtherClassNegatives(sample_labels)
        self.temperature, self.momentum = temperature, momentum
        bound = 1.0 / math.sqrt(dim / 3)
        self.register_buffer("memory_s", torch.rand(num_samples, dim) * 2 * bound - bound)
        self.register_buffer("memory_t", torch.rand(num_samples, dim) * 2 * bound - bound)
        self.register_buffer("z_s", torch.tensor(-1.0))   # < 0: not set yet
        self.register_buffer("z_t", torch.tensor(-1.0))
        self._z_checked = False

    def _set_normalisers(self, scores_s: Tensor, scores_t: Tensor) -> None:
        """Z = mean score · N per side, once: at the first batch (checked with one host sync per
        process, so a resumed run keeps the Z of its checkpoint)."""
        if self._z_checked:
            return
        self._z_checked = True
        if self.z_s >= 0:
            return
        first = torch.stack([scores_s.detach().mean(), scores_t.detach().mean()])
        if dist.is_available() and dist.is_initialized():
            dist.all_reduce(first)
            first /= dist.get_world_size()
        self.z_s.copy_(first[0] * self.num_samples)
        self.z_t.copy_(first[1] * self.num_samples)

    def forward(self, embed_s: Tensor, embed_t: Tensor, indices: Tensor) -> tuple[Tensor, Tensor]:
        """(student scores vs teacher bank, teacher scores vs student bank), each B×(1+K)."""
        rows = torch.cat([indices.clamp_min(0)[:, None],   # padding (−1) reads row 0, masked
                          self._negatives(indices)], dim=1)
        # Bank rows are constants here: the update below happens under no_grad.
        bank_t = self.memory_t[rows].detach()   # B×(1+K)×D
        bank_s = self.memory_s[rows].detach()
        # fp32 even under autocast: exp(⟨m, v⟩ / 0.07) spans e^±14, beyond bf16's 3 digits
        with torch.autocast(device_type=embed_s.device.type, enabled=False):
            scores_s = torch.exp(torch.bmm(bank_t, embed_s.float()[:, :, None]).squeeze(2)
                                 / self.temperature)
            scores_t = torch.exp(torch.bmm(bank_s, embed_t.float()[:, :, None]).squeeze(2)
                                 / self.temperature)
        self._set_normalisers(scores_s, scores_t)
        scores_s, scores_t = scores_s / self.z_s, scores_t / self.z_t
        self._update(embed_s.detach(), embed_t.detach(), indices)
        return scores_s, scores_t

    def _negatives(self, indices: Tensor) -> Tensor:
        if self.other_class is not None:
            return self.other_class(indices, self.num_negatives)
        return torch.randint(0, self.num_samples, (len(indices), self.num_negatives),
                             device=indices.device)

    @torch.no_grad()
    def _update(self, embed_s: Tensor, embed_t: Tensor, indices: Tensor) -> None:
        embed_s, embed_t = _gather_ranks(embed_s), _gather_ranks(embed_t)
        indices = _gather_ranks(indices)
        # Padded samples (−1) must change nothing. Filtering them out would cost a host sync
        # (dynamic shape), and rewriting their row with its old value races with a real sample
        # of the same row in an index_copy_; adding a zero change is exact in any order.
        valid = (indices >= 0)[:, None]
        rows = indices.clamp_min(0)
        for bank, embed in ((self.memory_s, embed_s), (self.memory_t, embed_t)):
            old = bank[rows]
            moved = F.normalize(old * self.momentum + embed * (1 - self.momentum), dim=1)
            # a non-finite step is skipped by the engine, but this update has already run:
            # such rows keep their old value rather than poisoning the bank for good
            keep = valid & torch.isfinite(moved).all(dim=1, keepdim=True)
            bank.index_add_(0, rows, torch.where(keep, moved - old, 0.0))


@register
class CRD(Distiller):
    """`gt_weight·CE + kd_weight·(L_NCE(student side) + L_NCE(teacher side))`.

    Formula: Hao840/OFAKD `distillers/crd.py` (`CRD`, from the CRD authors' code): embeddings
    `v = unit(Linear(D → 128)(pooled))` per side, scores and banks by `ContrastMemory`, loss
    `fastkd.losses.nce_loss`. Reads the dataset
    index of every sample (`Needs(indices=True)`); the bank size N = `num_samples` must be
    given (the engine passes the training-set size), and with `negatives: other_class` (the
    default) the training labels by dataset index, `sample_labels` (the engine passes the
    training split's). Any pairing works (pooled features only).
    Defaults: OFAKD's CLI (K 16384, τ 0.07, momentum 0.5, width 128) and its training data
    (negatives from other classes only).
    Deviations: `negatives: uniform` (not the default) draws among all N rows, the positive's
    own row included: the sampler OFAKD's `ContrastMemory` uses without a `contrast_index`;
    `F.normalize` floors the norm at 1e-12; banks and Z stay identical across DDP ranks
    (`ContrastMemory`); scores are computed in fp32 under autocast (OFAKD's `--amp` runs them
    in fp16); padded samples (index −1, the last batch without `drop_last`) neither add to the
    loss nor move the banks.
    """
    name = "crd"
    paper = "Tian et al., Contrastive Representation Distillation, ICLR 2020 (arXiv 1910.10699)"
    needs = Needs(teacher=True, teacher_logits=False, student_pooled=True, teacher_pooled=True,
                  indices=True, cacheable=True)
    Params = CRDParams

    def __init__(self, student, teacher, params, *, sample_labels=None, **kwargs):
        super().__init__(student, teacher, params, **kwargs)
        if params.num_samples is None or params.num_samples < 1:
            raise ValueError("crd: distill.params.num_samples must be the number of training "
                             "samples (the memory bank holds one row per sample); the trainer "
                             f"sets it from the training split, got {params.num_samples}")
        if params.negatives == "other_class" and sample_labels is None:
            raise ValueError("crd: negatives 'other_class' needs the training labels by dataset "
                             "index (sample_labels; the trainer passes the training split's)")
        self.embed_s = nn.Linear(pooled_dim(student), params.feat_dim)
        self.embed_t = nn.Linear(pooled_dim(teacher.model), params.feat_dim)
        self.memory = ContrastMemory(params.feat_dim, params.num_samples, params.num_negatives,
                                     params.temperature, params.momentum,
                                     sample_labels if params.negatives == "other_class" else None)
        # The banks start equal on every rank (same seed) and stay equal (`ContrastMemory`
        # updates them from the gathered batch): the engine's DDP wrapper leaves such method
        # buffers alone (`fastkd.build.method_buffers`) instead of broadcasting 1.3 GB a step.

    def forward(self, images, labels, *, epoch=1.0, indices=None):
        if indices is None:
            raise ValueError("crd needs the dataset indices of the batch (Needs.indices)")
        p = self.params
        feats = forward_taps(self.student, images, (), with_logits=True)
        teacher_pooled = self.teacher.features(images, (), with_logits=False).pooled
        embed_s = F.normalize(self.embed_s(feats.pooled).float(), dim=1)
        embed_t = F.normalize(self.embed_t(teacher_pooled).float(), dim=1)
        indices = indices.long()
        scores_s, scores_t = self.memory(embed_s, embed_t, indices)
        valid = indices >= 0   # padding of the last batch (no drop_last): no positive row
        loss = nce_loss(scores_s, p.num_samples, valid) + nce_loss(scores_t, p.num_samples, valid)
        return feats.logits, {**self.gt_term(feats.logits, labels), "loss_kd": p.kd_weight * loss}
