"""Helpers for the trainer tests that must run in separate processes.

``python -m torch.distributed.run --nproc_per_node 2 tests/_trainer_helpers.py loss-ddp OUT.json``
computes the two-tier loss of one global batch split unevenly over two gloo processes and
writes the process-mean loss and the DDP-averaged gradient of a shared linear map.
"""

from __future__ import annotations

import json
import sys

import torch


def ddp_loss_case() -> dict[str, torch.Tensor]:
    """A fixed global batch of 8 samples (float64) with masks and a shared projection."""
    g = torch.Generator().manual_seed(1234)
    batch, n_pos, n_neg, dim = 8, 2, 3, 12
    anchor = torch.randn(batch, dim, generator=g, dtype=torch.float64)
    positives = anchor.unsqueeze(1) + 0.7 * torch.randn(batch, n_pos, dim, generator=g, dtype=torch.float64)
    negatives = anchor.unsqueeze(1) + 0.9 * torch.randn(batch, n_neg, dim, generator=g, dtype=torch.float64)
    pos_mask = torch.rand(batch, n_pos, generator=g) > 0.3
    pos_mask[:, 0] = True
    pos_mask[6, 1] = False  # single positive
    neg_mask = torch.rand(batch, n_neg, generator=g) > 0.4
    neg_mask[4] = False  # no distractor
    projection = torch.eye(dim, dtype=torch.float64) + 0.1 * torch.randn(dim, dim, generator=g, dtype=torch.float64)
    return dict(
        anchor=anchor, positives=positives, negatives=negatives,
        pos_mask=pos_mask, neg_mask=neg_mask, projection=projection,
    )


def _loss_ddp(out_path: str) -> None:
    import torch.distributed as dist

    from trainer.losses import TorchDistributedGather, two_tier_infonce

    dist.init_process_group("gloo")
    rank, world = dist.get_rank(), dist.get_world_size()
    case = ddp_loss_case()
    rows = slice(0, 3) if rank == 0 else slice(3, 8)  # uneven local batches
    projection = case["projection"].clone().requires_grad_()
    loss = two_tier_infonce(
        case["anchor"][rows] @ projection,
        case["positives"][rows] @ projection,
        case["negatives"][rows] @ projection,
        case["pos_mask"][rows],
        case["neg_mask"][rows],
        gather=TorchDistributedGather(),
    )
    loss.backward()
    grad = projection.grad.clone()
    dist.all_reduce(grad)
    grad /= world  # what DDP does with parameter gradients
    mean_loss = loss.detach().clone()
    dist.all_reduce(mean_loss)
    mean_loss /= world
    if rank == 0:
        with open(out_path, "w") as f:
            json.dump({"mean_loss": mean_loss.item(), "grad": grad.tolist()}, f)
    dist.barrier()
    dist.destroy_process_group()


if __name__ == "__main__":
    torch.set_num_threads(1)
    command = sys.argv[1]
    if command == "loss-ddp":
        _loss_ddp(sys.argv[2])
    else:
        raise SystemExit(f"unknown helper command {command!r}")
