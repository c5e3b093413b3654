"""Benchmarks of `nearid score` and best-of-N, each a ratio measured side by side in one run.

1. Streaming scorer (decode + preprocess in threads, batched model) vs a naive loop that
   opens, preprocesses and embeds one image at a time, on the same images and model.
   Target: >= 2x on 2 CPU cores.
2. A cached re-run (embedding cache filled by the first run) vs that first run.
   Target: >= 20x.
3. Peak memory (max RSS of a fresh `nearid score` process) for 2,000 images vs 200.
   Target: within 10%.
4. Early rejection vs full best-of-N on a tiny random Stable Diffusion pipeline: denoising
   steps and wall time saved, and whether both pick the same seed (random weights: the
   agreement says nothing about real models; the compute accounting does).

5. `nearid score` at the model's speed: end-to-end throughput of the CLI with its default
   settings vs the best model-only throughput (the model's forward on preprocessed pixels,
   best of a sweep of batch sizes, same device and threads). End-to-end is measured in
   steady state: (N - 1) images / (time for N - time for 1 image), which removes model
   construction and start-up. Each of ``--rounds`` rounds puts one end-to-end run beside one
   model-only pass and takes their ratio; the median ratio is the result (a change of load
   between rounds hits both sides alike). The CLI runs in this process with the OpenMP wait
   policy that `nearid` sets (PASSIVE unless the environment names one); on a CPU the
   model-only side is also measured under the other policy in a fresh process, and the
   better of the two is the bound. Process CPU time per image (all threads) is printed
   beside it: where the work goes, even on a busy machine. Target: >= 0.90.

Usage: python benchmarks/bench_scoring.py [--images 1000] [--backbone small-siglip]
       python benchmarks/bench_scoring.py --only throughput --images 600 [--rounds 3] [--with-cache] [--device cuda]
Models have random weights (nothing is downloaded); timings need a quiet machine.
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
from PIL import Image

REPO = Path(__file__).resolve().parents[1]


def write_images(folder: Path, count: int, side: int, seed: int) -> list[Path]:
    """Smooth random JPEGs (upsampled noise): realistic to decode, cheap to write."""
    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    paths = []
    for i in range(count):
        path = folder / f"{i:05d}.jpg"
        if not path.exists():
            small = rng.integers(0, 256, size=(8, 8, 3), dtype=np.uint8)
            Image.fromarray(small).resize((side, side), Image.Resampling.BILINEAR).save(path, quality=90)
        paths.append(path)
    return paths


def naive_loop(model, reference_paths: list[Path], paths: list[Path]) -> np.ndarray:
    """Open, preprocess and embed one image at a time (what a first script does)."""
    import torch

    from comfy_nearid.images import load_image

    refs = model.embed(reference_paths).numpy()
    scores = np.empty(len(paths))
    for i, path in enumerate(paths):
        pixels = model.preprocess(load_image(path)).unsqueeze(0)
        with torch.inference_mode():
            emb = model.embed_pixels(pixels).cpu().numpy()[0]
        scores[i] = float((refs @ emb).mean())
    return scores


def streaming(model, ref: Path, gen: Path, out: Path, cache, batch_size: int, workers: int) -> float:
    from comfy_nearid.scoring import OutputPaths, RunSettings, ScoringOptions, plan_single_subject, score_plan

    plan = plan_single_subject([ref], [gen])
    outputs = OutputPaths.for_rows(out)
    start = time.perf_counter()
    options = ScoringOptions(batch_size=batch_size, num_workers=workers, progress=False)
    score_plan(model, plan, outputs, RunSettings(options=options, cache=cache, overwrite=True))
    return time.perf_counter() - start


def peak_rss_mib(args: list[str], cwd: Path) -> float:
    """Max resident memory of one fresh `nearid score` process (os.wait4: that child only)."""
    env = dict(os.environ, PYTHONPATH=str(REPO) + os.pathsep + os.environ.get("PYTHONPATH", ""))
    proc = subprocess.Popen([sys.executable, "-m", "comfy_nearid", *args], cwd=cwd, env=env,
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    _, status, usage = os.wait4(proc.pid, 0)
    proc.returncode = os.waitstatus_to_exitcode(status)
    if proc.returncode != 0:
        raise SystemExit(f"nearid score failed: {proc.stderr.read().decode()[-2000:]}")
    return usage.ru_maxrss / 1024.0  # KiB on Linux


def bench_speed_and_cache(args: argparse.Namespace, work: Path, streaming_speed: bool = True) -> None:
    import torch

    from comfy_nearid import load_model
    from comfy_nearid.embedding_cache import EmbeddingCache

    model = load_model(backbone=args.backbone, pretrained=False, device="cpu", dtype="fp32")
    ref = write_images(work / "ref", 1, args.side, seed=1)[0]
    gen = work / "gen1000"
    paths = write_images(gen, args.images, args.side, seed=2)
    print(f"model {args.backbone} (random weights), {args.images} JPEGs of {args.side}px, "
          f"torch threads {torch.get_num_threads()}, CPU cores {os.cpu_count()}")

    naive_loop(model, [ref], paths[:8])  # warm-up, both sides
    streaming(model, ref, gen, work / "warm.csv", None, args.batch_size, args.workers)
    if streaming_speed:
        start = time.perf_counter()
        naive_loop(model, [ref], paths)
        naive_s = time.perf_counter() - start
        stream_s = streaming(model, ref, gen, work / "stream.csv", None, args.batch_size, args.workers)
        print(f"[1] naive loop {naive_s:.2f} s ({args.images / naive_s:.1f} img/s) | streaming {stream_s:.2f} s "
              f"({args.images / stream_s:.1f} img/s) | speed-up {naive_s / stream_s:.2f}x (target >= 2x)")

    cache_path = work / "cache.sqlite"
    cache_path.unlink(missing_ok=True)
    with EmbeddingCache(cache_path) as cache:
        first_s = streaming(model, ref, gen, work / "first.csv", cache, args.batch_size, args.workers)
        cached_s = streaming(model, ref, gen, work / "cached.csv", cache, args.batch_size, args.workers)
    same = (work / "first.csv").read_text() == (work / "cached.csv").read_text()
    print(f"[2] first run {first_s:.2f} s | cached re-run {cached_s:.3f} s | speed-up {first_s / cached_s:.1f}x "
          f"(target >= 20x); identical rows: {same}")
    # the cache is keyed by decoded pixels: a copy of the folder under other file names (never
    # seen, so decoded once to find its keys) runs no forward pass either
    copy = work / "gen-copy"
    copy.mkdir(exist_ok=True)
    for p in paths:
        target = copy / f"copy-{p.name}"
        if not target.exists():
            target.write_bytes(p.read_bytes())
    with EmbeddingCache(cache_path) as cache:
        copy_s = streaming(model, ref, copy, work / "copy.csv", cache, args.batch_size, args.workers)
    print(f"[2b] renamed copy of the folder (decoded for its keys, no forward pass) {copy_s:.2f} s | "
          f"first run / copy {first_s / copy_s:.1f}x")


def model_only_throughput(model, pixels, batch_sizes: list[int], repeats: int) -> dict[int, float]:
    """img/s of ``model.embed_pixels`` on preprocessed pixels for each batch size (median of
    ``repeats`` passes over ``pixels``, after one warm-up batch)."""
    import statistics

    out = {}
    for bs in batch_sizes:
        model_only_pass(model, pixels[:bs], bs)  # warm-up
        out[bs] = statistics.median(model_only_pass(model, pixels, bs)[0] for _ in range(repeats))
    return out


def model_only_pass(model, pixels, batch_size: int) -> tuple[float, float]:
    """One pass of the forward over ``pixels`` in whole batches: (img/s, process CPU ms per image)."""
    import torch

    count = (len(pixels) // batch_size) * batch_size
    wall, cpu = time.perf_counter(), time.process_time()
    for i in range(0, count, batch_size):
        model.embed_pixels(pixels[i : i + batch_size].to(model.device))
    if model.device.type == "cuda":
        torch.cuda.synchronize(model.device)
    return count / (time.perf_counter() - wall), 1000 * (time.process_time() - cpu) / count


def cli_seconds(args: argparse.Namespace, ref: Path, folder: Path, out: Path, cache: Path | None = None
                ) -> tuple[float, float]:
    """Wall and process CPU seconds of `nearid score` with its default speed settings, in this
    process (``cache``: an embedding cache file; ``None``: ``--no-cache``)."""
    from comfy_nearid.cli import main as nearid

    argv = ["score", "--reference", str(ref), str(folder), "-o", str(out), "--backbone", args.backbone,
            "--random-weights", "--device", args.device, "--no-progress", "--overwrite"]
    argv += ["--no-cache"] if cache is None else ["--cache", str(cache)]
    wall, cpu = time.perf_counter(), time.process_time()
    if nearid(argv) != 0:
        raise SystemExit(f"nearid {' '.join(argv)} failed")
    return time.perf_counter() - wall, time.process_time() - cpu


def bench_throughput(args: argparse.Namespace, work: Path) -> None:
    """[5] `nearid score` (default settings) vs the best model-only throughput, side by side.

    The batch-size sweep finds the model's best batch. Then ``--rounds`` rounds, each one
    end-to-end run of the CLI (steady state: the run on N images minus a run on one image, so
    start-up and model construction drop out) next to a model-only pass at the best batch; the
    ratio is taken per round and its median printed, so a change of load between rounds hits
    both sides alike. Process CPU time per image (all threads) is printed next to it: on a
    busy machine it says where the work goes even when wall times wander."""
    import contextlib
    import io
    import statistics

    import torch

    from comfy_nearid import load_model
    from comfy_nearid.images import load_image
    from comfy_nearid.scoring import default_batch_size

    ref = write_images(work / "ref", 1, args.side, seed=1)[0]
    folder = work / f"tp{args.images}"
    paths = write_images(folder, args.images, args.side, seed=5)
    one = work / "tp1"
    one.mkdir(exist_ok=True)
    if not (one / paths[0].name).exists():
        os.link(paths[0], one / paths[0].name)
    model = load_model(backbone=args.backbone, pretrained=False, device=args.device)
    sweep = args.sweep or ([4, 8, 16, 32, 64] if model.device.type == "cpu" else [32, 64, 128, 256])
    count = min(len(paths), max(2 * max(sweep), 64))
    pixels = model.preprocess_batch([load_image(p) for p in paths[:count]])
    print(f"model {args.backbone} (random weights, {str(model.dtype).replace('torch.', '')}) on {model.device}, "
          f"{args.images} JPEGs of {args.side}px, torch threads {torch.get_num_threads()}, CPU cores {os.cpu_count()}, "
          f"load average {os.getloadavg()[0]:.2f}")
    rates = model_only_throughput(model, pixels, sweep, repeats=args.repeats)
    best = max(rates, key=rates.get)
    default = default_batch_size(model.device)
    print("[5] model-only img/s by batch size: " + ", ".join(f"{bs}: {r:.1f}" for bs, r in rates.items())
          + f" (best {best}; the CLI default on {model.device.type} is {default})")
    start = time.thread_time()  # decode + preprocess, CPU time of one thread
    for p in paths[:count]:
        model.preprocess(load_image(p))
    decode_ms = 1000 * (time.thread_time() - start) / count

    # the CLI's OpenMP wait policy (comfy_nearid.cli.OMP_WAIT_POLICY_DEFAULT, set by main()
    # before torch loaded); the bound is the model at its best under either policy
    policy = os.environ.get("OMP_WAIT_POLICY", "unset").upper()
    other_policy = {"PASSIVE": "ACTIVE", "ACTIVE": "PASSIVE"}.get(policy) if model.device.type == "cpu" else None
    print(f"    OpenMP wait policy {policy} (the nearid command's default); model-only also under {other_policy}")
    variants = {"--no-cache": None, "fresh cache": work / "tp-cache.sqlite"} if args.with_cache else {"--no-cache": None}
    results: dict[str, list[tuple[float, float, float, float]]] = {name: [] for name in variants}
    with contextlib.redirect_stdout(io.StringIO()):  # the CLI's summary table
        cli_seconds(args, ref, one, work / "tp-warm.csv")
    for _ in range(args.rounds):
        for name, cache in variants.items():
            with contextlib.redirect_stdout(io.StringIO()):
                if cache is not None:
                    cache.unlink(missing_ok=True)
                one_wall, one_cpu = cli_seconds(args, ref, one, work / "tp-one.csv", cache)
                if cache is not None:
                    cache.unlink(missing_ok=True)
                all_wall, all_cpu = cli_seconds(args, ref, folder, work / "tp-all.csv", cache)
            model_rate, model_cpu = model_only_pass(model, pixels, best)
            other_rate = model_only_other_policy(args, work, best) if other_policy else 0.0
            # too few images to outlast start-up's noise (a smoke run): no rate, not a negative one
            e2e_rate = (args.images - 1) / (all_wall - one_wall) if all_wall > one_wall else float("nan")
            e2e_cpu = 1000 * (all_cpu - one_cpu) / (args.images - 1)
            results[name].append((e2e_rate, max(model_rate, other_rate), e2e_cpu, model_cpu, model_rate, other_rate))
    for name, rounds in results.items():
        ratios = [r[0] / r[1] for r in rounds]
        e2e_cpu, model_cpu = (statistics.median(r[k] for r in rounds) for k in (2, 3))
        print(f"    nearid score ({name}) end to end vs model-only at batch {best}, {args.rounds} rounds side by side: "
              + " | ".join(f"{r[0]:.1f} vs {r[1]:.1f} img/s" for r in rounds))
        if other_policy:
            print(f"    (model-only per round, OMP_WAIT_POLICY {policy} | {other_policy}: "
                  + ", ".join(f"{r[4]:.1f} | {r[5]:.1f}" for r in rounds) + " img/s; the better one is the bound)")
        print(f"    ratio per round {', '.join(f'{r:.2f}' for r in ratios)}: median {statistics.median(ratios):.2f} "
              f"of the model's speed (target >= 0.90)")
        print(f"    CPU time per image (all threads): end to end {e2e_cpu:.1f} ms, model-only {model_cpu:.1f} ms "
              f"(model work / end-to-end work {model_cpu / e2e_cpu:.2f})")
    cores = os.cpu_count() or 1
    bound = 1.0 / (1.0 / rates[best] + decode_ms / 1000 / cores) if model.device.type == "cpu" else rates[best]
    print(f"    decode + preprocess {decode_ms:.1f} ms CPU per image on one thread; on a CPU decode shares the "
          f"{cores} cores with the model, so the bound is {bound:.1f} img/s ({bound / rates[best]:.2f} of model-only); "
          f"load average now {os.getloadavg()[0]:.2f}")


def model_only_other_policy(args: argparse.Namespace, work: Path, batch_size: int) -> float:
    """Model-only img/s at ``batch_size`` in a fresh process under the other OpenMP wait policy
    (the runtime reads it once, when torch loads)."""
    policy = "ACTIVE" if os.environ.get("OMP_WAIT_POLICY", "").upper() == "PASSIVE" else "PASSIVE"
    out = subprocess.run(
        [sys.executable, __file__, "--model-only-child", str(batch_size), "--backbone", args.backbone,
         "--device", args.device, "--images", str(args.images), "--side", str(args.side), "--workdir", str(work)],
        env={**os.environ, "OMP_WAIT_POLICY": policy}, check=True, capture_output=True, text=True).stdout
    return float(out.strip().splitlines()[-1])


def model_only_child(args: argparse.Namespace) -> None:
    """Child of :func:`model_only_other_policy`: one model-only pass, its img/s on the last line."""
    from comfy_nearid import load_model
    from comfy_nearid.images import load_image

    paths = sorted((args.workdir / f"tp{args.images}").glob("*.jpg"))
    model = load_model(backbone=args.backbone, pretrained=False, device=args.device)
    bs = args.model_only_child
    pixels = model.preprocess_batch([load_image(p) for p in paths[: max(2 * bs, 64)]])
    model_only_pass(model, pixels[:bs], bs)  # warm-up
    print(model_only_pass(model, pixels, bs)[0])


def bench_memory(args: argparse.Namespace, work: Path) -> None:
    ref = write_images(work / "ref", 1, args.side, seed=1)[0]
    small, large = args.memory_counts
    write_images(work / f"gen{large}", large, args.side, seed=3)
    (work / f"gen{small}").mkdir(exist_ok=True)
    for i in range(small):  # the first `small` of the same images
        target = work / f"gen{small}" / f"{i:05d}.jpg"
        if not target.exists():
            os.link(work / f"gen{large}" / f"{i:05d}.jpg", target)
    peaks = {}
    for count in (small, large):
        peaks[count] = peak_rss_mib(
            ["score", "--reference", str(ref), str(work / f"gen{count}"), "-o", str(work / f"mem{count}.csv"),
             "--backbone", args.backbone, "--random-weights", "--device", "cpu", "--dtype", "fp32",
             "--batch-size", str(args.batch_size), "--no-cache", "--no-progress", "--overwrite"], cwd=work)
    growth = peaks[large] / peaks[small] - 1
    print(f"[3] peak RSS {small} images {peaks[small]:.0f} MiB | {large} images {peaks[large]:.0f} MiB | "
          f"growth {100 * growth:+.1f}% (target within 10%)")


def _tiny_stable_diffusion():
    import torch
    from diffusers import AutoencoderKL, DDIMScheduler, StableDiffusionPipeline, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTokenizer

    vocab = {"<|startoftext|>": 0, "<|endoftext|>": 1}
    for c in "abcdefghijklmnopqrstuvwxyz":
        vocab[c] = len(vocab)
        vocab[c + "</w>"] = len(vocab)
    torch.manual_seed(0)
    unet = UNet2DConditionModel(
        block_out_channels=(32, 64), layers_per_block=1, sample_size=16, in_channels=4, out_channels=4,
        down_block_types=("DownBlock2D", "CrossAttnDownBlock2D"), up_block_types=("CrossAttnUpBlock2D", "UpBlock2D"),
        cross_attention_dim=32, norm_num_groups=8, attention_head_dim=4)
    vae = AutoencoderKL(block_out_channels=[8, 16], in_channels=3, out_channels=3, latent_channels=4,
                        down_block_types=["DownEncoderBlock2D"] * 2, up_block_types=["UpDecoderBlock2D"] * 2,
                        norm_num_groups=4, sample_size=32)
    text = CLIPTextModel(CLIPTextConfig(bos_token_id=0, eos_token_id=1, pad_token_id=1, hidden_size=32,
                                        intermediate_size=64, num_attention_heads=4, num_hidden_layers=2,
                                        vocab_size=len(vocab), max_position_embeddings=16))
    pipe = StableDiffusionPipeline(
        unet=unet, vae=vae, text_encoder=text, tokenizer=CLIPTokenizer(vocab=vocab, merges=[], model_max_length=16),
        scheduler=DDIMScheduler(beta_schedule="scaled_linear", beta_start=0.00085, beta_end=0.012,
                                clip_sample=False, set_alpha_to_one=False, steps_offset=1),
        safety_checker=None, feature_extractor=None, image_encoder=None, requires_safety_checker=False)
    pipe.set_progress_bar_config(disable=True)
    return pipe


def bench_early_rejection(args: argparse.Namespace) -> None:
    from comfy_nearid import load_model
    from comfy_nearid.best_of_n import EarlyRejection, best_of_n

    pipe = _tiny_stable_diffusion()
    model = load_model(backbone="tiny-siglip", pretrained=False, device="cpu", dtype="fp32")
    rng = np.random.default_rng(4)
    refs = [Image.fromarray(rng.integers(0, 256, size=(32, 32, 3), dtype=np.uint8))]
    kwargs = dict(num_inference_steps=args.steps, height=32, width=32, guidance_scale=1.0)
    prompts = ["a toy", "a red mug", "a dog"]
    start = time.perf_counter()
    full = best_of_n(pipe, refs, model, prompt=prompts, n=args.n, **kwargs)
    full_s = time.perf_counter() - start
    rule = EarlyRejection(at_step=args.steps // 4)
    start = time.perf_counter()
    early = best_of_n(pipe, refs, model, prompt=prompts, n=args.n, early_rejection=rule, **kwargs)
    early_s = time.perf_counter() - start
    steps_full = sum(r.steps_run for r in full)
    steps_early = sum(r.steps_run for r in early)
    agree = sum(f.best.seed == e.best.seed for f, e in zip(full, early))
    print(f"[4] best-of-{args.n}, {args.steps} steps, preview after step {rule.at_step}, {len(prompts)} prompts: "
          f"steps {steps_early}/{steps_full} ({100 * (1 - steps_early / steps_full):.0f}% saved) | "
          f"wall {early_s:.2f} s vs {full_s:.2f} s ({full_s / early_s:.2f}x) | same best seed {agree}/{len(prompts)}")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--images", type=int, default=1000)
    parser.add_argument("--side", type=int, default=512, help="image side in pixels")
    parser.add_argument("--backbone", default="small-siglip")
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument("--memory-counts", type=int, nargs=2, default=(200, 2000))
    parser.add_argument("--n", type=int, default=8, help="candidates per prompt (early rejection)")
    parser.add_argument("--steps", type=int, default=20, help="denoising steps (early rejection)")
    parser.add_argument("--device", default="cpu", help="device of the throughput benchmark [5] (cpu, cuda)")
    parser.add_argument("--sweep", type=int, nargs="+", default=None, help="model-only batch sizes for [5]")
    parser.add_argument("--repeats", type=int, default=3, help="model-only passes per batch size for [5]")
    parser.add_argument("--rounds", type=int, default=3,
                        help="[5]: end-to-end runs, each beside a model-only pass; the median ratio is printed")
    parser.add_argument("--with-cache", action="store_true",
                        help="[5]: also time the CLI with a fresh embedding cache (its default) besides --no-cache")
    parser.add_argument("--workdir", type=Path, default=None, help="keep the images here (default: a temp dir)")
    parser.add_argument("--only", choices=("speed", "cache", "memory", "early", "throughput"), action="append",
                        default=None, help="parts to run (cache: only the cached re-run of part 2)")
    parser.add_argument("--model-only-child", type=int, default=None, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.model_only_child is not None:
        model_only_child(args)
        return 0
    parts = args.only or ["speed", "memory", "early", "throughput"]
    if "throughput" in parts:  # [5] runs the CLI in this process: the same OpenMP policy as `nearid`
        from comfy_nearid.cli import default_openmp_policy

        default_openmp_policy(os.environ, "torch" in sys.modules, "score")
    with tempfile.TemporaryDirectory(prefix="nearid-bench-") as tmp:
        work = args.workdir or Path(tmp)
        work.mkdir(parents=True, exist_ok=True)
        if "speed" in parts or "cache" in parts:
            bench_speed_and_cache(args, work, streaming_speed="speed" in parts)
        if "memory" in parts:
            bench_memory(args, work)
        if "throughput" in parts:
            bench_throughput(args, work)
        if "early" in parts:
            bench_early_rejection(args)
    return 0


if __name__ == "__main__":
    sys.exit(main())
