"""The two-tier loss against independent computations written from PROTOCOL section 6."""

from __future__ import annotations

import json
import math
import os
import sys
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

from _processes import torchrun
from comfy_nearid.errors import InvalidInputError
from trainer.losses import two_tier_infonce, two_tier_terms

torch.set_num_threads(1)
HELPERS = Path(__file__).with_name("_trainer_helpers.py")


def loop_two_tier(anchor, positives, negatives, pos_mask, neg_mask, temperature=0.07, alpha=0.5):
    """Explicit loops over samples and slots, straight from the protocol's formulas.

    Returns (loss, tier1, tier2, top1_correct, top1_trials, distractor_wins, distractor_trials).
    """
    batch, n_pos = pos_mask.shape
    n_neg = neg_mask.shape[1]

    def unit(v):
        return v / v.norm()

    def dot(u, v):
        return (u * v).sum()

    a = [unit(anchor[b]) for b in range(batch)]
    pos = {(b, p): unit(positives[b, p]) for b in range(batch) for p in range(n_pos) if pos_mask[b, p]}
    neg = {(b, k): unit(negatives[b, k]) for b in range(batch) for k in range(n_neg) if neg_mask[b, k]}
    bank = [(b, p, vec) for (b, p), vec in pos.items()]  # G: every valid positive

    correct = trials = 0
    slot_means = []
    for p in range(n_pos):
        per_sample = []
        for b in range(batch):
            if not pos_mask[b, p]:
                continue
            logits = [dot(a[b], g) / temperature for (_, _, g) in bank]
            logits += [dot(a[b], neg[(b, k)]) / temperature for k in range(n_neg) if neg_mask[b, k]]
            target_position = [(o, q) for (o, q, _) in bank].index((b, p))
            stacked = torch.stack(logits)
            per_sample.append(torch.logsumexp(stacked, 0) - stacked[target_position])
            trials += 1
            correct += int(int(stacked.argmax()) == target_position)
        if per_sample:
            slot_means.append(sum(per_sample) / len(per_sample))
    tier1 = sum(slot_means) / len(slot_means)

    wins = tier2_trials = 0
    tier2_terms = []
    for b in range(batch):
        for k in range(n_neg):
            if not neg_mask[b, k]:
                continue
            s = dot(a[b], neg[(b, k)]) / temperature
            others = [dot(a[b], g) / temperature for (o, _, g) in bank if o != b]
            if others:
                batch_lse = torch.logsumexp(torch.stack(others), 0)
                tier2_terms.append(-s + torch.logaddexp(s, batch_lse))
                tier2_trials += 1
                wins += int(bool(s > max(others)))
            else:  # -s + logaddexp(s, -inf) = 0
                tier2_terms.append(s * 0.0)
    tier2 = sum(tier2_terms) / len(tier2_terms) if tier2_terms else torch.zeros((), dtype=anchor.dtype)
    return tier1 + alpha * tier2, tier1, tier2, correct, trials, wins, tier2_trials


def reference_infonce_ext(anchor, positives, negatives, temperature=0.07, alpha=0.5):
    """The published `infonce_ext` formula with every slot valid (vectorised as the reference does)."""
    a = F.normalize(anchor, dim=-1)
    pos = F.normalize(positives, dim=-1)
    neg = F.normalize(negatives, dim=-1)
    batch, n_pos, dim = pos.shape
    flat = pos.reshape(-1, dim)
    sim_batch = a @ flat.T / temperature
    sim_hard = torch.einsum("bd,bkd->bk", a, neg) / temperature
    logits = torch.cat([sim_batch, sim_hard], 1)
    main = torch.stack(
        [F.cross_entropy(logits, torch.arange(batch) * n_pos + p) for p in range(n_pos)]
    ).mean()
    ids = torch.arange(flat.shape[0]).unsqueeze(0)
    start = (torch.arange(batch) * n_pos).unsqueeze(1)
    own = (ids >= start) & (ids < start + n_pos)
    lse = torch.logsumexp(sim_batch.masked_fill(own, float("-inf")), 1, keepdim=True)
    tier = (-sim_hard + torch.logaddexp(sim_hard, lse)).mean()
    return main + alpha * tier


def random_case(seed, batch=6, n_pos=2, n_neg=3, dim=16, dtype=torch.float64):
    g = torch.Generator().manual_seed(seed)
    anchor = torch.randn(batch, dim, generator=g, dtype=dtype)
    positives = torch.randn(batch, n_pos, dim, generator=g, dtype=dtype)
    negatives = torch.randn(batch, n_neg, dim, generator=g, dtype=dtype)
    # Make the problem non-trivial: positives near their anchor, distractors in between.
    positives = positives * 0.6 + anchor.unsqueeze(1)
    negatives = negatives * 0.9 + anchor.unsqueeze(1)
    return anchor, positives, negatives


def masks_with_edge_rows(batch, n_pos, n_neg, seed):
    g = torch.Generator().manual_seed(seed)
    pos_mask = torch.rand(batch, n_pos, generator=g) > 0.3
    neg_mask = torch.rand(batch, n_neg, generator=g) > 0.4
    pos_mask[0] = torch.tensor([True] + [False] * (n_pos - 1))  # a row with a single positive
    neg_mask[1] = False  # a row with no valid distractor
    pos_mask[2] = True
    neg_mask[2] = True
    return pos_mask, neg_mask


@pytest.mark.parametrize("seed", [0, 1, 2, 3])
def test_masked_loss_matches_loop_implementation(seed):
    anchor, positives, negatives = random_case(seed, batch=7, n_pos=3, n_neg=3)
    pos_mask, neg_mask = masks_with_edge_rows(7, 3, 3, seed)
    leaves = [t.clone().requires_grad_() for t in (anchor, positives, negatives)]
    terms = two_tier_terms(*leaves, pos_mask, neg_mask, temperature=0.07, alpha=0.5)
    terms.loss.backward()

    loop_leaves = [t.clone().requires_grad_() for t in (anchor, positives, negatives)]
    expected, tier1, tier2, correct, trials, wins, tier2_trials = loop_two_tier(
        *loop_leaves, pos_mask, neg_mask, temperature=0.07, alpha=0.5
    )
    expected.backward()

    assert terms.loss.item() == pytest.approx(expected.item(), rel=1e-10, abs=1e-10)
    assert terms.tier1.item() == pytest.approx(tier1.item(), rel=1e-10)
    assert terms.tier2.item() == pytest.approx(float(tier2.detach()), rel=1e-10, abs=1e-12)
    for ours, theirs in zip(leaves, loop_leaves):
        torch.testing.assert_close(ours.grad, theirs.grad, rtol=1e-9, atol=1e-11)
    assert terms.stats.tier1_correct == correct
    assert terms.stats.tier1_trials == trials
    assert terms.stats.distractor_wins == wins
    assert terms.stats.distractor_trials == tier2_trials


def test_float32_inputs_match_loop_in_float64():
    anchor, positives, negatives = random_case(5, batch=8)
    pos_mask, neg_mask = masks_with_edge_rows(8, 2, 3, 5)
    ours = two_tier_infonce(anchor.float(), positives.float(), negatives.float(), pos_mask, neg_mask)
    expected = loop_two_tier(anchor, positives, negatives, pos_mask, neg_mask)[0]
    assert ours.dtype == torch.float32
    assert ours.item() == pytest.approx(expected.item(), rel=1e-5)


@pytest.mark.parametrize("temperature,alpha", [(0.07, 0.5), (0.2, 1.0), (0.05, 0.0)])
def test_all_valid_equals_reference_infonce_ext(temperature, alpha):
    anchor, positives, negatives = random_case(11, batch=9, n_pos=2, n_neg=3)
    ones_p = torch.ones(9, 2, dtype=torch.bool)
    ones_k = torch.ones(9, 3, dtype=torch.bool)
    ours = two_tier_infonce(anchor, positives, negatives, ones_p, ones_k, temperature, alpha)
    reference = reference_infonce_ext(anchor, positives, negatives, temperature, alpha)
    assert ours.item() == pytest.approx(reference.item(), rel=1e-12)


def test_masked_slots_take_part_nowhere():
    anchor, positives, negatives = random_case(3, batch=6)
    pos_mask, neg_mask = masks_with_edge_rows(6, 2, 3, 3)
    base = two_tier_infonce(anchor, positives, negatives, pos_mask, neg_mask)
    scrambled_pos = torch.where(pos_mask.unsqueeze(-1), positives, torch.randn_like(positives) * 100)
    scrambled_neg = torch.where(neg_mask.unsqueeze(-1), negatives, torch.randn_like(negatives) * 100)
    again = two_tier_infonce(anchor, scrambled_pos, scrambled_neg, pos_mask, neg_mask)
    assert again.item() == base.item()


def test_hand_worked_two_samples():
    # Two samples, one positive each, orthogonal unit vectors, T = 1, alpha = 1:
    # a0 = e0, p0 = e0, a1 = e1, p1 = e1, one distractor h0 = e1 for sample 0, none for sample 1.
    e = torch.eye(3, dtype=torch.float64)
    anchor = torch.stack([e[0], e[1]])
    positives = torch.stack([e[0], e[1]]).unsqueeze(1)
    negatives = torch.stack([e[1], e[2]]).unsqueeze(1)
    pos_mask = torch.tensor([[True], [True]])
    neg_mask = torch.tensor([[True], [False]])
    # Tier 1, sample 0: logits [a0.p0, a0.p1, a0.h0] = [1, 0, 0] -> log(e + 2) - 1.
    # Sample 1: logits [a1.p0, a1.p1] = [0, 1] -> log(1 + e) - 1.   Tier1 = mean of the two.
    tier1 = (math.log(math.e + 2) - 1 + math.log(1 + math.e) - 1) / 2
    # Tier 2, sample 0: s = a0.h0 = 0, L = a0.p1 = 0 -> -0 + log(e^0 + e^0) = log 2.
    tier2 = math.log(2)
    loss = two_tier_infonce(anchor, positives, negatives, pos_mask, neg_mask, temperature=1.0, alpha=1.0)
    assert loss.item() == pytest.approx(tier1 + tier2, rel=1e-12)


def test_perfect_embeddings_give_high_monitoring_figures():
    e = torch.eye(8)
    anchor = e[:4]
    positives = e[:4].unsqueeze(1).repeat(1, 2, 1)
    # Distractors halfway between the identity and an unused direction: above batch negatives.
    negatives = F.normalize(e[:4] + e[4:8], dim=-1).unsqueeze(1)
    terms = two_tier_terms(
        anchor, positives, negatives, torch.ones(4, 2, dtype=torch.bool), torch.ones(4, 1, dtype=torch.bool)
    )
    figures = terms.stats.figures()
    # Each anchor ties with its own two identical positives; argmax picks the first of them.
    assert figures["tier1_top1_acc"] == 0.5
    assert figures["distractor_above_best_negative"] == 1.0
    assert figures["positive_cosine"] == pytest.approx(1.0)
    assert figures["distractor_cosine"] == pytest.approx(1 / math.sqrt(2))


def test_no_valid_positive_anywhere_gives_zero_loss_with_gradient():
    anchor, positives, negatives = random_case(1, batch=3)
    anchor = anchor.clone().requires_grad_()
    loss = two_tier_infonce(
        anchor, positives, negatives, torch.zeros(3, 2, dtype=torch.bool), torch.ones(3, 3, dtype=torch.bool)
    )
    loss.backward()
    assert loss.item() == 0.0
    assert torch.all(anchor.grad == 0)


@pytest.mark.parametrize(
    "change,message",
    [
        (lambda args: {**args, "anchor": args["anchor"][None]}, "anchor must be"),
        (lambda args: {**args, "positives": args["positives"][:, :, :5]}, "positives must be"),
        (lambda args: {**args, "negatives": args["negatives"][:2]}, "negatives must be"),
        (lambda args: {**args, "pos_mask": args["pos_mask"].float()}, "pos_mask must be a bool"),
        (lambda args: {**args, "neg_mask": args["neg_mask"][:, :1]}, "neg_mask must have shape"),
        (lambda args: {**args, "temperature": 0.0}, "temperature"),
    ],
)
def test_bad_inputs_are_refused(change, message):
    anchor, positives, negatives = random_case(0, batch=4)
    args = dict(
        anchor=anchor,
        positives=positives,
        negatives=negatives,
        pos_mask=torch.ones(4, 2, dtype=torch.bool),
        neg_mask=torch.ones(4, 3, dtype=torch.bool),
    )
    with pytest.raises(InvalidInputError, match=message):
        two_tier_infonce(**change(args))


@pytest.mark.slow
def test_two_processes_give_the_global_batch_loss_and_gradient(tmp_path):
    """Real gloo processes (torchrun): uneven local batches (3 + 5 rows), a shared linear map
    as the trainable part, DDP-style gradient averaging; compared with one process."""
    out = tmp_path / "ddp.json"
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    result = torchrun([str(HELPERS), "loss-ddp", str(out)], timeout=600, env=env)
    assert result.returncode == 0, result.stderr[-3000:]
    got = json.loads(out.read_text())

    # The same global batch in one process, computed here.
    sys.path.insert(0, str(HELPERS.parent))
    try:
        from _trainer_helpers import ddp_loss_case
    finally:
        sys.path.pop(0)
    case = ddp_loss_case()
    projection = case["projection"].clone().requires_grad_()
    loss = two_tier_infonce(
        case["anchor"] @ projection,
        case["positives"] @ projection,
        case["negatives"] @ projection,
        case["pos_mask"],
        case["neg_mask"],
    )
    loss.backward()
    expected_loop = loop_two_tier(
        case["anchor"] @ case["projection"],
        case["positives"] @ case["projection"],
        case["negatives"] @ case["projection"],
        case["pos_mask"],
        case["neg_mask"],
    )[0]
    assert got["mean_loss"] == pytest.approx(loss.item(), rel=1e-10)
    assert got["mean_loss"] == pytest.approx(expected_loop.item(), rel=1e-10)
    torch.testing.assert_close(torch.tensor(got["grad"], dtype=torch.float64), projection.grad, rtol=1e-9, atol=1e-12)
