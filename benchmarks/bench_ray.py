"""Ray Data engine overhead and actor scaling, two ratios measured side by side in one run,
with a breakdown of where each run's time goes.

1. Ray with 2 single-thread actors vs the local streaming scorer (``score_plan``) with 2
   threads (2 decode threads, 2 torch threads) on the same images. Target: >= 0.8x.
2. Ray with 2 actors vs 1 actor. Target: >= 1.6x.

One driver model is loaded first (random weights, nothing is downloaded); a local Ray with 2
CPUs is started once, in its own temporary folder, and shut down at the end. Every
configuration scores the same folder of JPEGs. Two throughputs are printed for each run:

- *end to end*: images / wall time of the whole call, from a loaded driver model to the
  written output (local: ``score_plan``; Ray: ``score_partitions``, i.e. references, Ray Data
  starting the actors, each actor's worker process starting and loading its model, scoring,
  writing the partition files, ranks). Ray's own start (``ray.init``) is printed apart: a
  cluster is started once, not per run.
- *steady state*: the rate once running. Local: the same as end to end (its model is loaded
  before the clock; the rest is scoring). Ray: from the actors' timestamps, the sum over
  actors of images / (its last partition's end - its model ready); gaps between partitions
  count, start-up and an actor idling at the end while the other finishes do not. This is the
  per-image cost a long run on a cluster pays; end to end adds a fixed cost per run.

The phase breakdown shows where the gap between the two comes from. The ratios are
meaningful only on a quiet machine; the load average is printed with them.

Usage: python benchmarks/bench_ray.py [--images 1000] [--partition-size 64] [--backbone small-siglip]
"""

from __future__ import annotations

import argparse
import os
import shutil
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from bench_scoring import write_images  # noqa: E402

PHASES = (  # (label, key in the run's phases)
    ("references embedded", "references"),
    ("actors' processes up (after run start)", "worker_start"),
    ("actor imports (torch, library; slowest actor)", "imports"),
    ("actor model load (slowest actor)", "model_load"),
    ("all actors ready (after run start)", "actors_ready"),
    ("scoring: first partition start -> last end", "scoring"),
    ("driver: waiting for partitions", "waiting"),
    ("driver: writing partition files", "writing"),
    ("driver: ranks + summary", "ranks"),
    ("end to end", "total"),
)


def _worker_pid() -> int:
    return os.getpid()


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--images", type=int, default=1000)
    parser.add_argument("--side", type=int, default=384, help="image side in pixels (default: %(default)s)")
    parser.add_argument("--partition-size", type=int, default=64,
                        help="images per partition; a multiple of --batch-size (default: %(default)s)")
    parser.add_argument("--batch-size", type=int, default=16)
    parser.add_argument("--backbone", default="small-siglip")
    parser.add_argument("--workdir", type=Path, default=None)
    args = parser.parse_args(argv)

    # Ray's workers import this checkout (they inherit the environment of ray.init).
    os.environ["PYTHONPATH"] = os.pathsep.join(p for p in (str(REPO), os.environ.get("PYTHONPATH")) if p)
    import ray
    import torch

    from comfy_nearid import load_model
    from comfy_nearid.ray import RayEngine
    from comfy_nearid.scoring import OutputPaths, RunSettings, ScoringOptions, plan_single_subject, score_plan
    from comfy_nearid.scoring.partitions import PartitionOptions, score_partitions
    from comfy_nearid.scoring.sources import plan_partitions

    work = args.workdir or Path(tempfile.mkdtemp(prefix="bench_ray_"))
    images = write_images(work / "gen", args.images, args.side, seed=0)
    refs = write_images(work / "ref", 2, args.side, seed=1)
    spec = dict(backbone=args.backbone, pretrained=False, seed=0, device="cpu", dtype="fp32")
    torch.set_num_threads(2)
    start = time.perf_counter()
    model = load_model(**spec)
    driver_load = time.perf_counter() - start
    plan = plan_single_subject(refs, [work / "gen"])
    runs: dict[str, dict[str, float]] = {}

    start = time.perf_counter()
    local_options = ScoringOptions(batch_size=args.batch_size, num_workers=2, progress=False)
    score_plan(model, plan, OutputPaths.for_rows(work / "local.csv"), RunSettings(options=local_options, overwrite=True))
    total = time.perf_counter() - start
    runs["local, 2 threads"] = {"total": total, "end_to_end": len(images) / total, "steady": len(images) / total}

    torch.set_num_threads(1)  # the driver only embeds the references and writes files
    ray_dir = tempfile.mkdtemp(prefix="nearid-ray-")  # this run's own Ray session folder
    start = time.perf_counter()
    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False, _temp_dir=ray_dir)
    # Both worker processes up before any run (part of starting a cluster, which a long-lived
    # cluster has done long before a job), so the first run does not pay for it.
    ray.get([ray.remote(num_cpus=1)(_worker_pid).remote() for _ in range(2)])
    cluster_start = time.perf_counter() - start
    ray.data.DataContext.get_current().enable_progress_bars = False
    partitions = plan_partitions(plan, args.partition_size)
    references = {s.name: s.references for s in plan.subjects}
    options = PartitionOptions(batch_size=args.batch_size, num_workers=1, progress=False)
    threads = set()
    try:
        for actors in (2, 1):
            engine = RayEngine(spec, concurrency=actors)
            start = time.perf_counter()
            result = score_partitions(model, partitions, references, work / f"ray{actors}", options=options,
                                      engine=engine, overwrite=True)
            total = time.perf_counter() - start
            phases = {**engine.phases, **result.timings, "waiting": result.timings["scoring"], "total": total}
            phases["scoring"] = engine.phases["scoring"]
            phases.update(end_to_end=len(images) / total, steady=engine.phases["steady_images_per_s"])
            runs[f"ray, {actors} actor(s)"] = phases
            threads |= {t.torch_threads for t in engine.partition_timings}
    finally:
        ray.shutdown()
        shutil.rmtree(ray_dir, ignore_errors=True)

    load = os.getloadavg()
    print(f"{len(images)} images of {args.side}px, {args.backbone} (random weights), batch {args.batch_size}, "
          f"partitions of {args.partition_size}; load average {load[0]:.2f} {load[1]:.2f} {load[2]:.2f} "
          f"on {os.cpu_count()} CPU(s)")
    print(f"driver model load {driver_load:.1f} s; Ray start + 2 workers (once, in no run) {cluster_start:.1f} s; "
          f"torch threads per actor {sorted(threads)}")
    names = list(runs)
    print(f"\n  {'phase breakdown, seconds':44s}{''.join(f'{n:>20s}' for n in names)}")
    for label, key in PHASES:
        cells = "".join(f"{runs[n][key]:20.1f}" if key in runs[n] else f"{'-':>20s}" for n in names)
        print(f"  {label:44s}{cells}")
    print(f"  {'actors busy inside a partition (fraction)':44s}"
          + "".join(f"{runs[n]['busy']:20.2f}" if "busy" in runs[n] else f"{'-':>20s}" for n in names))
    print("\nthroughput, images/s")
    for label, key in (("end to end", "end_to_end"), ("steady state", "steady")):
        print(f"  {label:44s}" + "".join(f"{runs[n][key]:20.1f}" for n in names))
    local, two, one = runs["local, 2 threads"], runs["ray, 2 actor(s)"], runs["ray, 1 actor(s)"]
    print("\nratios (target on the steady state; end to end adds each run's fixed start-up cost)")
    print(f"  1. ray 2 actors / local 2 threads:  steady state {two['steady'] / local['steady']:.2f}x, "
          f"end to end {two['end_to_end'] / local['end_to_end']:.2f}x   (target >= 0.8x)")
    print(f"  2. ray 2 actors / ray 1 actor:      steady state {two['steady'] / one['steady']:.2f}x, "
          f"end to end {two['end_to_end'] / one['end_to_end']:.2f}x   (target >= 1.6x)")
    if args.workdir is None:
        shutil.rmtree(work, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
