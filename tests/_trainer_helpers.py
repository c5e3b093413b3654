"""Helpers for the trainer tests that must run in separate processes.

``python -m torch.distributed.run --nproc_per_node 2 tests/_trainer_helpers.py loss-ddp OUT.json``
computes the two-tier loss of one global batch split unevenly over two gloo processes and
writes the process-mean loss and the DDP-averaged gradient of a shared linear map.
"""

from __future__ import annotations

import json
import sys

import torch


def make_folder_dataset(
    root,
    n_samples: int = 12,
    n_views: int = 3,
    sources=("object", "part"),
    size: int = 32,
    seed: int = 0,
    masks: bool = True,
    views_per_sample=None,
    distractors: bool = True,
):
    """Write a small NearID folder dataset: each identity is a coloured square with a stripe,
    each view puts it at another place on another noise background, each distractor is a
    recoloured object on exactly its view's background. Returns ``root``.

    ``views_per_sample``: optional list giving each sample's number of views.
    """
    import json
    from pathlib import Path

    import numpy as np
    from PIL import Image

    root = Path(root)
    rng = np.random.default_rng(seed)
    for i in range(n_samples):
        d = root / f"id{i:04d}"
        d.mkdir(parents=True, exist_ok=True)
        (d / "sample.json").write_text(json.dumps({"category": ["box", "ball"][i % 2]}))
        colour = rng.integers(0, 256, size=3)
        stripe = rng.integers(0, 256, size=3)
        count = n_views if views_per_sample is None else views_per_sample[i]
        for k in range(count):
            background = rng.integers(0, 256, size=(size, size, 3)).astype(np.uint8)
            side = size // 2
            y, x = rng.integers(0, size - side, size=2)
            mask = np.zeros((size, size), dtype=np.uint8)
            mask[y : y + side, x : x + side] = 255

            def draw(body, band):
                img = background.copy()
                img[y : y + side, x : x + side] = body
                img[y + side // 2 : y + side // 2 + 2, x : x + side] = band
                return img

            Image.fromarray(draw(colour, stripe)).save(d / f"view{k + 1}.png")
            if masks:
                Image.fromarray(mask).save(d / f"mask{k + 1}.png")
            if not distractors:
                continue
            for s, source in enumerate(sources):
                sd = d / source
                sd.mkdir(exist_ok=True)
                other = (colour + 60 * (s + 1)) % 256 if source != "part" else colour
                band = (stripe + 90) % 256 if source == "part" else stripe
                Image.fromarray(draw(other, band).astype(np.uint8)).save(sd / f"distractor{k + 1}.png")
                if masks:
                    Image.fromarray(mask).save(sd / f"mask{k + 1}.png")
    return root


def tiny_config(tmp_path, data_root, **overrides):
    """A TrainConfig for fast CPU tests: tiny-siglip (random weights), no mixed precision."""
    from trainer.config import config_from_dict

    values = {
        "output_dir": str(tmp_path / "run"),
        "seed": 0,
        "model": {"backbone": "tiny-siglip", "pretrained": False, "init_head": "own"},
        "data": {"format": "folder", "train": str(data_root), "num_workers": 0},
        "features": {"cache": False, "dtype": "float32", "batch_size": 16},
        "optim": {"lr": 1e-3, "warmup_steps": 2},
        "train": {"epochs": 2, "batch_size": 4, "mixed_precision": "no", "cpu": True},
        "checkpoint": {"every_steps": 0, "total_limit": 2},
        "eval": {"every_steps": 0, "batch_size": 16},
        "logging": {"tracker": "csv", "every_steps": 1, "progress": False},
    }
    for dotted, value in overrides.items():
        section, _, key = dotted.partition("__")
        if key:
            values.setdefault(section, {})[key] = value
        else:
            values[section] = value
    return config_from_dict(values)


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
