"""Levers for the demo's MobileNetV2 tokens, measured on cached backbone maps (issue 21).

Two phases, both on a generated synthetic benchmark (``nearid synth`` / the demo's ``data/``):

``extract``: every view and distractor of the train and test splits goes through the frozen
MobileNetV2 once; the maps a token construction may use are kept in float16 memory maps:
the stride-4 map (24 ch, average-pooled to the token grid), the stride-8 map (32 ch, full
resolution), the stride-16 maps after block 10 (64 ch) and block 13 (96 ch), the stride-32
map (160 ch) and the input pixels (RGB in 0..1) average-pooled to 8x8-pixel cells.

``train``: for each token variant (built from the cached maps in numpy/torch, no backbone
pass) trains the NearID head with the two-tier objective on the training identities (the
demo's recipe: AdamW lr 1e-3, batch 64, warm-up + cosine, P=2, K=3, best of validation SSR)
and prints SSR / PA per test level (held-out categories) and the validation SSR per epoch.

    python benchmarks/bench_demo_tokens.py extract --data runs/demo/data --cache runs/tok224
    python benchmarks/bench_demo_tokens.py train --cache runs/tok224 --variant base --variant base+s8pool
    python benchmarks/bench_demo_tokens.py cost      # backbone pass per image: v1 vs v2 tokens, 224 vs 320 px

Variants: ``base`` is the version-1 construction (stride-16 + upsampled stride-32, one layer
norm); ``+s8pool`` / ``+s8max`` / ``+s8cells`` add the stride-8 map (2x2 average / max /
space-to-depth), ``+s4pool`` the stride-4 map, ``+s16a`` the block-10 stride-16 map, ``+rgb``
the mean and standard deviation of the pixels under each token, ``+rgbn`` the same of the
normalised pixels, ``+rgbcells`` the four 8x8 sub-cell means, ``+s8tok`` the stride-8 map as
784 extra tokens; with any addition every group is layer-normalised on its own (``+joint``:
one layer norm over all).
"""

from __future__ import annotations

import argparse
import json
import math
import time
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

LEVELS = ("object", "colour", "part")
IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
SLOTS = 12  # 3 views, then 3 distractors for each level
MAPS = {  # name -> (channels, side divisor of the input)
    "s4": (24, 16),  # stride-4 map pooled to the stride-16 grid
    "s8": (32, 8),
    "s16a": (64, 16),
    "s16": (96, 16),
    "s32": (160, 32),
    "rgb8": (3, 8),  # pixel means over 8x8 cells
}


def image_paths(data: Path, split: str) -> tuple[list[str], list[str]]:
    ids = sorted(p.name for p in (data / split).iterdir() if p.is_dir())
    paths = []
    for sid in ids:
        root = data / split / sid
        paths += [str(root / f"view{k}.png") for k in (1, 2, 3)]
        for level in LEVELS:
            paths += [str(root / level / f"distractor{k}.png") for k in (1, 2, 3)]
    return ids, paths


def extract(args: argparse.Namespace) -> None:
    from PIL import Image

    from dataclasses import replace

    from comfy_nearid.backbones import build_backbone, get_backbone_spec

    spec = get_backbone_spec("mobilenet-v2")
    if args.image_size:
        spec = replace(spec, image_size=args.image_size)
    backbone = build_backbone(spec)
    size = spec.image_size
    feats = backbone.trunk.features
    pre = spec.preprocess
    mean = torch.tensor(spec.mean).view(1, 3, 1, 1)
    std = torch.tensor(spec.std).view(1, 3, 1, 1)
    out = Path(args.cache)
    out.mkdir(parents=True, exist_ok=True)
    torch.set_num_threads(args.threads)
    for split in args.splits.split(","):
        ids, paths = image_paths(Path(args.data), split)
        n = len(paths)
        arrays = {name: np.lib.format.open_memmap(out / f"{split}_{name}.npy", mode="w+", dtype=np.float16,
                                                  shape=(n, c, size // d, size // d))
                  for name, (c, d) in MAPS.items()}
        t0 = time.perf_counter()
        for start in range(0, n, args.batch):
            batch = [Image.open(p).convert("RGB") for p in paths[start:start + args.batch]]
            x = torch.stack([pre(im) for im in batch]).contiguous(memory_format=torch.channels_last)
            with torch.inference_mode():
                s4 = feats[:4](x)
                s8 = feats[4:7](s4)
                s16a = feats[7:11](s8)
                s16 = feats[11:14](s16a)
                s32 = feats[14:17](s16)
                rgb = (x * std + mean).clamp(0, 1)
                maps = {"s4": F.avg_pool2d(s4, 4), "s8": s8, "s16a": s16a, "s16": s16, "s32": s32,
                        "rgb8": F.avg_pool2d(rgb, 8)}
            for name, t in maps.items():
                arrays[name][start:start + len(batch)] = t.float().numpy().astype(np.float16)
            if start % (args.batch * 20) == 0:
                rate = (start + len(batch)) / (time.perf_counter() - t0)
                print(f"{split}: {start + len(batch)}/{n} images, {rate:.1f}/s", flush=True)
        for a in arrays.values():
            a.flush()
        cats = [json.loads((Path(args.data) / split / sid / "sample.json").read_text())["category"] for sid in ids]
        (out / f"{split}_categories.json").write_text(json.dumps(cats))
        meta = {"image_size": size, "ids": ids, "images": n, "seconds": round(time.perf_counter() - t0, 1)}
        (out / f"{split}_meta.json").write_text(json.dumps(meta))


# --------------------------------------------------------------------------- token variants


def _ln(x: torch.Tensor) -> torch.Tensor:
    """Layer norm over channels of ``[B, C, H, W]`` (per position)."""
    return F.layer_norm(x.permute(0, 2, 3, 1), (x.shape[1],)).permute(0, 3, 1, 2)


def _cell_stats(rgb8: torch.Tensor, cell: int) -> torch.Tensor:
    """Per token-cell colour statistics from the 8x8-pixel RGB means ``[B, 3, H8, W8]``:
    mean and standard deviation over the ``cell x cell`` sub-cells -> ``[B, 6, H8/cell, W8/cell]``."""
    m = F.avg_pool2d(rgb8, cell)
    sq = F.avg_pool2d(rgb8.square(), cell)
    return torch.cat([m, (sq - m.square()).clamp_min(0).sqrt()], 1)


def build_tokens(maps: dict[str, torch.Tensor], variant: str) -> torch.Tensor:
    """Tokens ``[B, N, D]`` of ``variant`` from the cached maps (float32)."""
    s16, s32 = maps["s16"], maps["s32"]
    grid = s16.shape[-2:]
    up32 = F.interpolate(s32, size=grid, mode="nearest")
    parts = variant.split("+")
    groups: list[torch.Tensor] = []
    extra: list[torch.Tensor] = []
    joint = "joint" in parts  # one layer norm over everything (as today) instead of per group
    base = torch.cat([s16, up32], 1)
    groups.append(base)
    for p in parts:
        if p in ("base", "joint"):
            continue
        if p == "s8pool":
            groups.append(F.avg_pool2d(maps["s8"], 2))
        elif p == "s8max":
            groups.append(F.max_pool2d(maps["s8"], 2))
        elif p == "s8cells":  # the 2x2 stride-8 cells of each token side by side (space to depth)
            groups.append(F.pixel_unshuffle(maps["s8"], 2))
        elif p == "s4pool":
            groups.append(maps["s4"])
        elif p == "s16a":
            groups.append(maps["s16a"])
        elif p == "rgb":  # mean + std of the pixels under each token
            groups.append(_cell_stats(maps["rgb8"], 2))
        elif p == "rgbn":  # the same statistics of the normalised pixels (the values the network sees)
            m = torch.tensor(IMAGENET_MEAN).view(1, 3, 1, 1)
            sd = torch.tensor(IMAGENET_STD).view(1, 3, 1, 1)
            stats = _cell_stats(maps["rgb8"], 2)
            groups.append(torch.cat([(stats[:, :3] - m) / sd, stats[:, 3:] / sd], 1))
        elif p == "rgbcells":  # the 4 sub-cell means
            groups.append(F.pixel_unshuffle(maps["rgb8"], 2))
        elif p == "s8tok":  # the stride-8 map as extra tokens (its own layer norm, zero padded)
            extra.append(maps["s8"])
        else:
            raise ValueError(f"unknown variant part {p!r}")
    if joint:
        x = _ln(torch.cat(groups, 1))
    else:
        # each group layer-normalised on its own, scaled so every group weighs by its width
        x = torch.cat([_ln(g) if g.shape[1] > 1 else g for g in groups], 1)
    tokens = x.flatten(2).transpose(1, 2)
    if extra:
        e = torch.cat([_ln(t) for t in extra], 1)
        pad = tokens.shape[-1] - e.shape[1]
        e = F.pad(e.flatten(2).transpose(1, 2), (0, pad))
        tokens = torch.cat([tokens, e], 1)
    return tokens


def pad_width(d: int, heads: int = 4) -> int:
    return int(math.ceil(d / heads) * heads)


class TokenStore:
    """Cached maps of one split; tokens of a variant, built once and kept in memory (fp16)."""

    def __init__(self, cache: Path, split: str, variant: str, max_ids: int = 0, chunk: int = 512) -> None:
        arrays = {n: np.load(cache / f"{split}_{n}.npy", mmap_mode="r") for n in MAPS}
        n = len(arrays["s16"]) if not max_ids else max_ids * SLOTS
        out = []
        for start in range(0, n, chunk):
            maps = {k: torch.from_numpy(np.asarray(a[start:start + chunk], dtype=np.float32)) for k, a in arrays.items()}
            out.append(build_tokens(maps, variant).half())
        tokens = torch.cat(out)
        d = pad_width(tokens.shape[-1])
        self.tokens = F.pad(tokens, (0, d - tokens.shape[-1]))  # [images, N, D]
        self.n_ids = n // SLOTS

    def get(self, index: torch.Tensor) -> torch.Tensor:
        return self.tokens[index].float()


# --------------------------------------------------------------------------- training and metrics


def slot_index(ids: np.ndarray, slot: np.ndarray) -> np.ndarray:
    return ids * SLOTS + slot


def embed_all(head, store: TokenStore, rows: np.ndarray, batch: int = 512) -> torch.Tensor:
    outs = []
    with torch.inference_mode():
        for s in range(0, len(rows), batch):
            outs.append(head(store.get(torch.from_numpy(rows[s:s + batch]))))
    return torch.cat(outs)


def level_margins(head, store: TokenStore, ids: np.ndarray, level: str) -> np.ndarray:
    """Margins ``[S, 6]`` (PROTOCOL section 4) of the identities ``ids`` at ``level``."""
    from comfy_nearid.metrics.ssr import margins_from_similarities

    li = LEVELS.index(level)
    views = embed_all(head, store, np.concatenate([slot_index(ids, np.full_like(ids, k)) for k in range(3)]))
    dis = embed_all(head, store, np.concatenate([slot_index(ids, np.full_like(ids, 3 + 3 * li + k)) for k in range(3)]))
    n = len(ids)
    v = views.view(3, n, -1).transpose(0, 1)  # [S, 3, D]
    d = dis.view(3, n, -1).transpose(0, 1)
    view_sims = torch.einsum("sid,sjd->sij", v, v).numpy()
    own = (v * d).sum(-1).numpy()
    return margins_from_similarities(view_sims, own)


def pair_cosines(head, store: TokenStore, ids: np.ndarray, levels: list[str]) -> tuple[np.ndarray, np.ndarray]:
    """Same-identity cosines (view pairs) and near-identity cosines (view vs its own
    distractor, every level in ``levels``), as :func:`comfy_nearid.calibration.pairs_from_table`."""
    views = embed_all(head, store, np.concatenate([slot_index(ids, np.full_like(ids, k)) for k in range(3)]))
    v = views.view(3, len(ids), -1).transpose(0, 1)
    sims = torch.einsum("sid,sjd->sij", v, v).numpy()
    same = np.concatenate([sims[:, 0, 1], sims[:, 0, 2], sims[:, 1, 2]])
    near = []
    for lv in levels:
        li = LEVELS.index(lv)
        d = embed_all(head, store, np.concatenate([slot_index(ids, np.full_like(ids, 3 + 3 * li + k)) for k in range(3)]))
        near.append((v * d.view(3, len(ids), -1).transpose(0, 1)).sum(-1).numpy().reshape(-1))
    return same, np.concatenate(near)


def calibration_check(head, train: TokenStore, test: TokenStore, val_ids: np.ndarray, levels: list[str]) -> dict:
    """Fit the identity-match curve on the validation identities' pairs (the trained levels),
    report it on the test identities: the trained levels pooled and the object level."""
    from comfy_nearid.calibration import fit_logistic, reliability_report

    cal = fit_logistic(*pair_cosines(head, train, val_ids, levels))
    out = {"midpoint": round(cal.midpoint, 4), "slope": round(cal.slope, 2)}
    test_ids = np.arange(test.n_ids)
    for name, lv in (("trained", levels), ("object", ["object"])):
        r = reliability_report(cal, *pair_cosines(head, test, test_ids, lv))
        out[name] = {"ece": round(r.ece, 4), "acc50": round(100 * r.accuracy_at_50, 1),
                     "best": round(100 * r.best_accuracy, 1)}
    return out


def ssr_pa(margins: np.ndarray) -> tuple[float, float]:
    from comfy_nearid.metrics.ssr import ssr_stats

    s = ssr_stats(margins)
    return s.ssr, s.pa  # percent


def train_variant(cache: Path, variant: str, levels: list[str], epochs: int, seed: int, mode: str,
                  negatives: int = 3, lr: float = 1e-3, batch: int = 64, eval_every: int = 0,
                  train_ids: int = 0, val_by: str = "identity") -> dict:
    from comfy_nearid.head import HeadConfig, NearIDHead
    from trainer.losses import two_tier_infonce

    t0 = time.perf_counter()
    train = TokenStore(cache, "train", variant, max_ids=train_ids)
    test = TokenStore(cache, "test", variant)
    build_s = time.perf_counter() - t0
    d = train.tokens.shape[-1]
    torch.manual_seed(seed)
    head = NearIDHead(HeadConfig(dim=d, num_heads=4, mlp_dim=4 * d))
    rng = np.random.default_rng(seed)
    n_val = int(round(train.n_ids * 0.1))
    if val_by == "category":  # whole training categories held out until >= 10% of the identities
        cats = np.array(json.loads((cache / "train_categories.json").read_text())[: train.n_ids])
        val_mask = np.zeros(train.n_ids, bool)
        for c in rng.permutation(np.unique(cats)):
            if val_mask.sum() >= n_val:
                break
            val_mask |= cats == c
        val_ids, train_ids = np.flatnonzero(val_mask), rng.permutation(np.flatnonzero(~val_mask))
    else:
        order = rng.permutation(train.n_ids)
        val_ids, train_ids = np.sort(order[:n_val]), order[n_val:]
    per_epoch = len(train_ids) // batch
    total = epochs * per_epoch
    warmup = max(1, min(20, total // 10))
    opt = torch.optim.AdamW(head.parameters(), lr=lr, weight_decay=1e-4)
    sched = torch.optim.lr_scheduler.LambdaLR(
        opt, lambda s: (s + 1) / warmup if s < warmup else 0.5 * (1 + math.cos(math.pi * (s - warmup) / max(1, total - warmup))))
    level_idx = [LEVELS.index(lv) for lv in levels]
    best = (-1.0, None, 0)
    history = []
    step = 0
    eval_every = eval_every or per_epoch
    t_train = time.perf_counter()
    for epoch in range(epochs):
        perm = rng.permutation(train_ids)
        for b in range(per_epoch):
            ids = perm[b * batch:(b + 1) * batch]
            anchor = rng.integers(0, 3, size=len(ids))
            pos = np.stack([(anchor + 1) % 3, (anchor + 2) % 3], 1)
            if mode == "one_source":
                lv = np.array(level_idx)[rng.integers(0, len(level_idx), size=len(ids))]
                # the anchor's own distractor first, then the other two views' ones
                neg = 3 + 3 * lv[:, None] + np.stack([anchor, (anchor + 1) % 3, (anchor + 2) % 3], 1)
                neg = neg[:, :negatives]
            else:  # all_sources: the anchor's own distractors of every level first
                own = np.stack([3 + 3 * li + anchor for li in level_idx], 1)
                rest = np.stack([3 + 3 * li + (anchor + o) % 3 for li in level_idx for o in (1, 2)], 1)
                for r in range(len(ids)):
                    rng.shuffle(own[r])
                    rng.shuffle(rest[r])
                neg = np.concatenate([own, rest], 1)[:, :negatives]
            slots = np.concatenate([anchor[:, None], pos, neg], 1)  # [B, 1+2+K]
            rows = torch.from_numpy(slot_index(ids[:, None], slots).reshape(-1))
            emb = head(train.get(rows)).view(len(ids), slots.shape[1], -1)
            k = neg.shape[1]
            loss = two_tier_infonce(emb[:, 0], emb[:, 1:3], emb[:, 3:], torch.ones(len(ids), 2, dtype=torch.bool),
                                    torch.ones(len(ids), k, dtype=torch.bool))
            opt.zero_grad()
            loss.backward()
            torch.nn.utils.clip_grad_norm_(head.parameters(), 1.0)
            opt.step()
            sched.step()
            step += 1
            if step % eval_every == 0 or step == total:
                head.eval()
                val = {lv: ssr_pa(level_margins(head, train, val_ids, lv))[0] for lv in levels}
                score = float(np.mean(list(val.values())))
                history.append({"step": step, "epoch": round(step / per_epoch, 2), "val_ssr": val,
                                "test_object_ssr": ssr_pa(level_margins(head, test, np.arange(test.n_ids), "object"))[0]})
                if score > best[0]:
                    best = (score, {k: v.clone() for k, v in head.state_dict().items()}, step)
                head.train()
    train_s = time.perf_counter() - t_train
    head.load_state_dict(best[1])
    head.eval()
    test_ids = np.arange(test.n_ids)
    result = {"variant": variant, "dim": d, "tokens": train.tokens.shape[1], "levels": levels, "mode": mode,
              "negatives": negatives, "epochs": epochs, "steps": total, "seed": seed, "best_step": best[2],
              "build_s": round(build_s, 1), "train_s": round(train_s, 1),
              "s_per_step": round(train_s / total, 4), "val_by": val_by, "n_val": len(val_ids),
              "n_train": len(train_ids), "history": history}
    result["calibration"] = calibration_check(head, train, test, val_ids, levels)
    for lv in LEVELS:
        ssr, pa = ssr_pa(level_margins(head, test, test_ids, lv))
        result[lv] = {"ssr": round(ssr, 1), "pa": round(pa, 1)}
    return result


def run_train(args: argparse.Namespace) -> None:
    torch.set_num_threads(args.threads)
    out = Path(args.results) if args.results else None
    for variant in args.variant:
        for seed in args.seed:
            r = train_variant(Path(args.cache), variant, args.levels.split(","), args.epochs, seed, args.mode,
                              negatives=args.negatives, lr=args.lr, batch=args.batch, eval_every=args.eval_every,
                              train_ids=args.train_ids, val_by=args.val_by)
            line = (f"{variant:28s} levels={args.levels:18s} mode={args.mode:11s} K={args.negatives} ep={args.epochs:2d} "
                    f"seed={seed} D={r['dim']} N={r['tokens']} best@{r['best_step']}/{r['steps']} "
                    + " ".join(f"{lv} {r[lv]['ssr']:5.1f}/{r[lv]['pa']:5.1f}" for lv in LEVELS)
                    + f"  {r['s_per_step']:.3f} s/step val={args.val_by} "
                    + "ECE obj {0[object][ece]:.3f} ({0[object][acc50]}/{0[object][best]}) trained {0[trained][ece]:.3f} "
                      "({0[trained][acc50]}/{0[trained][best]})".format(r["calibration"]))
            print(line, flush=True)
            if out:
                with out.open("a") as f:
                    f.write(json.dumps(r) + "\n")


def cost(args: argparse.Namespace) -> None:
    """Side-by-side per-image cost of the backbone pass: the registry's mobilenet-v2 tokens at
    224 px (version 2), the version-1 tokens (stride-16 + stride-32 only) at 224 px, and the
    version-2 tokens at a larger input; interleaved repeats, medians, ratios to version 1."""
    from dataclasses import replace

    from comfy_nearid.backbones import Backbone, build_backbone, get_backbone_spec

    torch.set_num_threads(args.threads)
    spec = get_backbone_spec("mobilenet-v2")
    backbone = build_backbone(spec, pretrained=False)
    big = Backbone(replace(spec, image_size=args.large), backbone.trunk)
    feats = backbone.trunk.features

    def v1(x: torch.Tensor) -> torch.Tensor:
        s16 = feats[:14](x)
        s32 = feats[14:17](s16)
        t = torch.cat([s16, F.interpolate(s32, size=s16.shape[-2:], mode="nearest")], 1).flatten(2).transpose(1, 2)
        return F.layer_norm(t, t.shape[-1:])

    x224 = torch.randn(args.batch, 3, 224, 224).contiguous(memory_format=torch.channels_last)
    xbig = torch.randn(args.batch, 3, args.large, args.large).contiguous(memory_format=torch.channels_last)
    runs = {"v1 tokens 224 px": lambda: v1(x224), "v2 tokens 224 px": lambda: backbone(x224),
            f"v2 tokens {args.large} px": lambda: big(xbig)}
    times: dict[str, list[float]] = {k: [] for k in runs}
    with torch.inference_mode():
        for _ in range(args.repeats + 1):
            for name, fn in runs.items():
                t0 = time.perf_counter()
                fn()
                times[name].append(time.perf_counter() - t0)
    ref = float(np.median(times["v1 tokens 224 px"][1:]))
    for name, ts in times.items():
        med = float(np.median(ts[1:]))
        print(f"{name:22s} {1000 * med / args.batch:7.2f} ms/image  ratio to v1 224 px: {med / ref:.2f}")


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    sub = p.add_subparsers(dest="command", required=True)
    e = sub.add_parser("extract")
    e.add_argument("--data", required=True)
    e.add_argument("--cache", required=True)
    e.add_argument("--batch", type=int, default=32)
    e.add_argument("--image-size", type=int, default=0)
    e.add_argument("--splits", default="train,test")
    e.add_argument("--threads", type=int, default=2)
    t = sub.add_parser("train")
    t.add_argument("--cache", required=True)
    t.add_argument("--variant", action="append", required=True)
    t.add_argument("--levels", default="object")
    t.add_argument("--mode", default="one_source", choices=["one_source", "all_sources"])
    t.add_argument("--negatives", type=int, default=3)
    t.add_argument("--epochs", type=int, default=12)
    t.add_argument("--lr", type=float, default=1e-3)
    t.add_argument("--batch", type=int, default=64)
    t.add_argument("--seed", type=int, action="append", default=None)
    t.add_argument("--eval-every", type=int, default=0)
    t.add_argument("--threads", type=int, default=2)
    t.add_argument("--train-ids", type=int, default=0, help="use only the first N training identities")
    t.add_argument("--val-by", default="identity", choices=["identity", "category"])
    t.add_argument("--results", default="")
    c = sub.add_parser("cost")
    c.add_argument("--batch", type=int, default=16)
    c.add_argument("--repeats", type=int, default=5)
    c.add_argument("--large", type=int, default=320)
    c.add_argument("--threads", type=int, default=2)
    args = p.parse_args(argv)
    if args.command == "extract":
        extract(args)
    elif args.command == "cost":
        cost(args)
    else:
        args.seed = args.seed or [0]
        run_train(args)


if __name__ == "__main__":
    main()
