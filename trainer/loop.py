"""The training loop, in the shape of Accelerate's own examples.

``Accelerator(mixed_precision, gradient_accumulation_steps, project_config)`` -> ``set_seed``
-> frozen backbone + trainable head -> AdamW + warm-up/cosine -> one ``prepare(...)`` ->
``accumulate`` / ``backward`` / ``clip_grad_norm_`` -> crash-safe ``save_state`` every N steps,
``--resume latest|PATH`` with ``skip_first_batches`` -> validation SSR/PA keeping the best head
-> the head exported with :func:`comfy_nearid.checkpoint.save_head` and its provenance.
"""

from __future__ import annotations

import copy
import logging
import math
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch.utils.data import DataLoader

from comfy_nearid.errors import ConfigError, DatasetError, NearIDError
from comfy_nearid.launch import hold_if_requested, prepare_process_group
from comfy_nearid.malloc import keep_freed_memory
from comfy_nearid.model import embed_tokens

from .checkpointing import TrainingProgress, remove_stale_temporaries, resolve_resume, save_checkpoint
from .config import TrainConfig, config_to_dict, write_config
from .data import (
    DatasetLayout,
    EpochSampler,
    TrainingExamples,
    collate_examples,
    open_dataset,
    scan_layout,
    split_validation,
)
from .losses import LocalGather, TorchDistributedGather, TwoTierStats, two_tier_terms
from .validation import (
    EvalResult,
    cached_head_embedder,
    evaluate_layout,
    format_result,
    is_better,
    live_embedder,
)

logger = logging.getLogger(__name__)

TOKEN_DTYPES = {"float16": torch.float16, "float32": torch.float32}

# For tests of interruption (Ctrl-C, SIGKILL): with this set to N, every process stops after
# optimizer step N (its checkpoint, if one is due, written) and waits there until a signal
# ends it, so the signal can never arrive after the run has already finished.
HOLD_AFTER_STEP_ENV = "NEARID_TRAIN_HOLD_AFTER_STEP"

__all__ = ["TrainResult", "TrainingDivergedError", "train", "warmup_cosine"]


class TrainingDivergedError(NearIDError, RuntimeError):
    """The loss became NaN or infinite; the message names the step, the batch's sample ids and
    the last good checkpoint."""


@dataclass
class TrainResult:
    """What a run produced. Metrics are filled on the main process (None elsewhere)."""

    run_dir: Path
    head_path: Path  # the exported head: the best by validation, else the last
    last_head_path: Path
    best_head_path: Path | None
    config_path: Path
    global_step: int
    epochs_completed: int
    samples_seen: int
    final_loss: float
    best_step: int
    best_validation: dict[str, Any] | None = None
    last_validation: dict[str, Any] | None = None
    test: dict[str, Any] | None = None
    baseline: dict[str, Any] | None = None
    seconds: float = 0.0
    checkpoints_dir: Path | None = None
    resumed_from: Path | None = None


def warmup_cosine(step: int, warmup: int, total: int, min_ratio: float = 0.0, schedule: str = "cosine") -> float:
    """LR multiplier: linear warm-up over ``warmup`` steps, then cosine decay to ``min_ratio``
    at ``total`` (``schedule="constant"``: 1 after the warm-up)."""
    if warmup > 0 and step < warmup:
        return (step + 1) / warmup
    if schedule == "constant":
        return 1.0
    span = max(1, total - warmup)
    progress = min(1.0, (step - warmup) / span)
    return min_ratio + (1.0 - min_ratio) * 0.5 * (1.0 + math.cos(math.pi * progress))


# --------------------------------------------------------------------------- setup helpers


def _reset_accelerate_state() -> None:
    """Let ``train`` run several times in one process (tests, the demo): Accelerate keeps a
    process-wide state that refuses a second, different configuration."""
    import torch.distributed as dist
    from accelerate.state import AcceleratorState, GradientState

    if not (dist.is_available() and dist.is_initialized()):
        AcceleratorState._reset_state(reset_partial_state=True)
        GradientState._reset_state()


def _make_accelerator(config: TrainConfig, run_dir: Path):
    from accelerate import Accelerator
    from accelerate.utils import DataLoaderConfiguration, ProjectConfiguration

    from .tracking import CSVTracker

    trackers: list[Any] = []
    if config.logging.tracker == "csv":
        trackers.append(CSVTracker("nearid", run_dir / "logs"))
    elif config.logging.tracker == "tensorboard":
        trackers.append("tensorboard")
    prepare_process_group()  # the Accelerator forms the process group
    return Accelerator(
        mixed_precision=config.train.mixed_precision,
        gradient_accumulation_steps=config.train.gradient_accumulation_steps,
        log_with=trackers or None,
        project_config=ProjectConfiguration(
            project_dir=str(run_dir),
            logging_dir=str(run_dir / "logs"),
            total_limit=config.checkpoint.total_limit,
        ),
        cpu=config.train.cpu,
        # The schedule is defined in optimizer steps of the global batch; Accelerate would
        # otherwise step it once per process.
        step_scheduler_with_optimizer=False,
        dataloader_config=DataLoaderConfiguration(even_batches=True, use_seedable_sampler=False),
    )


def _build_model(config: TrainConfig, device: torch.device):
    from comfy_nearid.model import load_model

    m = config.model
    mp = config.train.mixed_precision
    # Frozen weights in the low-precision dtype on GPU; the head (trained) stays fp32.
    dtype = {"fp16": "fp16", "bf16": "bf16"}.get(mp, "fp32") if device.type == "cuda" else "fp32"
    head_arg = None if m.init_head in ("own", "fresh") else m.init_head
    model = load_model(
        head=head_arg,
        backbone=m.backbone,
        pretrained=m.pretrained,
        backbone_weights=m.backbone_weights,
        device=device,
        dtype=dtype,
        seed=m.backbone_seed,
    )
    if m.init_head == "fresh" or (m.init_head == "own" and model.head_source.startswith("fresh-init")):
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(m.head_seed)
            model.head.reset_parameters()
        model.head_source = f"fresh-init(seed={m.head_seed})"
    model.backbone.requires_grad_(False)
    model.head.requires_grad_(True)
    model.head.train()
    return model


@dataclass
class _Split:
    dataset: Any
    layout: DatasetLayout
    sources: list[str]
    slot_rows: Any = None  # cache rows of the training cache (features.dtype)
    eval_cache: Any = None  # validation: a float32 feature cache, so that validation reads the
    eval_rows: Any = None  # tokens `nearid eval` reads (None: validation embeds live)


@dataclass
class _Data:
    train: _Split
    val: _Split | None
    test: _Split | None
    cache: Any = None


def _open_split(config: TrainConfig, which: str, sources: list[str] | None, purpose: str) -> _Split:
    dataset = open_dataset(config.data, which, sources)
    layout = scan_layout(dataset, sources, require_distractors=True, purpose=purpose)
    return _Split(dataset, layout, layout.sources)


def _truncate(layout: DatasetLayout, limit: int | None) -> DatasetLayout:
    if limit is None or len(layout) <= limit:
        return layout
    return DatasetLayout(layout.samples[:limit], layout.sources, layout.description + f" (first {limit})")


def _prepare_data(config: TrainConfig, model: Any, accelerator: Any) -> _Data:
    d = config.data
    train = _open_split(config, "train", d.sources, "training")
    val: _Split | None = None
    if d.val is not None:
        val = _open_split(config, "val", d.val_sources or train.sources, "validation")
    elif d.val_fraction > 0:
        kept, held = split_validation(train.layout, d.val_fraction, config.seed, by=d.val_split_by)
        train = _Split(train.dataset, kept, train.sources)
        val = _Split(train.dataset, held, d.val_sources or train.sources)
    if val is not None:
        val.layout = _truncate(val.layout, d.val_max_samples)
    test = _open_split(config, "test", d.test_sources, "testing") if d.test is not None else None

    global_batch = config.train.batch_size
    if len(train.layout) < global_batch:
        raise DatasetError(
            f"{train.layout.description}: {len(train.layout)} usable training samples, fewer than one "
            f"batch (train.batch_size={global_batch}); lower the batch size or add data"
        )
    data = _Data(train, val, test)
    if config.features.cache:
        from .feature_cache import prepare_cache

        # validation reads float32 tokens (below); the training split reads features.dtype
        same_dtype_val = val if config.features.dtype == "float32" else None
        splits = [s for s in (train, same_dtype_val, test) if s is not None]
        cache_dir = Path(config.features.cache_dir or Path(config.output_dir) / "feature_cache")
        # The main process embeds; the others then open the finished cache.
        with accelerator.main_process_first():
            cache, tables = prepare_cache(
                cache_dir,
                model,
                config.features.dtype,
                [(s.dataset, s.layout) for s in splits],
                batch_size=config.features.batch_size,
                max_gb=config.features.max_cache_gb,
                progress=config.logging.progress and accelerator.is_main_process,
            )
        data.cache = cache
        for split, table in zip(splits, tables):
            split.slot_rows = table
        if val is not None:
            # Validation must report what `nearid eval ssr` reports for the exported head, which
            # reads fp32 tokens: a float16 training cache gets a float32 sibling for validation.
            if config.features.dtype == "float32":
                val.eval_cache, val.eval_rows = cache, val.slot_rows
            else:
                with accelerator.main_process_first():
                    val.eval_cache, (val.eval_rows,) = prepare_cache(
                        cache_dir / "validation-float32",
                        model,
                        "float32",
                        [(val.dataset, val.layout)],
                        batch_size=config.features.batch_size,
                        max_gb=config.features.max_cache_gb,
                        progress=config.logging.progress and accelerator.is_main_process,
                    )
    return data


def _make_loader(config: TrainConfig, data: _Data, spec: Any, num_processes: int) -> tuple[DataLoader, EpochSampler]:
    global_batch = config.train.batch_size
    if global_batch % num_processes:
        raise ConfigError(
            f"train.batch_size={global_batch} is the global batch and must divide evenly over "
            f"{num_processes} processes"
        )
    cached = (data.cache, data.train.slot_rows) if data.cache is not None else None
    examples = TrainingExamples(
        data.train.dataset, data.train.layout, config.data, config.augment, config.seed, spec, cached=cached
    )
    sampler = EpochSampler(len(examples), config.seed, shuffle=True)
    loader = DataLoader(
        examples,
        batch_size=global_batch // num_processes,
        sampler=sampler,
        drop_last=True,
        num_workers=config.data.num_workers,
        persistent_workers=False,
        collate_fn=collate_examples,
    )
    return loader, sampler


def make_optimizer(params: Any, o: Any, device: torch.device) -> torch.optim.Optimizer:
    """AdamW over ``params`` with the ``optim`` section's settings; the fused kernel (one pass
    over every parameter, several times faster than the per-tensor loop on CPU, same update
    rule) where torch has one for ``device``."""
    fused = device.type in ("cpu", "cuda")
    return torch.optim.AdamW(
        params, lr=o.lr, weight_decay=o.weight_decay, betas=tuple(o.betas), eps=o.eps, fused=fused or None
    )


# --------------------------------------------------------------------------- one step


def slot_embeddings(
    head: torch.nn.Module,
    model: Any,
    batch: dict[str, torch.Tensor],
    token_dtype: torch.dtype,
    backbone_batch: int = 64,
) -> torch.Tensor:
    """Embeddings of every slot of the batch: ``[B, S, E]`` (zeros in masked slots).

    Tokens come from the batch (feature cache) or from the frozen backbone (live, in chunks
    of ``backbone_batch`` images to bound activation memory); either way they are rounded to
    ``token_dtype``, so both training paths feed the head the same numbers (validation and
    evaluation read fp32 tokens). The readout is :meth:`IdentityModel.embed_tokens` with the
    trainable ``head``.
    """
    valid = batch["valid"]
    if "tokens" in batch:
        tokens = batch["tokens"]
        # every slot filled (the usual case): a view instead of a boolean-index copy
        tokens = tokens.flatten(0, 1) if bool(valid.all()) else tokens[valid]
        tokens = tokens.to(token_dtype).float()
    else:
        pixels = batch["pixels"][valid]
        tokens = torch.cat(
            [model.tokens(pixels[i : i + backbone_batch]) for i in range(0, len(pixels), backbone_batch)]
        ).to(token_dtype).float()
    mask = batch["token_mask"][valid] if "token_mask" in batch else None
    flat = embed_tokens(tokens, mask, head=head)
    b, s = valid.shape
    return flat.new_zeros((b, s, flat.shape[-1])).index_put((valid,), flat)


def _step_terms(head, model, batch, config: TrainConfig, gather, token_dtype):
    emb = slot_embeddings(head, model, batch, token_dtype, config.features.batch_size)
    p = config.data.positives
    valid = batch["valid"]
    return two_tier_terms(
        emb[:, 0],
        emb[:, 1 : 1 + p],
        emb[:, 1 + p :],
        valid[:, 1 : 1 + p],
        valid[:, 1 + p :],
        temperature=config.loss.temperature,
        alpha=config.loss.alpha,
        gather=gather,
    )


# --------------------------------------------------------------------------- the run


class _Run:
    """State of one training run; methods are the loop's phases."""

    def __init__(self, config: TrainConfig, model: Any = None) -> None:
        from accelerate.utils import set_seed

        self.config = config
        self.run_dir = Path(config.output_dir)
        self.ckpt_dir = self.run_dir / "checkpoints"
        _reset_accelerate_state()
        self.accelerator = _make_accelerator(config, self.run_dir)
        acc = self.accelerator
        set_seed(config.seed)
        if acc.is_main_process:
            self.run_dir.mkdir(parents=True, exist_ok=True)
            remove_stale_temporaries(self.ckpt_dir)
            self.config_path = write_config(config, self.run_dir / "config.yaml")
        else:
            self.config_path = self.run_dir / "config.yaml"
        acc.wait_for_everyone()
        self.token_dtype = TOKEN_DTYPES[config.features.dtype]
        if model is None:
            self.model = _build_model(config, acc.device)
        else:  # a caller-built IdentityModel (the demo, tests): its head is trained in place
            self.model = model.to(acc.device)
            self.model.backbone.requires_grad_(False)
            self.model.head.requires_grad_(True)
            self.model.head.train()
        self.spec = self.model.spec
        self.data = _prepare_data(config, self.model, acc)
        loader, self.sampler = _make_loader(config, self.data, self.spec, acc.num_processes)

        head = self.model.head
        o = config.optim
        optimizer = make_optimizer(head.parameters(), o, acc.device)
        accum = config.train.gradient_accumulation_steps
        # global batches per epoch (= batches per process; the last partial one is dropped)
        batches = len(self.data.train.layout) // config.train.batch_size
        self.steps_per_epoch = max(1, math.ceil(batches / accum))
        planned = self.steps_per_epoch * config.train.epochs
        self.total_steps = min(planned, config.train.max_steps) if config.train.max_steps else planned
        scheduler = torch.optim.lr_scheduler.LambdaLR(
            optimizer,
            lambda step: warmup_cosine(step, o.warmup_steps, self.total_steps, o.min_lr_ratio, o.schedule),
        )
        self.head, self.optimizer, self.loader, self.scheduler = acc.prepare(head, optimizer, loader, scheduler)
        self.progress = TrainingProgress()
        acc.register_for_checkpointing(self.progress)
        self.gather = TorchDistributedGather() if acc.num_processes > 1 else LocalGather()
        logger.info(
            "%d process(es) on %s, mixed precision %s; global batch %d (%d per process), %d training "
            "samples, %d optimizer steps per epoch, %d steps in all; tokens from %s",
            acc.num_processes, acc.device, acc.mixed_precision, config.train.batch_size,
            config.train.batch_size // acc.num_processes, len(self.data.train.layout), self.steps_per_epoch,
            self.total_steps, "the feature cache" if self.data.cache is not None else "the backbone (live)",
        )
        self.last_checkpoint: Path | None = None
        self.resumed_from: Path | None = None
        self.best_head_path = self.run_dir / "head_best.safetensors"
        self.last_validation: EvalResult | None = None
        self.best_validation: dict[str, Any] | None = None

    # ------------------------------------------------------------------ phases
    def resume(self) -> None:
        path = resolve_resume(self.config.checkpoint.resume, self.ckpt_dir)
        if path is None:
            return
        self.accelerator.load_state(str(path))
        self.resumed_from = self.last_checkpoint = path
        p = self.progress
        logger.info(
            "resumed from %s: step %d, epoch %d, %d batches into the epoch", path, p.global_step, p.epoch, p.batches_in_epoch
        )
        if self.accelerator.is_main_process and self.best_head_path.is_file():
            from comfy_nearid.checkpoint import read_head_metadata

            self.best_validation = read_head_metadata(self.best_head_path).provenance.get("validation")

    def init_trackers(self) -> None:
        flat: dict[str, Any] = {}
        for section, values in config_to_dict(self.config).items():
            if isinstance(values, dict):
                for k, v in values.items():
                    flat[f"{section}.{k}"] = v if isinstance(v, (int, float, str, bool)) else str(v)
            else:
                flat[section] = values
        self.accelerator.init_trackers("nearid", config=flat)

    def run(self) -> TrainResult:
        started = time.perf_counter()
        self.resume()
        self.init_trackers()
        acc, cfg, p = self.accelerator, self.config, self.progress
        from tqdm.auto import tqdm

        bar = tqdm(
            total=self.total_steps,
            initial=min(p.global_step, self.total_steps),
            desc="training",
            unit="step",
            disable=not (cfg.logging.progress and acc.is_main_process),
        )
        window = _LogWindow(p.samples_seen)
        done = p.global_step >= self.total_steps
        while not done and p.epoch < cfg.train.epochs:
            done = self._run_epoch(bar, window)
        bar.close()
        return self._finish(time.perf_counter() - started)

    def _run_epoch(self, bar, window: "_LogWindow") -> bool:
        acc, cfg, p = self.accelerator, self.config, self.progress
        # Accelerate's loader re-sets its sampler's epoch to its own iteration counter at every
        # pass; set that counter, so a resumed run draws the same permutation as the first one.
        self.loader.set_epoch(p.epoch)
        loader = acc.skip_first_batches(self.loader, p.batches_in_epoch) if p.batches_in_epoch else self.loader
        loader.set_epoch(p.epoch)
        for batch in loader:
            with acc.accumulate(self.head):
                terms = _step_terms(self.head, self.model, batch, cfg, self.gather, self.token_dtype)
                summed = self._reduce(terms)
                if summed[-1] > 0:
                    self._diverged(batch, summed)
                acc.backward(terms.loss)
                if acc.sync_gradients:
                    acc.clip_grad_norm_(self.head.parameters(), cfg.optim.max_grad_norm)
                self.optimizer.step()
                self.optimizer.zero_grad()
            p.batches_in_epoch += 1
            p.samples_seen += cfg.train.batch_size
            window.add(summed, acc.num_processes)
            if not acc.sync_gradients:
                continue
            self.scheduler.step()
            p.global_step += 1
            p.last_loss = window.last_loss
            bar.update(1)
            self._after_step(bar, window)
            if p.global_step >= self.total_steps:
                return True
        p.epoch += 1
        p.batches_in_epoch = 0
        return False

    def _reduce(self, terms) -> list[float]:
        """Sum over processes of [loss, tier1, tier2, 7 monitoring counts, non-finite flag]."""
        loss = terms.loss.detach().double()
        values = torch.cat(
            [
                torch.stack([loss, terms.tier1.double(), terms.tier2.double()]).cpu(),
                terms.stats.as_tensor(),
                (~torch.isfinite(loss)).double().view(1).cpu(),
            ]
        )
        if self.accelerator.num_processes > 1:
            values = self.accelerator.reduce(values.to(self.accelerator.device), reduction="sum").cpu()
        return values.tolist()

    def _diverged(self, batch, summed: list[float]) -> None:
        positions = self.accelerator.gather(batch["position"]).cpu().tolist()
        ids = [self.data.train.layout.samples[i].id for i in positions]
        p = self.progress
        ckpt = str(self.last_checkpoint) if self.last_checkpoint else "none (no checkpoint saved yet)"
        hint = f"; resume from it with --resume {self.last_checkpoint}" if self.last_checkpoint else ""
        raise TrainingDivergedError(
            f"non-finite loss ({summed[0] / self.accelerator.num_processes}) at step {p.global_step + 1} "
            f"(epoch {p.epoch}, batch {p.batches_in_epoch}); batch sample ids: {ids}; last good checkpoint: {ckpt}"
            f"{hint} (check those samples' images, lower optim.lr or use train.mixed_precision=bf16)"
        )

    def _after_step(self, bar, window: "_LogWindow") -> None:
        acc, cfg, p = self.accelerator, self.config, self.progress
        step = p.global_step
        if step % cfg.logging.every_steps == 0 or step == self.total_steps:
            values = window.flush(p.samples_seen)
            values["lr"] = self.scheduler.get_last_lr()[0]
            values["epoch"] = p.epoch
            acc.log({f"train/{k}": v for k, v in values.items()}, step=step)
            bar.set_postfix(loss=f"{values['loss']:.4f}", samples_per_s=f"{values['samples_per_s']:.1f}")
        if self.data.val is not None and cfg.eval.every_steps and step % cfg.eval.every_steps == 0:
            self._validate()
        if cfg.checkpoint.every_steps and step % cfg.checkpoint.every_steps == 0:
            self.last_checkpoint = save_checkpoint(acc, self.ckpt_dir, step, cfg.checkpoint.total_limit)
        _hold_if_requested(step)

    # ------------------------------------------------------------------ evaluation
    def _head_embedder(self, split: _Split, head: torch.nn.Module):
        fg = self.config.data.foreground_mask
        bs = self.config.eval.batch_size
        if split.eval_cache is not None:
            return cached_head_embedder(self.model, head, split.eval_cache, split.eval_rows, fg, bs)
        return live_embedder(self.model, head, split.dataset, fg, bs)

    def _validate(self) -> None:
        acc, p = self.accelerator, self.progress
        if acc.is_main_process:
            head = acc.unwrap_model(self.head)
            result = evaluate_layout(self.data.val.layout, self.data.val.sources, self._head_embedder(self.data.val, head))
            self.last_validation = result
            logger.info("step %d %s", p.global_step, format_result("validation", result))
            acc.log(_metric_logs("val", result), step=p.global_step)
            value = result.ssr if self.config.eval.select_by == "ssr" else result.pa
            if is_better(value, p.best_metric):
                p.best_metric, p.best_step = value, p.global_step
                self.best_validation = {**result.to_dict(), "step": p.global_step}
                from comfy_nearid.checkpoint import save_head

                save_head(self.best_head_path, head, self.spec, provenance={"validation": self.best_validation})
        acc.wait_for_everyone()

    # ------------------------------------------------------------------ the end
    def _finish(self, seconds: float) -> TrainResult:
        acc, cfg, p = self.accelerator, self.config, self.progress
        if self.data.val is not None and (not cfg.eval.every_steps or p.global_step % cfg.eval.every_steps):
            self._validate()
        if cfg.checkpoint.every_steps and (self.last_checkpoint is None or not self.last_checkpoint.name.endswith(f"{p.global_step:08d}")):
            self.last_checkpoint = save_checkpoint(acc, self.ckpt_dir, p.global_step, cfg.checkpoint.total_limit)
        result = TrainResult(
            run_dir=self.run_dir,
            head_path=self.run_dir / "head.safetensors",
            last_head_path=self.run_dir / "head_last.safetensors",
            best_head_path=self.best_head_path if self.data.val is not None else None,
            config_path=self.config_path,
            global_step=p.global_step,
            epochs_completed=p.epoch,
            samples_seen=p.samples_seen,
            final_loss=p.last_loss,
            best_step=p.best_step,
            seconds=seconds,
            checkpoints_dir=self.ckpt_dir,
            resumed_from=self.resumed_from,
        )
        final, selected = self._final_head()
        if self.data.test is not None:  # every process takes part (the evaluator splits the images)
            result.test, result.baseline = self._test_evaluation(final)
        result.best_validation = self.best_validation
        result.last_validation = self.last_validation.to_dict() if self.last_validation else None
        if acc.is_main_process:
            self._export(result, final, selected)
        acc.wait_for_everyone()
        acc.end_training()
        return result

    def _final_head(self) -> tuple[torch.nn.Module, str]:
        """The head to export: the best by validation when there was validation, else the last
        (the main process's choice, broadcast so every process evaluates the same head)."""
        from accelerate.utils import broadcast_object_list

        last = self.accelerator.unwrap_model(self.head)
        state = [None]
        if self.accelerator.is_main_process and self.data.val is not None and self.best_head_path.is_file():
            from comfy_nearid.checkpoint import load_head_file

            state = [load_head_file(self.best_head_path)[0]]
        if self.accelerator.num_processes > 1:
            state = broadcast_object_list(state)
        if state[0] is None:
            return last, "last"
        final = copy.deepcopy(last)
        final.load_state_dict(state[0])
        return final, "best-validation"

    def _test_evaluation(self, head: torch.nn.Module) -> tuple[dict[str, Any], dict[str, Any] | None]:
        """The exported head (and, with ``eval.baseline``, the frozen backbone's own pooling) on
        the test data, through the evaluator (:func:`comfy_nearid.evaluate.evaluate_dataset`):
        the numbers ``nearid eval ssr`` reports for the exported head file."""
        from comfy_nearid.evaluate import Scorer, evaluate_dataset

        cfg, model, split = self.config, self.model, self.data.test

        @torch.no_grad()
        def head_embed(images, masks):
            tokens = model.tokens(model.preprocess_batch(images))
            mask = model.token_mask(masks, len(images)) if masks is not None else None
            return model.embed_tokens(tokens, mask, head=head).cpu()

        @torch.no_grad()
        def pooled_embed(images, masks):
            pixels = model.preprocess_batch(images).to(model.device)
            return torch.nn.functional.normalize(model.backbone.pooled(pixels).float(), dim=-1).cpu()

        scorers = [Scorer("nearid-head", head_embed, use_masks=cfg.data.foreground_mask, batch_size=cfg.eval.batch_size)]
        if cfg.eval.baseline:
            scorers.append(Scorer(f"pooled:{self.spec.name}", pooled_embed, batch_size=cfg.eval.batch_size))
        samples = [split.dataset[s.index] for s in split.layout.samples]
        results = evaluate_dataset(
            scorers, samples, sources=split.sources, seed=cfg.seed,
            progress=cfg.logging.progress and self.accelerator.is_main_process,
        )
        for r in results:
            logger.info(
                "test %s: SSR %.2f PA %.2f; per source: %s", r.name, r.summary["ssr"], r.summary["pa"],
                ", ".join(f"{k} {v['ssr']:.1f}/{v['pa']:.1f}" for k, v in r.summary["by_source"].items() if v["ssr"] is not None),
            )
        logs = {"test/ssr": results[0].summary["ssr"], "test/pa": results[0].summary["pa"]}
        for source, v in results[0].summary["by_source"].items():
            if v["ssr"] is not None:
                logs[f"test/ssr/{source}"] = v["ssr"]
                logs[f"test/pa/{source}"] = v["pa"]
        self.accelerator.log(logs, step=self.progress.global_step)
        return results[0].summary, (results[1].summary if cfg.eval.baseline else None)

    def _export(self, result: TrainResult, final: torch.nn.Module, selected: str) -> None:
        from comfy_nearid.checkpoint import save_head

        acc, cfg, p = self.accelerator, self.config, self.progress
        last = acc.unwrap_model(self.head)
        provenance = {
            "trainer": "comfy-nearid trainer",
            "config": config_to_dict(cfg),
            "data": self._data_summary(),
            "steps": p.global_step,
            "epochs": p.epoch,
            "samples_seen": p.samples_seen,
            "head_init": self.model.head_source,
            "metrics": {
                "final_loss": p.last_loss,
                "best_step": p.best_step,
                "validation": result.best_validation,
                "test": _without_bulk(result.test),
                "baseline_test": _without_bulk(result.baseline),
            },
        }
        save_head(result.last_head_path, last, self.spec, provenance={**provenance, "selected": "last"},
                  calibration=self._validation_calibration(last))
        save_head(result.head_path, final, self.spec, provenance={**provenance, "selected": selected},
                  calibration=self._validation_calibration(final))
        logger.info(
            "exported head %s (%s, step %d)", result.head_path, selected,
            p.best_step if selected != "last" else p.global_step,
        )

    def _validation_calibration(self, head: torch.nn.Module) -> dict[str, Any] | None:
        """The identity-match curve fitted on the validation split's pairs as ``head`` embeds
        them (:func:`comfy_nearid.calibration.fit_calibration`); None without validation, or
        when the head does not yet put same-identity pairs above near-identity ones."""
        from comfy_nearid.calibration import fit_calibration
        from comfy_nearid.errors import InvalidInputError

        val = self.data.val
        if val is None:
            return None
        sources = list(self.config.eval.calibration_sources or val.sources)
        unknown = [x for x in sources if x not in val.sources]
        if unknown:
            raise ConfigError(f"eval.calibration_sources {unknown} are not validation sources {list(val.sources)}")
        result = evaluate_layout(val.layout, sources, self._head_embedder(val, head))
        try:
            fit = fit_calibration(result.same_cosines, result.near_cosines, data=val.layout.description,
                                  split="validation", extra={"distractor_sources": sources})
        except InvalidInputError as e:
            logger.warning("the exported head stays uncalibrated: %s", e)
            return None
        return fit.calibration.to_dict()

    def _data_summary(self) -> dict[str, Any]:
        d = self.data

        def split(s: _Split | None) -> dict[str, Any] | None:
            if s is None:
                return None
            return {"source": s.layout.description, "samples": len(s.layout), "distractor_sources": s.sources}

        return {
            "train": split(d.train),
            "val": split(d.val),
            "test": split(d.test),
            "feature_cache": str(d.cache.directory) if d.cache is not None else None,
        }


def _without_bulk(summary: dict[str, Any] | None) -> dict[str, Any] | None:
    """An evaluator summary without its per-category breakdown (kept out of head metadata)."""
    if summary is None:
        return None
    return {k: v for k, v in summary.items() if k != "by_category"}


def _metric_logs(prefix: str, result: EvalResult) -> dict[str, float]:
    logs = {f"{prefix}/ssr": result.ssr, f"{prefix}/pa": result.pa, f"{prefix}/pa_reference": result.pooled.pa_reference}
    for source, stats in result.by_source.items():
        if stats is not None:
            logs[f"{prefix}/ssr/{source}"] = stats.ssr
            logs[f"{prefix}/pa/{source}"] = stats.pa
    return logs


class _LogWindow:
    """Global averages of the loss and monitoring counts since the last log line."""

    def __init__(self, samples_seen: int) -> None:
        self.started = time.perf_counter()
        self.samples_at_start = samples_seen
        self.last_loss = float("nan")
        self.reset()

    def reset(self) -> None:
        self.loss = self.tier1 = self.tier2 = 0.0
        self.batches = 0
        self.stats = TwoTierStats(0, 0, 0, 0, 0, 0, 0)

    def add(self, summed: list[float], world: int) -> None:
        # loss/tier values are world-scaled shares: their sum over processes / world = global value
        self.loss += summed[0] / world
        self.tier1 += summed[1] / world
        self.tier2 += summed[2] / world
        self.stats = self.stats + TwoTierStats(*summed[3:10])
        self.batches += 1
        self.last_loss = summed[0] / world

    def flush(self, samples_seen: int) -> dict[str, float]:
        now = time.perf_counter()
        n = max(1, self.batches)
        values = {
            "loss": self.loss / n,
            "tier1": self.tier1 / n,
            "tier2": self.tier2 / n,
            "samples_per_s": (samples_seen - self.samples_at_start) / max(1e-9, now - self.started),
            **self.stats.figures(),
        }
        self.started = now
        self.samples_at_start = samples_seen
        self.reset()
        return values


def _hold_if_requested(step: int) -> None:
    """Wait (until a signal) after step ``$NEARID_TRAIN_HOLD_AFTER_STEP``; see
    :data:`HOLD_AFTER_STEP_ENV`. A no-op when the variable is unset."""
    hold_if_requested(HOLD_AFTER_STEP_ENV, step, "step")


def train(config: TrainConfig, model: Any = None) -> TrainResult:
    """Train a NearID head as ``config`` says; see the module docstring and ``docs/training.md``.

    ``model``: optionally an :class:`~comfy_nearid.model.IdentityModel` built by the caller
    (its backbone must be the one ``config.model`` names for the exported metadata to be
    right); its head is trained in place and its backbone stays frozen. By default the model
    is built from ``config.model``. Runs on one process, or on every process of an
    ``accelerate launch``. Returns a :class:`TrainResult` (paths, steps; validation and test
    metrics on the main process).
    """
    config.check()
    if model is not None and model.spec.name != config.model.backbone:
        raise ConfigError(
            f"the model passed to train() has backbone {model.spec.name!r} but model.backbone is "
            f"{config.model.backbone!r}"
        )
    keep_freed_memory()
    return _Run(config, model).run()
