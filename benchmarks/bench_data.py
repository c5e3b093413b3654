"""Data benchmark: synthetic generation speed, and streaming reads of 1,000 samples.

Prints, measured side by side in one run:

1. generation speed of ``generate_benchmark`` (RGB images/s and identities/s at 224 px) in
   one process and in ``--workers`` processes (the files are byte-identical either way);
2. the time and peak memory of reading (decoding every image and mask of) ``--read``
   samples from datasets of two sizes (``--sizes``), in the folder layout and as parquet
   shards (published layout). Each read runs in a fresh process so its peak RSS is its own;
   equal peaks for a small and a 4x larger dataset show that reading streams.

The large datasets reuse the generated identities (hard links / repeated rows under new
ids), so the benchmark needs only ``--identities`` renders.

    python benchmarks/bench_data.py                    # ~3-5 minutes on 2 cores
    python benchmarks/bench_data.py --sizes 1000 4000 --read 1000 --identities 100
    python benchmarks/bench_data.py --formats folder --sizes 100 200 --read 100 --signal 100
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

SOURCES = ("colour", "object", "part")


def _generation(workdir: Path, identities: int, workers: int, size: int) -> dict[str, float]:
    from comfy_nearid.data import generate_benchmark

    out = workdir / f"gen_w{workers}"
    start = time.perf_counter()
    manifest = generate_benchmark(out, identities, 0, image_size=size, seed=0, n_mtg=0, workers=workers, progress=False)
    seconds = time.perf_counter() - start
    return {"seconds": seconds, "images_per_s": manifest["rgb_images"] / seconds, "ids_per_s": identities / seconds}


def _same_files(a: Path, b: Path) -> bool:
    files_a = sorted(p.relative_to(a) for p in a.rglob("*") if p.is_file())
    files_b = sorted(p.relative_to(b) for p in b.rglob("*") if p.is_file())
    return files_a == files_b and all((a / f).read_bytes() == (b / f).read_bytes() for f in files_a)


def _folder_dataset(source: Path, out: Path, size: int) -> Path:
    """A folder dataset of ``size`` samples made of hard links to the generated identities."""
    originals = sorted(p for p in source.iterdir() if p.is_dir())
    for i in range(size):
        src = originals[i % len(originals)]
        dst = out / f"s{i:06d}"
        for f in src.rglob("*"):
            target = dst / f.relative_to(src)
            if f.is_dir():
                target.mkdir(parents=True, exist_ok=True)
                continue
            target.parent.mkdir(parents=True, exist_ok=True)
            if f.name == "sample.json":  # the copy is its own sample: new id
                meta = json.loads(f.read_text())
                target.write_text(json.dumps(meta | {"id": dst.name}))
                continue
            try:
                os.link(f, target)
            except OSError:  # file systems without hard links
                shutil.copyfile(f, target)
    return out


def _parquet_dataset(source: Path, out: Path, size: int) -> tuple[Path, dict[str, Path]]:
    """Positives + one distractor dataset per source, as hub-style parquet shards (100-row groups)."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    originals = sorted(p for p in source.iterdir() if p.is_dir())
    cell = lambda p: {"bytes": p.read_bytes(), "path": None}  # noqa: E731
    tables = {"positives": [], **{s: [] for s in SOURCES}}
    shard_rows, shard = 500, 0

    def flush(final: bool = False) -> None:
        nonlocal shard
        if not tables["positives"] or (len(tables["positives"]) < shard_rows and not final):
            return
        for name, rows in tables.items():
            folder = out / name / "data"
            folder.mkdir(parents=True, exist_ok=True)
            pq.write_table(pa.Table.from_pylist(rows), folder / f"train-{shard:05d}.parquet", row_group_size=100)
            rows.clear()
        shard += 1

    for i in range(size):
        src = originals[i % len(originals)]
        sid = f"s{i:06d}"
        meta = json.loads((src / "sample.json").read_text())
        views = {f"img{k}": cell(src / f"view{k}.png") for k in (1, 2, 3)}
        tables["positives"].append({"id": sid, "category": meta["category"], **views})
        for s in SOURCES:
            tables[s].append({"id": sid, **{f"nimg{k}": cell(src / s / f"distractor{k}.png") for k in (1, 2, 3)},
                              **{f"masks{k}": cell(src / s / f"mask{k}.png") for k in (1, 2, 3)}})
        flush()
    flush(final=True)
    return out / "positives", {s: out / s for s in SOURCES}


def _child_read(args: argparse.Namespace) -> None:
    """Runs in a fresh process: open a dataset, decode ``--read`` samples, print JSON."""
    from comfy_nearid.data import FolderDataset, PublishedNearIDDataset, iter_loaded_samples

    def rss_mb() -> float:
        """Peak RSS of this process. /proc VmHWM is reset at exec; ru_maxrss is not (on Linux it
        starts at the parent's RSS when the parent forked), so it is only the fallback."""
        try:
            for line in Path("/proc/self/status").read_text().splitlines():
                if line.startswith("VmHWM:"):
                    return int(line.split()[1]) / 1024.0
        except OSError:
            pass
        return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0

    path = Path(args.child_path)
    start_open = time.perf_counter()
    if args.child == "folder":
        dataset = FolderDataset(path)
    else:
        dataset = PublishedNearIDDataset(path / "positives", {s: path / s for s in SOURCES})
    open_s = time.perf_counter() - start_open
    after_open = rss_mb()
    images = 0
    after_first = 0.0
    start = time.perf_counter()
    for n, loaded in enumerate(iter_loaded_samples(dataset)):
        if n >= args.read:
            break
        if n == 1:  # the first decode imports torch (comfy_nearid.images); measure growth after it
            after_first = rss_mb()
        images += sum(x is not None for x in (*loaded.views, *loaded.masks))
        images += sum(x is not None for lst in (*loaded.distractors.values(), *loaded.distractor_masks.values()) for x in lst)
    seconds = time.perf_counter() - start
    print(json.dumps({"len": len(dataset), "open_s": open_s, "read_s": seconds, "images": images,
                      "rss_after_open_mb": after_open, "rss_after_first_mb": after_first, "peak_rss_mb": rss_mb()}))


def _measure_read(kind: str, path: Path, read: int) -> dict[str, float]:
    cmd = [sys.executable, __file__, "--child", kind, "--child-path", str(path), "--read", str(read)]
    proc = subprocess.run(cmd, capture_output=True, text=True)
    if proc.returncode != 0:
        raise RuntimeError(f"reading {path} failed:\n{proc.stderr}")
    return json.loads(proc.stdout.strip().splitlines()[-1])


def _signal(workdir: Path, n_test: int) -> None:
    """Frozen MobileNetV2 readouts on the synthetic test split, per distractor level.

    Shows what the benchmark asks of a head: the backbone's own pooling and the mean of all
    tokens score ~0% SSR (view and distractor share most pixels); averaging only the object's
    tokens (oracle mask) already separates object-level distractors sometimes.
    """
    import numpy as np
    import torch

    from comfy_nearid.data import FolderDataset, generate_benchmark, iter_loaded_samples
    from comfy_nearid.errors import WeightsNotFoundError
    from comfy_nearid.metrics.ssr import margins_from_similarities, ssr_stats
    from comfy_nearid.model import load_model

    try:
        model = load_model(backbone="mobilenet-v2", readout="pooled", device="cpu", dtype="fp32")
    except WeightsNotFoundError as e:
        print(f"signal check skipped: {e}")
        return
    root = workdir / "signal"
    generate_benchmark(root, 0, n_test, image_size=224, seed=0, n_mtg=0, progress=False)
    readouts = ("backbone pooling", "mean of all tokens", "mean of object tokens (oracle mask)")
    view_sims = {r: [] for r in readouts}
    own = {(r, s): [] for r in readouts for s in SOURCES}
    for loaded in iter_loaded_samples(FolderDataset(root, split="test")):
        images = [*loaded.views, *(d for s in SOURCES for d in loaded.distractors[s])]
        masks = [*loaded.masks, *(m for s in SOURCES for m in loaded.distractor_masks[s])]
        pixels = model.preprocess_batch(images)
        with torch.no_grad():
            tokens, pooled = model.backbone(pixels), model.backbone.pooled(pixels)
        keep = model.token_mask([np.asarray(m, np.float32) / 255.0 for m in masks], len(masks))
        embeddings = {
            readouts[0]: pooled,
            readouts[1]: tokens.mean(1),
            readouts[2]: torch.stack([t[k].mean(0) for t, k in zip(tokens, keep)]),
        }
        for r, e in embeddings.items():
            e = torch.nn.functional.normalize(e.double(), dim=-1).numpy()
            view_sims[r].append(e[:3] @ e[:3].T)
            for i, s in enumerate(SOURCES):
                distractors = e[3 + 3 * i: 6 + 3 * i]
                own[(r, s)].append((e[:3] * distractors).sum(-1))
    print(f"\n== learning signal: frozen ImageNet MobileNetV2, {n_test} test identities (held-out categories)")
    print(f"{'readout':>38} " + " ".join(f"{s + ' SSR/PA':>16}" for s in SOURCES))
    for r in readouts:
        cells = []
        for s in SOURCES:
            stats = ssr_stats(margins_from_similarities(np.stack(view_sims[r]), np.stack(own[(r, s)])))
            cells.append(f"{stats.ssr:7.1f} / {stats.pa:5.1f}")
        print(f"{r:>38} " + " ".join(f"{c:>16}" for c in cells))


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--identities", type=int, default=60, help="identities rendered for the speed test")
    parser.add_argument("--size", type=int, default=224, help="image side (default: %(default)s)")
    parser.add_argument("--workers", type=int, default=2, help="processes for the parallel generation run")
    parser.add_argument("--sizes", type=int, nargs=2, default=(1000, 4000), help="the two dataset sizes")
    parser.add_argument("--read", type=int, default=1000, help="samples read from each dataset")
    parser.add_argument("--formats", nargs="+", default=["folder", "parquet"], choices=["folder", "parquet"])
    parser.add_argument("--workdir", type=Path, default=None, help="scratch folder (default: a temporary one, removed)")
    parser.add_argument("--signal", type=int, default=0, metavar="N",
                        help="also score frozen MobileNetV2 readouts on N synthetic test identities (needs its weights)")
    parser.add_argument("--child", default=None, help=argparse.SUPPRESS)
    parser.add_argument("--child-path", default=None, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.child:
        _child_read(args)
        return 0

    workdir = args.workdir or Path(tempfile.mkdtemp(prefix="bench_data_"))
    workdir.mkdir(parents=True, exist_ok=True)
    try:
        print(f"== generation: {args.identities} identities x 12 RGB images (+ masks), {args.size} px")
        one = _generation(workdir, args.identities, 1, args.size)
        many = _generation(workdir, args.identities, args.workers, args.size)
        same = _same_files(workdir / "gen_w1", workdir / f"gen_w{args.workers}")
        print(f"{'processes':>10} {'seconds':>8} {'images/s':>9} {'ids/s':>7}")
        for label, r in (("1", one), (str(args.workers), many)):
            print(f"{label:>10} {r['seconds']:8.2f} {r['images_per_s']:9.1f} {r['ids_per_s']:7.2f}")
        print(f"speed-up {many['images_per_s'] / one['images_per_s']:.2f}x with {args.workers} processes; "
              f"files byte-identical: {same}")
        per_core = one["ids_per_s"]
        print(f"one core: 2,000 identities in ~{2000 / per_core:.0f} s, 20,000 in ~{20000 / per_core / 60:.0f} min")

        source = workdir / "gen_w1" / "train"
        print(f"\n== reading {args.read} samples (every view, distractor and mask decoded), fresh process each")
        print("(RSS in MB: after opening the dataset, after the first sample, peak; the first decode imports torch)")
        print(f"{'layout':>8} {'dataset':>8} {'open s':>7} {'read s':>7} {'ms/sample':>9} {'images/s':>9} "
              f"{'RSS open':>8} {'RSS 1st':>8} {'peak RSS':>8} {'growth':>7}")
        for kind in args.formats:
            peaks = []
            for size in args.sizes:
                target = workdir / f"{kind}_{size}"
                if kind == "folder":
                    _folder_dataset(source, target, size)
                else:
                    _parquet_dataset(source, target, size)
                r = _measure_read(kind, target, args.read)
                peaks.append(r["peak_rss_mb"])
                print(f"{kind:>8} {r['len']:>8} {r['open_s']:7.2f} {r['read_s']:7.2f} "
                      f"{1000 * r['read_s'] / args.read:9.2f} {r['images'] / r['read_s']:9.0f} "
                      f"{r['rss_after_open_mb']:8.0f} {r['rss_after_first_mb']:8.0f} {r['peak_rss_mb']:8.0f} "
                      f"{r['peak_rss_mb'] - r['rss_after_first_mb']:7.1f}")
                shutil.rmtree(target)
            print(f"{kind:>8} peak RSS ratio (size {args.sizes[1]} / size {args.sizes[0]}): {peaks[1] / peaks[0]:.2f}")
        if args.signal:
            _signal(workdir, args.signal)
    finally:
        if args.workdir is None:
            shutil.rmtree(workdir, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
