"""Ray Data engine overhead and actor scaling, two ratios measured side by side in one run.

1. Ray with 2 single-thread actors vs the local streaming scorer (``score_plan``) with 2
   threads (2 decode threads, 2 torch threads) on the same images. Target: >= 0.8x.
2. Ray with 2 actors vs 1 actor. Target: >= 1.6x.

Ray is started once (``num_cpus=2``) and every configuration scores the same folder. Two
throughputs are printed for each Ray run:

- *end to end*: images / wall time of the whole ``score_partitions`` call, including Ray Data
  starting the actors and each actor loading its model (a fixed cost per run);
- *steady state*: the same run minus the fixed cost, measured by a run right before it with
  one one-image partition per actor (Ray Data starting the actors, each loading its model and
  scoring one image): ``(N - actors) / (T_run - T_startup)``. This is the per-image cost a
  long run on a cluster pays. (Timestamps of partitions arriving at the driver do not measure
  it: Ray Data hands finished blocks over in bursts.)

The local scorer's model is loaded before its clock starts, so its time is steady state.
Nothing is downloaded: the model has random weights. The ratios are meaningful only on a
quiet machine; the load average is printed with them.

Usage: python benchmarks/bench_ray.py [--images 1000] [--partition-size 50] [--backbone small-siglip]
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from bench_scoring import write_images  # noqa: E402


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--images", type=int, default=1000)
    parser.add_argument("--side", type=int, default=384, help="image side in pixels (default: %(default)s)")
    parser.add_argument("--partition-size", type=int, default=50)
    parser.add_argument("--batch-size", type=int, default=16)
    parser.add_argument("--backbone", default="small-siglip")
    parser.add_argument("--workdir", type=Path, default=None)
    args = parser.parse_args(argv)

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
    model = load_model(**spec)
    plan = plan_single_subject(refs, [work / "gen"])
    results: dict[str, float] = {}

    torch.set_num_threads(2)
    outputs = OutputPaths.for_rows(work / "local.csv")
    start = time.perf_counter()
    options = ScoringOptions(batch_size=args.batch_size, num_workers=2, progress=False)
    score_plan(model, plan, outputs, RunSettings(options=options, overwrite=True))
    results["local, 2 threads"] = len(images) / (time.perf_counter() - start)
    torch.set_num_threads(1)

    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False)
    ray.data.DataContext.get_current().enable_progress_bars = False
    partitions = plan_partitions(plan, args.partition_size)
    references = {s.name: s.references for s in plan.subjects}
    steady: dict[int, float] = {}
    options = PartitionOptions(batch_size=args.batch_size, num_workers=1, progress=False)

    def timed(parts, out: Path, actors: int) -> float:
        start = time.perf_counter()
        score_partitions(model, parts, references, out, options=options, engine=RayEngine(spec, concurrency=actors),
                         overwrite=True)
        return time.perf_counter() - start

    try:
        for actors in (2, 1):
            startup = timed(plan_partitions(plan, 1)[:actors], work / f"startup{actors}", actors)
            total = timed(partitions, work / f"ray{actors}", actors)
            results[f"ray, {actors} actor(s), end to end"] = len(images) / total
            # Under heavy load the fixed cost varies more than the run takes: no steady state then.
            steady[actors] = (len(images) - actors) / (total - startup) if total > startup else float("nan")
            results[f"ray, {actors} actor(s), steady state"] = steady[actors]
            print(f"ray, {actors} actor(s): run {total:.1f} s, fixed cost {startup:.1f} s", flush=True)
    finally:
        ray.shutdown()

    load = os.getloadavg()
    print(f"{len(images)} images of {args.side}px, {args.backbone} (random weights), batch {args.batch_size}, "
          f"partitions of {args.partition_size}; load average {load[0]:.2f} {load[1]:.2f} {load[2]:.2f} "
          f"on {os.cpu_count()} CPU(s)")
    for name, value in results.items():
        print(f"  {name:34s} {value:8.1f} images/s")
    local = results["local, 2 threads"]
    print(f"ratio 1, ray 2 actors / local 2 threads: steady state {steady[2] / local:.2f}x, end to end "
          f"{results['ray, 2 actor(s), end to end'] / local:.2f}x (target >= 0.8x)")
    print(f"ratio 2, ray 2 actors / 1 actor: steady state {steady[2] / steady[1]:.2f}x, end to end "
          f"{results['ray, 2 actor(s), end to end'] / results['ray, 1 actor(s), end to end']:.2f}x (target >= 1.6x)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
