"""Seconds per training epoch with and without the frozen-feature cache, side by side.

Same data, same config, same number of threads; each mode runs in its own process so that
its peak memory (max RSS, and peak GPU memory on CUDA) is its own. The cached run also
reports the one-off cost of building the cache.

    python benchmarks/bench_feature_cache.py                       # synthetic data, MobileNetV2
    python benchmarks/bench_feature_cache.py --backbone tiny-siglip --no-pretrained
    python benchmarks/bench_feature_cache.py --data runs/synth-data --n-train 600

    python benchmarks/bench_feature_cache.py --compare-head         # head: MHA form vs single-query form

The synthetic benchmark is generated into ``--data`` when that folder does not exist.

``--compare-head`` times epochs from the same feature cache instead, three ways: the original
path (the head in its former ``nn.MultiheadAttention`` form, ``mha_head_forward`` below, same
parameters; one cache read per example stacked by ``default_collate``; the per-tensor AdamW
loop; glibc's default malloc), the single-query head on that same data path, and the library's
path (single-query head, whole-batch cache reads, fused AdamW, freed
large blocks kept for reuse: ``comfy_nearid.malloc.keep_freed_memory``). It prints each speed-up per epoch against the
original (target >= 3x).

``--compare-build`` times building the cache instead (the training split's views and
distractors of every level, ``--images`` of them, ``--rounds`` rounds alternating): decode
threads beside the backbone on all its threads (``cores=1``, the former path) against
whole batches side by side, one per core (``batches_on_cores``, the library's CPU path).
Same images, same batches, one process; it prints images per second and the ratio per round.

    python benchmarks/bench_feature_cache.py --compare-build --data runs/demo/data
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--data", default=None, help="synthetic benchmark root (default: a temporary folder)")
    p.add_argument("--n-train", type=int, default=384, help="identities to generate when --data is missing")
    p.add_argument("--backbone", default="mobilenet-v2")
    p.add_argument("--no-pretrained", action="store_true", help="random backbone weights (no weights file needed)")
    p.add_argument("--batch-size", type=int, default=64)
    p.add_argument("--epochs", type=int, default=2, help="epochs timed per mode (seconds are per epoch)")
    p.add_argument("--workers", type=int, default=0, help="DataLoader workers for the live mode")
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--compare-head", action="store_true",
                   help="time cached epochs with the former MHA-form head vs the single-query head")
    p.add_argument("--compare-build", action="store_true",
                   help="time building the cache: decode threads beside the backbone vs one batch per core")
    p.add_argument("--images", type=int, default=2400, help="--compare-build: images embedded per round")
    p.add_argument("--rounds", type=int, default=3, help="--compare-build: rounds, the two paths alternating")
    p.add_argument("--image-batch", type=int, default=8, help="--compare-build: images per backbone pass")
    p.add_argument("--mode", choices=["live", "cached", "cached-mha", "cached-per-example"], help=argparse.SUPPRESS)  # child process
    p.add_argument("--cache-dir", help=argparse.SUPPRESS)
    p.add_argument("--out", help=argparse.SUPPRESS)
    return p.parse_args(argv)


def mha_head_forward(self, tokens, mask=None, return_attention=False, normalize=True):
    """The head's former computation (``nn.MultiheadAttention`` form), on the same parameters:
    keys and values are projected for every token, then one query attends over them."""
    import torch
    import torch.nn.functional as F

    mask = self._check(tokens, mask)
    b, n, d = tokens.shape
    h = self.config.num_heads
    attention = torch.nn.functional.multi_head_attention_forward
    a, weights = attention(
        self.probe.expand(b, 1, d).transpose(0, 1), tokens.transpose(0, 1), tokens.transpose(0, 1), d, h,
        self.attention.in_proj_weight, self.attention.in_proj_bias, None, None, False, 0.0,
        self.attention.out_proj.weight, self.attention.out_proj.bias, training=self.training,
        key_padding_mask=None if mask is None else ~mask, need_weights=return_attention,
        average_attn_weights=False,
    )
    x = a.transpose(0, 1)
    x = x + self.mlp(self.layernorm(x))
    x = x[:, 0]
    if normalize:
        x = F.normalize(x.float(), dim=-1).to(x.dtype)
    return (x, weights[:, :, 0]) if return_attention else x


def use_former_data_path() -> None:
    """The trainer's former data path: one cache read per example (the DataLoader stacks the
    items with ``default_collate``; tokens in the cache's dtype, converted in the step), the
    per-tensor AdamW loop and glibc's default handling of large blocks (``keep_freed_memory``
    off)."""
    import torch

    import trainer.loop as loop
    from trainer.data import TrainingExamples

    TrainingExamples.__getitems__ = None  # the DataLoader falls back to __getitem__ per key

    def former_optimizer(params, o, device):
        return torch.optim.AdamW(
            params, lr=o.lr, weight_decay=o.weight_decay, betas=tuple(o.betas), eps=o.eps, foreach=False
        )

    loop.make_optimizer = former_optimizer
    loop.keep_freed_memory = lambda: False  # glibc's default: large blocks mapped and unmapped per step


def _config(args: argparse.Namespace, run_dir: Path, cached: bool):
    from trainer.config import config_from_dict

    return config_from_dict(
        {
            "output_dir": str(run_dir),
            "seed": 0,
            "model": {"backbone": args.backbone, "pretrained": not args.no_pretrained, "init_head": "fresh"},
            "data": {
                "format": "folder", "train": args.data, "train_split": "train",
                "sources": ["object"], "num_workers": args.workers if not cached else 0,
            },
            "features": {"cache": cached, "dtype": "float16", "batch_size": 32, "cache_dir": args.cache_dir or str(run_dir / "cache")},
            "optim": {"lr": 1e-3, "warmup_steps": 10},
            "train": {"epochs": args.epochs, "batch_size": args.batch_size, "mixed_precision": "no", "cpu": True},
            "checkpoint": {"every_steps": 0},
            "eval": {"every_steps": 0},
            "logging": {"tracker": "none", "progress": False, "every_steps": 1000},
        }
    )


def child(args: argparse.Namespace) -> None:
    """One mode in this process: time setup (incl. cache build) and the epochs."""
    import torch

    torch.set_num_threads(args.threads)
    from trainer.loop import train

    cached = args.mode.startswith("cached")
    if args.mode == "cached-mha":
        from comfy_nearid.head import NearIDHead

        NearIDHead.forward = mha_head_forward
    if args.mode in ("cached-mha", "cached-per-example"):
        use_former_data_path()
    with tempfile.TemporaryDirectory() as tmp:
        started = time.perf_counter()
        result = train(_config(args, Path(tmp) / "run", cached))
        total = time.perf_counter() - started
    peak_gpu = torch.cuda.max_memory_allocated() / 2**20 if torch.cuda.is_available() else None
    Path(args.out).write_text(
        json.dumps(
            {
                "mode": args.mode,
                "seconds_per_epoch": result.seconds / args.epochs,
                "setup_seconds": total - result.seconds,  # model + data scan (+ the cache build)
                "steps": result.global_step,
                "samples": result.samples_seen,
                "peak_rss_mib": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
                "peak_gpu_mib": peak_gpu,
            }
        )
    )


def ensure_data(args: argparse.Namespace) -> None:
    if args.data is None:
        args.data = str(Path(tempfile.gettempdir()) / f"nearid-bench-synth-{args.n_train}")
    if not (Path(args.data) / "manifest.json").is_file():
        from comfy_nearid.data.synth import generate_benchmark

        print(f"generating the synthetic benchmark ({args.n_train} identities) in {args.data} ...", flush=True)
        generate_benchmark(args.data, args.n_train, 8, n_mtg=0, seed=0, overwrite=True, progress=False, workers=2)


def compare_build(args: argparse.Namespace) -> int:
    """Cache build, both CPU paths alternating in this process (see the module docstring)."""
    import statistics

    import numpy as np
    import torch

    from comfy_nearid.data import FolderDataset
    from comfy_nearid.malloc import keep_freed_memory
    from comfy_nearid.model import load_model
    from trainer.data import scan_layout
    from trainer.feature_cache import _collect, _embed_into

    keep_freed_memory()
    torch.set_num_threads(args.threads)
    model = load_model(backbone=args.backbone, readout="mean", pretrained=not args.no_pretrained)
    dataset = FolderDataset(args.data, split="train")
    pending: dict = {}
    _collect(dataset, scan_layout(dataset), pending)
    images = list(pending.values())[: args.images]
    shape = (len(images), model.spec.num_tokens, model.spec.embed_dim)
    print(f"backbone {args.backbone}, {len(images)} images of {args.data}, {args.image_batch} per pass, "
          f"{args.threads} threads, load average {' '.join(f'{x:.2f}' for x in os.getloadavg())}")
    print(f"{'round':>6s}{'decode threads beside':>24s}{'one batch per core':>22s}{'ratio':>8s}")
    ratios, outputs = [], {}
    for r in range(args.rounds):
        speeds = {}
        for cores in (1, args.threads):
            tokens = np.zeros(shape, np.float16)
            masks = np.ones(shape[:2], bool)
            started = time.perf_counter()
            _embed_into(model, images, tokens, masks, args.image_batch, False, cores=cores)
            speeds[cores] = len(images) / (time.perf_counter() - started)
            outputs[cores] = tokens, masks
        ratios.append(speeds[args.threads] / speeds[1])
        print(f"{r + 1:6d}{speeds[1]:18.1f} img/s{speeds[args.threads]:16.1f} img/s{ratios[-1]:7.2f}x", flush=True)
    (t1, m1), (tn, mn) = outputs[1], outputs[args.threads]
    diff = np.abs(t1.astype(np.float32) - tn.astype(np.float32)).max()
    print(f"ratio median {statistics.median(ratios):.2f}x (range {min(ratios):.2f}-{max(ratios):.2f}); same masks: "
          f"{bool(np.array_equal(m1, mn))}; tokens bit-equal {float((t1 == tn).mean()):.1%}, largest difference {diff:.2g}")
    return 0


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    if args.mode:
        child(args)
        return 0
    ensure_data(args)
    if args.compare_build:
        return compare_build(args)
    modes = ("cached-mha", "cached-per-example", "cached") if args.compare_head else ("live", "cached")
    shared_cache = tempfile.TemporaryDirectory() if args.compare_head else None
    results = {}
    for mode in modes:
        with tempfile.NamedTemporaryFile(suffix=".json", delete=False) as f:
            out = f.name
        cmd = [sys.executable, __file__, "--mode", mode, "--out", out, "--data", args.data,
               "--backbone", args.backbone, "--batch-size", str(args.batch_size), "--epochs", str(args.epochs),
               "--workers", str(args.workers), "--threads", str(args.threads)]
        if args.no_pretrained:
            cmd.append("--no-pretrained")
        if shared_cache is not None:  # both head forms train from one cache, built once
            cmd += ["--cache-dir", shared_cache.name]
        env = {**os.environ, "OMP_NUM_THREADS": str(args.threads)}
        print(f"running {mode} ...", flush=True)
        subprocess.run(cmd, check=True, env=env)
        results[mode] = json.loads(Path(out).read_text())
        os.unlink(out)

    if shared_cache is not None:
        shared_cache.cleanup()
        return report_head(args, results["cached-mha"], results["cached-per-example"], results["cached"])
    live, cached = results["live"], results["cached"]
    print()
    print(f"backbone {args.backbone}, {live['samples'] // args.epochs} samples/epoch, batch {args.batch_size}, "
          f"{args.threads} threads, {args.epochs} epoch(s) per mode")
    print(f"{'':28s}{'live (backbone)':>18s}{'feature cache':>18s}")
    print(f"{'seconds per epoch':28s}{live['seconds_per_epoch']:18.2f}{cached['seconds_per_epoch']:18.2f}")
    print(f"{'setup s (cache build incl.)':28s}{live['setup_seconds']:18.2f}{cached['setup_seconds']:18.2f}")
    print(f"{'peak RSS MiB':28s}{live['peak_rss_mib']:18.0f}{cached['peak_rss_mib']:18.0f}")
    if live["peak_gpu_mib"] is not None:
        print(f"{'peak GPU MiB':28s}{live['peak_gpu_mib']:18.0f}{cached['peak_gpu_mib']:18.0f}")
    ratio = live["seconds_per_epoch"] / max(1e-9, cached["seconds_per_epoch"])
    print(f"speed-up per epoch with the cache: {ratio:.1f}x (target >= 10x)")
    return 0


def report_head(args: argparse.Namespace, original: dict, head_only: dict, now: dict) -> int:
    print()
    print(f"backbone {args.backbone}, {now['samples'] // args.epochs} samples/epoch, batch {args.batch_size}, "
          f"{args.threads} threads, {args.epochs} epoch(s) per form, load average "
          f"{' '.join(f'{x:.2f}' for x in os.getloadavg())}")
    columns = [("MHA, per-example", original), ("1-query, per-ex.", head_only), ("1-query, batched", now)]
    print(f"{'':28s}" + "".join(f"{name:>20s}" for name, _ in columns))
    print(f"{'seconds per epoch':28s}" + "".join(f"{r['seconds_per_epoch']:20.2f}" for _, r in columns))
    print(f"{'peak RSS MiB':28s}" + "".join(f"{r['peak_rss_mib']:20.0f}" for _, r in columns))
    base = original["seconds_per_epoch"]
    print(f"{'speed-up vs original':28s}" + "".join(f"{base / max(1e-9, r['seconds_per_epoch']):19.2f}x" for _, r in columns))
    data_gain = head_only["seconds_per_epoch"] / max(1e-9, now["seconds_per_epoch"])
    print(f"whole-batch reads + fused AdamW + kept memory vs the former data path (same head): {data_gain:.2f}x")
    ratio = base / max(1e-9, now["seconds_per_epoch"])
    print(f"speed-up per epoch from the feature cache, library path vs original (MHA head, per-example reads): "
          f"{ratio:.2f}x (target >= 3x)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
