"""Benchmark `nearid eval ssr` on the synthetic benchmark: one process vs two, and embed-once.

Prints, side by side in one run:
- images per second of `nearid eval ssr` with one process and with two processes
  (`accelerate launch --multi_gpu --num_processes 2`; gloo on CPU-only machines), and their ratio;
- how many images the evaluator embedded against the number of distinct image files and of
  image slots, and how many a naive evaluator (embedding both images of every similarity it
  needs) would embed.

    python benchmarks/bench_eval.py [--n-test 40] [--image-size 128] [--scorer mean:small-siglip]
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np


def _run(cmd: list[str], env: dict[str, str]) -> float:
    start = time.perf_counter()
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True)
    elapsed = time.perf_counter() - start
    if proc.returncode != 0:
        sys.exit(f"command failed ({proc.returncode}): {' '.join(cmd)}\n{proc.stderr[-3000:]}")
    return elapsed


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--n-test", type=int, default=40, help="synthetic test identities")
    parser.add_argument("--image-size", type=int, default=128)
    parser.add_argument("--scorer", default="mean:small-siglip", help="scorer spec (random weights)")
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--skip-two", action="store_true", help="skip the two-process run")
    args = parser.parse_args(argv)

    from comfy_nearid.data.folder import FolderDataset
    from comfy_nearid.data.synth import generate_benchmark
    from comfy_nearid.evaluate import similarity_table

    work = Path(tempfile.mkdtemp(prefix="nearid-bench-eval-"))
    generate_benchmark(work / "bench", n_train=0, n_test=args.n_test, n_mtg=0, image_size=args.image_size,
                       seed=0, progress=False)
    split = work / "bench" / "test"

    # --- embed-once accounting (in process, a counting embedding function) ---
    embedded: list[str] = []

    def counting_embed(images, masks):
        embedded.extend(hashlib.sha1(im.tobytes()).hexdigest() for im in images)
        return np.stack([np.asarray(im.resize((8, 8)), dtype=np.float64).reshape(-1) + 1.0 for im in images])

    table = similarity_table(FolderDataset(split), counting_embed, batch_size=args.batch_size, progress=False)
    files = [p for p in split.rglob("*.png") if p.name.startswith(("view", "distractor"))]
    distinct_files = len({hashlib.sha1(p.read_bytes()).hexdigest() for p in files})
    # a naive evaluator embeds both images of every similarity a margin uses:
    # s(p_i, p_j) once per margin and s(p_i, d_i) once per margin -> 4 images per valid margin
    n_margins = int(np.isfinite(table.margins()).sum())
    print(f"rows (sample x source): {len(table)}; image slots: {table.info['n_image_slots']}; "
          f"distinct image files: {distinct_files}")
    print(f"images embedded: {len(embedded)} (distinct: {len(set(embedded))}, embedded twice: "
          f"{len(embedded) - len(set(embedded))}); naive per-margin embedding: {4 * n_margins} "
          f"-> {4 * n_margins / len(embedded):.1f}x more")

    # --- throughput: one process vs two processes ---
    # Each mode also runs on one sample (--limit 1): the difference removes process start-up,
    # imports and model construction, leaving the time spent on the remaining images.
    n_images = table.info["n_images_embedded"]
    n_first = 12  # images of one sample: 3 views + 3 sources x 3 distractors
    env = dict(os.environ, OMP_NUM_THREADS="1")
    common = ["eval", "ssr", "--data", str(split), "--scorer", args.scorer, "--random-weights", "--device", "cpu",
              "--batch-size", str(args.batch_size), "--bootstrap", "0", "--no-progress"]
    launchers = {"1 process  ": [sys.executable, "-m", "comfy_nearid"]}
    if not args.skip_two:
        launchers["2 processes"] = [sys.executable, "-m", "accelerate.commands.launch", "--multi_gpu",
                                    "--num_processes", "2", "--num_machines", "1", "--mixed_precision", "no",
                                    "--dynamo_backend", "no", "-m", "comfy_nearid"]
    rates = {}
    for label, launcher in launchers.items():
        tag = label.strip().replace(" ", "_")
        full = _run([*launcher, *common, "--out", str(work / tag)], env)
        start = _run([*launcher, *common, "--limit", "1", "--out", str(work / f"{tag}_1")], env)
        rates[label] = (n_images - n_first) / max(full - start, 1e-6)
        print(f"{label}: {full:6.2f} s wall ({start:5.2f} s for one sample), {n_images / full:7.1f} images/s overall, "
              f"{rates[label]:7.1f} images/s after start-up ({args.scorer}, {args.image_size}px)")
    if len(rates) == 2:
        one, two = rates.values()
        print(f"two processes / one process (after start-up): {two / one:.2f}x")
        s1 = json.loads((work / "1_process" / "summary.json").read_text())[args.scorer]
        s2 = json.loads((work / "2_processes" / "summary.json").read_text())[args.scorer]
        print(f"same numbers: SSR {s1['ssr']:.2f} vs {s2['ssr']:.2f}, PA {s1['pa']:.2f} vs {s2['pa']:.2f}")
    print(f"(outputs in {work}; {os.cpu_count()} CPU cores)")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
