"""Load NearID Model on the paper's transformers release: first load (hash + convert + keep the
conversion) against the second load (conversion read back from the cache) and against loading
the equivalent head file + backbone file (what ``nearid convert`` output costs), side by side.

    python benchmarks/bench_release_load.py                            # small-siglip shape
    python benchmarks/bench_release_load.py --backbone siglip2-so400m  # the paper's size (1.7 GB file)

The release is written by a random-weight transformers ``SiglipVisionModel`` of the registry
backbone's shape (the weights do not change the timings). Each measurement runs ``--repeats``
times (a fresh cache for every first load); medians and ranges are printed, with the ratios.
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import shutil
import statistics
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--backbone", default="small-siglip", help="registry SigLIP backbone whose shape the release has")
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--workdir", default=None, help="folder for the files (default: a temporary folder)")
    return p.parse_args(argv)


def _loader_module():
    """The node pack's loader, imported the way ComfyUI imports the pack (never as ``nodes``)."""
    name = "comfy_nearid_pack_bench"
    spec = importlib.util.spec_from_file_location(name, REPO / "__init__.py", submodule_search_locations=[str(REPO)])
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module
    spec.loader.exec_module(module)
    return sys.modules[name + ".nodes.loader"]


def write_release(backbone: str, path: Path) -> None:
    """A transformers SiglipVisionModel of ``backbone``'s shape, saved as a 5.x-layout release."""
    import torch
    from safetensors.torch import save_file
    from transformers import SiglipVisionConfig, SiglipVisionModel

    from comfy_nearid import get_backbone_spec
    from comfy_nearid.convert import _siglip_shape

    spec = get_backbone_spec(backbone)
    width, patch, _, depth, mlp = _siglip_shape(backbone)
    cfg = SiglipVisionConfig(hidden_size=width, intermediate_size=mlp, num_hidden_layers=depth,
                             num_attention_heads=spec.head.num_heads, image_size=spec.image_size,
                             patch_size=patch, hidden_act="gelu_pytorch_tanh", layer_norm_eps=1e-6)
    with torch.device("meta"):
        model = SiglipVisionModel(cfg)
    model = model.to_empty(device="cpu")
    gen = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for p in model.parameters():
            p.normal_(0.0, 0.02, generator=gen)
    state = {"backbone." + k.removeprefix("vision_model."): v.contiguous() for k, v in model.state_dict().items()}
    path.parent.mkdir(parents=True, exist_ok=True)
    save_file(state, str(path), metadata={"format": "pt"})
    cfg.to_json_file(str(path.parent / "config.json"))


def _summary(values: list[float]) -> str:
    return f"{statistics.median(values):.3f} s (range {min(values):.3f}-{max(values):.3f})"


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    import torch

    torch.set_num_threads(args.threads)
    from comfy_nearid import load_model
    from comfy_nearid.convert import write_converted

    loader = _loader_module()
    work = Path(args.workdir or tempfile.mkdtemp(prefix="nearid-release-bench-"))
    release = work / "models" / "nearid" / "nearid-release" / "model.safetensors"
    t = time.perf_counter()
    write_release(args.backbone, release)
    print(f"release written: {release.stat().st_size / 1e6:.0f} MB in {time.perf_counter() - t:.1f} s")
    head, bb = write_converted(release, work / "converted" / "head.safetensors",
                               out_backbone=work / "converted" / "backbone.safetensors")
    cache = release.parent / ".nearid-cache"
    first, second, head_file = [], [], []
    for _ in range(args.repeats):
        shutil.rmtree(cache, ignore_errors=True)
        loader.clear_cache()
        t = time.perf_counter()
        _, report = loader.load_cached(str(release), device="cpu", dtype="fp32")
        first.append(time.perf_counter() - t)
        assert report.conversion == "converted", report
        loader.clear_cache()
        t = time.perf_counter()
        _, report = loader.load_cached(str(release), device="cpu", dtype="fp32")
        second.append(time.perf_counter() - t)
        assert report.conversion == "reused", report
        t = time.perf_counter()
        load_model(head=head, backbone_weights=bb, device="cpu", dtype="fp32")
        head_file.append(time.perf_counter() - t)
    med = {k: statistics.median(v) for k, v in (("first", first), ("second", second), ("head", head_file))}
    print(f"backbone {args.backbone}, {args.repeats} runs, {args.threads} threads")
    print(f"  release, first load (hash + convert + cache): {_summary(first)}")
    print(f"  release, second load (cached conversion):     {_summary(second)}")
    print(f"  head file + backbone file (nearid convert):   {_summary(head_file)}")
    print(json.dumps({"second_over_first": round(med["second"] / med["first"], 3),
                      "second_over_head_file": round(med["second"] / med["head"], 3)}))
    if args.workdir is None:
        shutil.rmtree(work, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
