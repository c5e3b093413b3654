"""The two-tier NearID objective (PROTOCOL section 6) and its monitoring figures.

Per sample ``b``: an anchor embedding ``a_b``, ``P`` positive slots (the identity's other
views) and ``K`` hard-negative slots (its near-identity distractors), each slot with a
validity mask. ``G`` is every valid positive of the whole batch, all-gathered across
processes with gradients kept. Masked slots take part nowhere.

* Tier 1: for every valid ``(b, p)``, cross-entropy with target ``p_{b,p}`` over the logits
  ``[a_b . g / T for g in G] ++ [a_b . h_{b,k} / T for valid k]``. Tier1 is the mean over
  slots ``p`` (valid somewhere in the batch) of the mean over the samples where ``p`` is valid.
* Tier 2: for every valid ``(b, k)``, with ``s = a_b . h_{b,k} / T`` and ``L_b`` the
  logsumexp of ``a_b . g / T`` over the ``g`` in ``G`` that are not ``b``'s own positives:
  ``-s + logaddexp(s, L_b)`` (the distractor must rank above random batch negatives).
  Tier2 is the mean over all valid ``(b, k)``; 0 when there is none.
* Loss = Tier1 + alpha * Tier2.

Multi-process: with ``gather=TorchDistributedGather()`` every process passes its own rows;
the value returned on each process is ``world_size`` times that process's share of the
global loss, so that averaging gradients over processes (what DDP and
``accelerator.backward`` do) gives exactly the gradient of the global-batch loss, and the
mean of the returned values over processes is the global loss.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Protocol

import torch
import torch.nn.functional as F

from comfy_nearid.errors import InvalidInputError

__all__ = [
    "ProcessGather",
    "LocalGather",
    "TorchDistributedGather",
    "TwoTierStats",
    "TwoTierTerms",
    "two_tier_infonce",
    "two_tier_terms",
]


class ProcessGather(Protocol):
    """Collective operations the loss needs; one implementation per process layout."""

    world_size: int
    rank: int

    def all_gather_with_grad(self, tensor: torch.Tensor) -> torch.Tensor:
        """Concatenate every process's ``tensor`` (same shape everywhere) along dim 0, rank-major,
        keeping gradients (the backward sums each process's gradient into its own slice)."""

    def all_gather(self, tensor: torch.Tensor) -> torch.Tensor:
        """Like :meth:`all_gather_with_grad` but without gradients (masks, sizes)."""

    def all_reduce_sum(self, tensor: torch.Tensor) -> torch.Tensor:
        """Element-wise sum of ``tensor`` over processes (returns a new tensor)."""


class LocalGather:
    """One process: every collective is the identity."""

    world_size = 1
    rank = 0

    def all_gather_with_grad(self, tensor: torch.Tensor) -> torch.Tensor:
        return tensor

    def all_gather(self, tensor: torch.Tensor) -> torch.Tensor:
        return tensor

    def all_reduce_sum(self, tensor: torch.Tensor) -> torch.Tensor:
        return tensor.clone()


class _AllGatherWithGrad(torch.autograd.Function):
    """All-gather whose backward sums the gradient of the gathered tensor over processes and
    hands each process the slice that belongs to its own input."""

    @staticmethod
    def forward(ctx, tensor: torch.Tensor, group) -> torch.Tensor:  # type: ignore[override]
        import torch.distributed as dist

        world_size = dist.get_world_size(group=group)
        ctx.group = group
        ctx.rank = dist.get_rank(group=group)
        ctx.rows = tensor.shape[0]
        parts = [torch.empty_like(tensor) for _ in range(world_size)]
        dist.all_gather(parts, tensor.contiguous(), group=group)
        return torch.cat(parts, dim=0)

    @staticmethod
    def backward(ctx, grad_output: torch.Tensor):  # type: ignore[override]
        import torch.distributed as dist

        # Every process's loss depends on every process's rows: the gradient of row r is the
        # sum over processes of d(loss_q)/d(row r). all_reduce works on every backend (gloo too).
        grad = grad_output.contiguous().clone()
        dist.all_reduce(grad, op=dist.ReduceOp.SUM, group=ctx.group)
        start = ctx.rank * ctx.rows
        return grad[start : start + ctx.rows], None


class TorchDistributedGather:
    """Collectives over an initialised ``torch.distributed`` process group (gloo, NCCL, ...)."""

    def __init__(self, group=None) -> None:
        import torch.distributed as dist

        if not (dist.is_available() and dist.is_initialized()):
            raise InvalidInputError(
                "TorchDistributedGather needs an initialised torch.distributed process group "
                "(run under `accelerate launch` or torchrun); use LocalGather for one process"
            )
        self.group = group
        self.world_size = dist.get_world_size(group=group)
        self.rank = dist.get_rank(group=group)

    def all_gather_with_grad(self, tensor: torch.Tensor) -> torch.Tensor:
        return _AllGatherWithGrad.apply(tensor, self.group)

    def all_gather(self, tensor: torch.Tensor) -> torch.Tensor:
        import torch.distributed as dist

        parts = [torch.empty_like(tensor) for _ in range(self.world_size)]
        dist.all_gather(parts, tensor.detach().contiguous(), group=self.group)
        return torch.cat(parts, dim=0)

    def all_reduce_sum(self, tensor: torch.Tensor) -> torch.Tensor:
        import torch.distributed as dist

        out = tensor.detach().clone()
        dist.all_reduce(out, op=dist.ReduceOp.SUM, group=self.group)
        return out


@dataclass
class TwoTierStats:
    """Monitoring counts of one batch on one process (sum them over processes before dividing).

    ``tier1_correct / tier1_trials``: fraction of valid (sample, positive slot) pairs whose
    target is the arg-max of the Tier-1 logits. ``distractor_wins / distractor_trials``:
    fraction of valid distractors whose logit is above the best batch negative of their
    sample (rows without any batch negative are not trials). Cosine sums are over the
    valid positive and distractor slots.
    """

    tier1_correct: float
    tier1_trials: float
    distractor_wins: float
    distractor_trials: float
    positive_cosine_sum: float
    distractor_cosine_sum: float
    distractor_slots: float

    def as_tensor(self, device: torch.device | str = "cpu") -> torch.Tensor:
        """The seven counts as a float64 vector (for one all-reduce)."""
        return torch.tensor(
            [
                self.tier1_correct,
                self.tier1_trials,
                self.distractor_wins,
                self.distractor_trials,
                self.positive_cosine_sum,
                self.distractor_cosine_sum,
                self.distractor_slots,
            ],
            dtype=torch.float64,
            device=device,
        )

    @classmethod
    def from_tensor(cls, values: torch.Tensor) -> "TwoTierStats":
        v = [float(x) for x in values.tolist()]
        return cls(*v)

    def __add__(self, other: "TwoTierStats") -> "TwoTierStats":
        return TwoTierStats.from_tensor(self.as_tensor() + other.as_tensor())

    def figures(self) -> dict[str, float]:
        """Ratios for logging: top-1 accuracy, distractor-above-best-negative fraction and the
        mean cosines (NaN where there was no trial)."""

        def ratio(num: float, den: float) -> float:
            return num / den if den > 0 else math.nan

        return {
            "tier1_top1_acc": ratio(self.tier1_correct, self.tier1_trials),
            "distractor_above_best_negative": ratio(self.distractor_wins, self.distractor_trials),
            "positive_cosine": ratio(self.positive_cosine_sum, self.tier1_trials),
            "distractor_cosine": ratio(self.distractor_cosine_sum, self.distractor_slots),
        }


@dataclass
class TwoTierTerms:
    """The loss and its parts on one process.

    ``loss``, ``tier1`` and ``tier2`` are scaled so that their mean over processes is the
    global value (on one process: the plain values). Only ``loss`` carries gradients.
    """

    loss: torch.Tensor
    tier1: torch.Tensor
    tier2: torch.Tensor
    stats: TwoTierStats


def _check_inputs(
    anchor: torch.Tensor,
    positives: torch.Tensor,
    negatives: torch.Tensor,
    pos_mask: torch.Tensor,
    neg_mask: torch.Tensor,
    temperature: float,
) -> None:
    if anchor.ndim != 2:
        raise InvalidInputError(f"anchor must be [B, D], got shape {tuple(anchor.shape)}")
    batch, dim = anchor.shape
    if positives.ndim != 3 or positives.shape[0] != batch or positives.shape[2] != dim:
        raise InvalidInputError(
            f"positives must be [B={batch}, P, D={dim}], got shape {tuple(positives.shape)}"
        )
    if negatives.ndim != 3 or negatives.shape[0] != batch or negatives.shape[2] != dim:
        raise InvalidInputError(
            f"negatives must be [B={batch}, K, D={dim}], got shape {tuple(negatives.shape)}"
        )
    for name, mask, slots in (("pos_mask", pos_mask, positives.shape[1]), ("neg_mask", neg_mask, negatives.shape[1])):
        if mask.dtype != torch.bool:
            raise InvalidInputError(f"{name} must be a bool tensor, got dtype {mask.dtype}")
        if tuple(mask.shape) != (batch, slots):
            raise InvalidInputError(f"{name} must have shape {(batch, slots)}, got {tuple(mask.shape)}")
    if not (temperature > 0 and math.isfinite(temperature)):
        raise InvalidInputError(f"temperature must be a finite number > 0, got {temperature}")


def _padded_rows(tensor: torch.Tensor, rows: int) -> torch.Tensor:
    """Pad dim 0 with zeros to ``rows`` (processes may hold batches of different sizes)."""
    if tensor.shape[0] == rows:
        return tensor
    pad = tensor.new_zeros((rows - tensor.shape[0], *tensor.shape[1:]))
    return torch.cat([tensor, pad], dim=0)


def two_tier_terms(
    anchor: torch.Tensor,
    positives: torch.Tensor,
    negatives: torch.Tensor,
    pos_mask: torch.Tensor,
    neg_mask: torch.Tensor,
    temperature: float = 0.07,
    alpha: float = 0.5,
    gather: ProcessGather | None = None,
) -> TwoTierTerms:
    """The two-tier loss with its parts and monitoring counts (see :func:`two_tier_infonce`)."""
    _check_inputs(anchor, positives, negatives, pos_mask, neg_mask, temperature)
    gather = gather if gather is not None else LocalGather()
    world, rank = gather.world_size, gather.rank
    batch, n_pos = pos_mask.shape
    device = anchor.device

    # At least float32 whatever the autocast dtype of the head (float64 stays float64).
    dtype = torch.promote_types(anchor.dtype, torch.float32)
    a = F.normalize(anchor.to(dtype), dim=-1)
    pos = F.normalize(positives.to(dtype), dim=-1)
    neg = F.normalize(negatives.to(dtype), dim=-1)

    # All-gather the positives (processes may have different batch sizes: pad to the largest).
    sizes = gather.all_gather(torch.tensor([batch], device=device, dtype=torch.long))
    rows = int(sizes.max())
    all_pos = gather.all_gather_with_grad(_padded_rows(pos, rows))  # [W*rows, P, D]
    # Masks travel as uint8: not every backend (gloo) gathers bool tensors.
    all_mask = gather.all_gather(_padded_rows(pos_mask.to(torch.uint8), rows)).bool()  # [W*rows, P]
    flat_valid = all_mask.reshape(-1)
    flat_owner = torch.arange(world * rows, device=device).repeat_interleave(n_pos)
    g = all_pos.reshape(-1, all_pos.shape[-1])[flat_valid]  # G: [M, D]
    g_owner = flat_owner[flat_valid]  # global row of each g: [M]
    g_index = torch.cumsum(flat_valid.long(), 0) - 1  # flat slot -> index in G

    if g.shape[0] == 0:
        # No valid positive anywhere in the global batch: nothing to learn from (every process
        # sees the same global count, so all of them return here).
        zero = 0.0 * a.sum() + 0.0 * pos.sum() + 0.0 * neg.sum()
        empty = TwoTierStats(0.0, 0.0, 0.0, 0.0, 0.0, 0.0, float(neg_mask.sum()))
        return TwoTierTerms(loss=zero, tier1=zero.detach(), tier2=zero.detach(), stats=empty)

    own_rows = rank * rows + torch.arange(batch, device=device)  # [B]
    own = g_owner.unsqueeze(0) == own_rows.unsqueeze(1)  # [B, M]: b's own positives

    logits_batch = a @ g.T / temperature  # [B, M]
    logits_hard = torch.einsum("bd,bkd->bk", a, neg) / temperature  # [B, K]
    neg_inf = torch.tensor(-math.inf, device=device)

    # Tier 1: one log-partition per row over G plus that row's valid distractors (finite: M > 0).
    tier1_logits = torch.cat([logits_batch, torch.where(neg_mask, logits_hard, neg_inf)], dim=1)
    log_partition = torch.logsumexp(tier1_logits, dim=1)  # [B]
    local_flat = own_rows.unsqueeze(1) * n_pos + torch.arange(n_pos, device=device)  # [B, P]
    target = g_index[local_flat].clamp_min(0)  # [B, P], index into G (only read where pos_mask)
    target_logit = torch.gather(logits_batch, 1, target)
    slot_counts = gather.all_reduce_sum(pos_mask.sum(0).to(torch.float64))  # n_p, global batch
    live_slots = float((slot_counts > 0).sum())
    slot_weight = torch.where(
        slot_counts > 0, 1.0 / (live_slots * slot_counts.clamp_min(1.0)), torch.zeros_like(slot_counts)
    ).to(dtype)  # [P]
    ce = torch.where(pos_mask, log_partition.unsqueeze(1) - target_logit, torch.zeros_like(target_logit))
    tier1_share = (ce * slot_weight.unsqueeze(0)).sum()

    # Tier 2: each valid distractor against the batch negatives (G minus the row's own positives).
    batch_neg = torch.where(own, neg_inf, logits_batch)
    has_batch_neg = (~own).any(dim=1)  # [B]
    # Rows without any batch negative get a finite stand-in so no NaN reaches the gradient.
    safe_batch_neg = torch.where(has_batch_neg.unsqueeze(1), batch_neg, torch.zeros_like(batch_neg))
    lse_batch_neg = torch.logsumexp(safe_batch_neg, dim=1)  # [B]
    # -s + logaddexp(s, -inf) == 0: a row with no batch negative adds nothing but still counts.
    tier2_each = torch.where(
        neg_mask & has_batch_neg.unsqueeze(1),
        -logits_hard + torch.logaddexp(logits_hard, lse_batch_neg.unsqueeze(1)),
        torch.zeros_like(logits_hard),
    )
    distractor_count = float(gather.all_reduce_sum(neg_mask.sum().to(torch.float64)))
    tier2_share = tier2_each.sum() / distractor_count if distractor_count > 0 else tier2_each.sum() * 0.0

    # Scaled by the world size: the DDP gradient mean then equals the global-batch gradient.
    loss = world * (tier1_share + alpha * tier2_share)

    with torch.no_grad():
        stats = _monitoring_counts(
            tier1_logits, target, pos_mask, logits_hard, neg_mask, batch_neg, has_batch_neg, temperature
        )
    return TwoTierTerms(
        loss=loss,
        tier1=(world * tier1_share).detach(),
        tier2=(world * tier2_share).detach(),
        stats=stats,
    )


def _monitoring_counts(
    tier1_logits: torch.Tensor,
    target: torch.Tensor,
    pos_mask: torch.Tensor,
    logits_hard: torch.Tensor,
    neg_mask: torch.Tensor,
    batch_neg: torch.Tensor,
    has_batch_neg: torch.Tensor,
    temperature: float,
) -> TwoTierStats:
    winner = tier1_logits.argmax(dim=1, keepdim=True)  # [B, 1]
    correct = (winner == target) & pos_mask
    target_logit = torch.gather(tier1_logits, 1, target)
    best_batch_neg = batch_neg.max(dim=1, keepdim=True).values  # -inf where the row has none
    trials = neg_mask & has_batch_neg.unsqueeze(1)
    wins = (logits_hard > best_batch_neg) & trials
    return TwoTierStats(
        tier1_correct=float(correct.sum()),
        tier1_trials=float(pos_mask.sum()),
        distractor_wins=float(wins.sum()),
        distractor_trials=float(trials.sum()),
        positive_cosine_sum=float((target_logit * temperature)[pos_mask].sum()),
        distractor_cosine_sum=float((logits_hard * temperature)[neg_mask].sum()),
        distractor_slots=float(neg_mask.sum()),
    )


def two_tier_infonce(
    anchor: torch.Tensor,
    positives: torch.Tensor,
    negatives: torch.Tensor,
    pos_mask: torch.Tensor,
    neg_mask: torch.Tensor,
    temperature: float = 0.07,
    alpha: float = 0.5,
    gather: ProcessGather | None = None,
) -> torch.Tensor:
    """Two-tier NearID loss (PROTOCOL section 6): ``Tier1 + alpha * Tier2``.

    Args:
        anchor: ``[B, D]`` anchor embeddings (L2-normalised here; any float dtype).
        positives: ``[B, P, D]`` embeddings of the sample's other views.
        negatives: ``[B, K, D]`` embeddings of the sample's near-identity distractors.
        pos_mask: ``[B, P]`` bool, True where a positive slot holds a real view.
        neg_mask: ``[B, K]`` bool, True where a distractor slot holds a real distractor.
        temperature: softmax temperature ``T > 0`` (logits are cosine / T).
        alpha: weight of Tier 2.
        gather: the process layout; ``None`` = this process's batch only.
            With :class:`TorchDistributedGather` the returned value is ``world_size`` times this
            process's share of the global loss (see the module docstring).

    Returns:
        A scalar tensor (float32, or float64 for float64 inputs); ``>= 0``.
    """
    return two_tier_terms(anchor, positives, negatives, pos_mask, neg_mask, temperature, alpha, gather).loss
