"""Best-of-N by identity: generate N candidates with fixed seeds, keep the most faithful one.

Works with any diffusers pipeline and with any callable that returns images::

    from comfy_nearid import load_model
    from comfy_nearid.best_of_n import best_of_n

    model = load_model(head="nearid_head.safetensors")
    result = best_of_n(pipe, ["ref1.jpg", "ref2.jpg"], model, prompt="a photo of the toy on a beach",
                       n=8, base_seed=1000, num_inference_steps=30)
    result.best.image.save("best.png"); print(result.best.seed, result.scores)

Candidate ``i`` is generated with seed ``base_seed + i`` (or ``seeds[i]``) from its own
``torch.Generator``, one candidate per call, so the winner can be regenerated from its seed
alone. Optional **early rejection** scores a cheap preview of every candidate after
``at_step`` denoising steps and stops it there when its preview falls below the best preview
seen so far (minus a margin): the compute saved is reported per run (``steps_run`` vs
``steps_full``). It needs a pipeline (or callable) that supports diffusers'
``callback_on_step_end``.

diffusers is never imported at module level; this module only needs it when handed a pipeline.
"""

from __future__ import annotations

import inspect
import logging
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Callable, Sequence

import numpy as np

from .errors import InvalidInputError

if TYPE_CHECKING:
    import torch
    from PIL import Image

    from .embedding_cache import EmbeddingCache
    from .model import IdentityModel

__all__ = ["BestOfNResult", "Candidate", "EarlyRejection", "best_of_n", "latents_preview"]

logger = logging.getLogger(__name__)


@dataclass
class Candidate:
    """One generated candidate.

    Attributes:
        seed: the seed of its generator.
        image: the final image (``None`` if it was stopped early).
        score: aggregate cosine of the final image to the references (``None`` if stopped).
        cosines: cosine to each reference, in reference order.
        match: ``score`` as a 0..100 identity match.
        calibrated: whether that match comes from a curve fitted for the head (False: the
            uncalibrated default curve).
        preview_score: aggregate cosine of its preview (early rejection only).
        rejected_at_step: the step after which it was stopped, or ``None``.
        steps_run: denoising steps it ran (known when the pipeline reports steps).
    """

    seed: int
    image: "Image.Image | None" = None
    score: float | None = None
    cosines: tuple[float, ...] = ()
    match: float | None = None
    calibrated: bool | None = None
    preview_score: float | None = None
    rejected_at_step: int | None = None
    steps_run: int | None = None


@dataclass
class BestOfNResult:
    """The best candidate of one prompt, and every candidate in seed order."""

    prompt: str | None
    best: Candidate
    candidates: list[Candidate]
    steps_full: int | None = None  # steps of one complete candidate

    @property
    def scores(self) -> list[float | None]:
        """Final score of each candidate (``None`` for the ones stopped early)."""
        return [c.score for c in self.candidates]

    @property
    def steps_run(self) -> int | None:
        """Denoising steps run over all candidates (``None`` if the pipeline did not report)."""
        counts = [c.steps_run for c in self.candidates]
        return None if any(s is None for s in counts) else int(sum(counts))

    @property
    def compute_saved(self) -> float | None:
        """Fraction of denoising steps early rejection saved against full best-of-N (0..1)."""
        if self.steps_run is None or not self.steps_full:
            return None
        return 1.0 - self.steps_run / (self.steps_full * len(self.candidates))


@dataclass(frozen=True)
class EarlyRejection:
    """Stop weak candidates part-way through sampling.

    After step ``at_step`` (0-based, as diffusers' ``callback_on_step_end`` counts), ``preview``
    turns the pipeline state into an image (default: :func:`latents_preview`), which is scored;
    the candidate stops there when its preview score is below the ``keep_top``-th best preview
    score seen so far minus ``margin``. The first ``keep_top`` candidates always finish.
    """

    at_step: int
    margin: float = 0.0
    keep_top: int = 1
    preview: Callable[[Any, int, Any, dict], Any] | None = None

    def __post_init__(self) -> None:
        if self.at_step < 0:
            raise InvalidInputError(f"EarlyRejection.at_step must be >= 0, got {self.at_step}")
        if self.keep_top < 1:
            raise InvalidInputError(f"EarlyRejection.keep_top must be >= 1, got {self.keep_top}")


class _Rejected(Exception):
    """Raised inside the step callback to stop a candidate's sampling loop."""

    def __init__(self, step: int) -> None:
        super().__init__(f"stopped after step {step}")
        self.step = step


def latents_preview(pipe: Any, step: int, timestep: Any, callback_kwargs: dict) -> "torch.Tensor":
    """A preview from the current latents: decoded by the pipeline's VAE if it has one, else
    taken as pixels in -1..1 (pixel-space pipelines). Returns float ``[B, 3, H, W]`` in 0..1."""
    import torch

    latents = callback_kwargs.get("latents")
    if latents is None:
        raise InvalidInputError(
            "early rejection needs the latents in the step callback (callback_on_step_end_tensor_inputs=['latents'])"
        )
    with torch.inference_mode():
        vae = getattr(pipe, "vae", None)
        if vae is not None:
            scale = getattr(vae.config, "scaling_factor", 1.0)
            pixels = vae.decode(latents.to(vae.dtype) / scale, return_dict=False)[0]
        else:
            pixels = latents
        return (pixels.float() / 2 + 0.5).clamp(0, 1).cpu()


def _is_diffusers_pipeline(obj: Any) -> bool:
    try:
        from diffusers import DiffusionPipeline
    except ImportError:
        return False
    return isinstance(obj, DiffusionPipeline)


def _accepts(fn: Callable, name: str) -> bool:
    try:
        params = inspect.signature(fn).parameters
    except (TypeError, ValueError):
        return True
    return name in params or any(p.kind is inspect.Parameter.VAR_KEYWORD for p in params.values())


def _first_image(output: Any, where: str) -> Any:
    images = getattr(output, "images", output)
    if isinstance(images, (list, tuple)):
        if not images:
            raise InvalidInputError(f"{where} returned no image")
        return images[0]
    if hasattr(images, "shape") and len(images.shape) == 4:
        return images[:1]
    return images


def _call_generator(generate: Any, prompt: str | None, seed: int, device: Any, kwargs: dict[str, Any],
                    callback: Callable | None) -> Any:
    """Run one candidate; returns whatever image it produced."""
    import torch

    if _is_diffusers_pipeline(generate):
        call = dict(kwargs)
        if prompt is not None:
            call["prompt"] = prompt
        call["generator"] = torch.Generator(device=device).manual_seed(seed)
        if _accepts(generate.__call__, "num_images_per_prompt"):
            call.setdefault("num_images_per_prompt", 1)
        elif _accepts(generate.__call__, "batch_size"):
            call.setdefault("batch_size", 1)  # unconditional pipelines (DDPM, ...)
        if callback is not None:
            if not _accepts(generate.__call__, "callback_on_step_end"):
                raise InvalidInputError(
                    f"{type(generate).__name__} has no callback_on_step_end; early rejection needs one"
                )
            call["callback_on_step_end"] = callback
            call["callback_on_step_end_tensor_inputs"] = ["latents"]
        return _first_image(generate(**call), type(generate).__name__)
    if not callable(generate):
        raise InvalidInputError(f"generate must be a diffusers pipeline or a callable, got {type(generate).__name__}")
    call = dict(kwargs, seed=seed)
    if prompt is not None:
        call["prompt"] = prompt
    if callback is not None:
        if not _accepts(generate, "callback_on_step_end"):
            raise InvalidInputError(
                "early rejection with a plain callable needs it to accept callback_on_step_end (diffusers' protocol)"
            )
        call["callback_on_step_end"] = callback
    return _first_image(generate(**call), getattr(generate, "__name__", "generate"))


class _Scorer:
    """Aggregate cosine of images to the reference embeddings."""

    def __init__(self, model: Any, references: Any, aggregate: str, cache: "EmbeddingCache | None") -> None:
        import torch

        from .calibration import calibration_for
        from .embedding_cache import cached_embed

        self.model = model
        self.aggregate = aggregate
        if isinstance(references, torch.Tensor) and references.ndim == 2:
            self.references = references.detach().float().cpu().numpy()  # precomputed [R, D]
        else:
            self.references = cached_embed(model, references, cache).numpy()
        self.calibration = calibration_for(model)

    def __call__(self, image: Any) -> tuple[tuple[float, ...], float]:
        from .scoring import aggregate_cosines

        emb = self.model.embed(image).numpy()[:1]
        if emb.shape[1] != self.references.shape[1]:
            raise InvalidInputError(
                f"reference embeddings are {self.references.shape[1]}-d but the model gives {emb.shape[1]}-d"
            )
        cosines = emb.astype(np.float64) @ self.references.astype(np.float64).T
        return tuple(float(c) for c in cosines[0]), float(aggregate_cosines(cosines, self.aggregate)[0])


def best_of_n(
    generate: Any,
    references: Any,
    model: "IdentityModel",
    prompt: str | Sequence[str] | None = None,
    *,
    n: int = 4,
    seeds: Sequence[int] | None = None,
    base_seed: int = 0,
    aggregate: str = "mean",
    early_rejection: EarlyRejection | None = None,
    generator_device: Any = "cpu",
    cache: "EmbeddingCache | None" = None,
    **pipeline_kwargs: Any,
) -> BestOfNResult | list[BestOfNResult]:
    """Generate ``n`` candidates per prompt with fixed seeds and return the most faithful.

    Args:
        generate: a diffusers pipeline (called with ``prompt``, ``generator`` and
            ``pipeline_kwargs``; unconditional pipelines without a prompt), or any callable
            ``generate(prompt=..., seed=..., **pipeline_kwargs)`` returning an image, a list of
            images or an object with ``.images``.
        references: the subject's reference images (paths, PIL, tensors; as
            ``model.embed`` takes them) or their embeddings ``[R, D]``.
        model: the identity model that scores the candidates.
        prompt: one prompt, a list of prompts (one result each), or ``None``.
        n: candidates per prompt (ignored when ``seeds`` is given).
        seeds: explicit seeds, one per candidate; default ``base_seed + 0 .. n-1``.
        aggregate: ``mean`` or ``max`` over the references.
        early_rejection: stop weak candidates part-way (see :class:`EarlyRejection`).
        generator_device: device of the ``torch.Generator`` (``cpu`` is reproducible everywhere).
        cache: embedding cache for the references.
        **pipeline_kwargs: passed to every call (``num_inference_steps``, ``guidance_scale``,
            ``ip_adapter_image`` ...).

    Returns:
        A :class:`BestOfNResult` (a list of them for a list of prompts). ``best`` is the
        finished candidate with the highest score; ties go to the earlier seed.
    """
    from .scoring import AGGREGATES

    if aggregate not in AGGREGATES:
        raise InvalidInputError(f"aggregate must be one of {AGGREGATES}, got {aggregate!r}")
    seed_list = [int(s) for s in seeds] if seeds is not None else [base_seed + i for i in range(n)]
    if not seed_list:
        raise InvalidInputError(f"best_of_n needs at least one candidate (n={n}, seeds={seeds!r})")
    if len(set(seed_list)) != len(seed_list):
        raise InvalidInputError(f"seeds must be distinct, got {seed_list}")
    scorer = _Scorer(model, references, aggregate, cache)
    if isinstance(prompt, (list, tuple)):
        return [_best_of_n_one(generate, scorer, p, seed_list, early_rejection, generator_device, pipeline_kwargs)
                for p in prompt]
    return _best_of_n_one(generate, scorer, prompt, seed_list, early_rejection, generator_device, pipeline_kwargs)


@dataclass
class _PreviewGate:
    """The step callback of one candidate: counts steps, scores the preview, may stop it."""

    rule: EarlyRejection | None
    scorer: _Scorer
    previews_so_far: list[float]
    steps: int = 0
    preview_score: float | None = field(default=None)

    def __call__(self, pipe: Any, step: int, timestep: Any, callback_kwargs: dict) -> dict:
        self.steps = step + 1
        rule = self.rule
        if rule is not None and step == rule.at_step:
            preview = (rule.preview or latents_preview)(pipe, step, timestep, callback_kwargs)
            _, self.preview_score = self.scorer(preview)
            ranked = sorted(self.previews_so_far, reverse=True)
            self.previews_so_far.append(self.preview_score)
            if len(ranked) >= rule.keep_top and self.preview_score < ranked[rule.keep_top - 1] - rule.margin:
                raise _Rejected(step)
        return callback_kwargs


def _best_of_n_one(generate: Any, scorer: _Scorer, prompt: str | None, seeds: list[int],
                   rule: EarlyRejection | None, device: Any, kwargs: dict[str, Any]) -> BestOfNResult:
    # Count steps whenever the pipeline reports them, so full runs are measured too.
    wants_steps = rule is not None or (
        _is_diffusers_pipeline(generate) and _accepts(generate.__call__, "callback_on_step_end"))
    previews: list[float] = []
    candidates: list[Candidate] = []
    steps_full: int | None = None
    for seed in seeds:
        gate = _PreviewGate(rule, scorer, previews) if wants_steps else None
        candidate = Candidate(seed=seed)
        try:
            image = _call_generator(generate, prompt, seed, device, kwargs, gate)
        except _Rejected as stop:
            candidate.rejected_at_step = stop.step
            candidate.preview_score = gate.preview_score
            candidate.steps_run = gate.steps
            logger.debug("seed %d stopped after step %d (preview %.4f)", seed, stop.step, gate.preview_score)
            candidates.append(candidate)
            continue
        candidate.cosines, candidate.score = scorer(image)
        candidate.match = float(scorer.calibration.match(candidate.score))
        candidate.calibrated = scorer.calibration.fitted
        candidate.image = _as_pil(image)
        if gate is not None:
            candidate.preview_score = gate.preview_score
            candidate.steps_run = gate.steps
            steps_full = gate.steps if steps_full is None else max(steps_full, gate.steps)
        candidates.append(candidate)
    finished = [c for c in candidates if c.score is not None]
    best = max(finished, key=lambda c: (c.score, -candidates.index(c)))
    return BestOfNResult(prompt, best, candidates, steps_full)


def _as_pil(image: Any) -> "Image.Image":
    from .images import as_pil_images

    return as_pil_images(image)[0]
