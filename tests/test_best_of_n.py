"""Best-of-N on tiny random diffusers pipelines built from configs (no download) and on a
plain callable: the returned candidate is the best by an independently computed score, and
its seed regenerates it; early rejection stops exactly the candidates its rule names."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from PIL import Image

from comfy_nearid.best_of_n import EarlyRejection, best_of_n
from comfy_nearid.errors import InvalidInputError

diffusers = pytest.importorskip("diffusers")
transformers = pytest.importorskip("transformers")


def _tiny_ddpm():
    from diffusers import DDPMPipeline, DDPMScheduler, UNet2DModel

    torch.manual_seed(0)
    unet = UNet2DModel(sample_size=16, in_channels=3, out_channels=3, layers_per_block=1, block_out_channels=(8, 16),
                       down_block_types=("DownBlock2D", "DownBlock2D"), up_block_types=("UpBlock2D", "UpBlock2D"),
                       norm_num_groups=4)
    pipe = DDPMPipeline(unet=unet, scheduler=DDPMScheduler(num_train_timesteps=20))
    pipe.set_progress_bar_config(disable=True)
    return pipe


def _tiny_stable_diffusion():
    from diffusers import AutoencoderKL, DDIMScheduler, StableDiffusionPipeline, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTokenizer

    # A character-level CLIP tokenizer written here: nothing is fetched from a hub.
    vocab = {"<|startoftext|>": 0, "<|endoftext|>": 1}
    for c in "abcdefghijklmnopqrstuvwxyz":
        vocab[c] = len(vocab)
        vocab[c + "</w>"] = len(vocab)
    tokenizer = CLIPTokenizer(vocab=vocab, merges=[], model_max_length=16)
    torch.manual_seed(0)
    unet = UNet2DConditionModel(
        block_out_channels=(4, 8), layers_per_block=1, sample_size=8, in_channels=4, out_channels=4,
        down_block_types=("DownBlock2D", "CrossAttnDownBlock2D"), up_block_types=("CrossAttnUpBlock2D", "UpBlock2D"),
        cross_attention_dim=16, norm_num_groups=2, attention_head_dim=2)
    vae = AutoencoderKL(block_out_channels=[4, 8], in_channels=3, out_channels=3, latent_channels=4,
                        down_block_types=["DownEncoderBlock2D"] * 2, up_block_types=["UpDecoderBlock2D"] * 2,
                        norm_num_groups=2, sample_size=16)
    text_encoder = CLIPTextModel(CLIPTextConfig(
        bos_token_id=0, eos_token_id=1, pad_token_id=1, hidden_size=16, intermediate_size=32, num_attention_heads=2,
        num_hidden_layers=2, vocab_size=len(vocab), max_position_embeddings=16))
    scheduler = DDIMScheduler(beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear", clip_sample=False,
                              set_alpha_to_one=False, steps_offset=1)
    pipe = StableDiffusionPipeline(unet=unet, vae=vae, text_encoder=text_encoder, tokenizer=tokenizer,
                                   scheduler=scheduler, safety_checker=None, feature_extractor=None,
                                   image_encoder=None, requires_safety_checker=False)
    pipe.set_progress_bar_config(disable=True)
    return pipe


SD_KWARGS = dict(num_inference_steps=4, height=16, width=16, guidance_scale=1.0)


@pytest.fixture(scope="module")
def ddpm():
    return _tiny_ddpm()


@pytest.fixture(scope="module")
def sd():
    return _tiny_stable_diffusion()


@pytest.fixture(scope="module")
def reference_images():
    rng = np.random.default_rng(5)
    return [Image.fromarray(rng.integers(0, 256, size=(16, 16, 3), dtype=np.uint8)) for _ in range(2)]


def _score_by_hand(model, references, image) -> float:
    refs = model.embed(references).numpy().astype(np.float64)
    emb = model.embed([image]).numpy().astype(np.float64)[0]
    return float((refs @ emb).mean())


def _pixels(image) -> np.ndarray:
    return np.asarray(image.convert("RGB"))


def test_ddpm_pipeline_best_is_the_highest_scoring_seed_and_regenerates(tiny_model, ddpm, reference_images):
    result = best_of_n(ddpm, reference_images, tiny_model, n=4, base_seed=10, num_inference_steps=2)
    assert [c.seed for c in result.candidates] == [10, 11, 12, 13]
    by_hand = {}
    for seed in (10, 11, 12, 13):
        image = ddpm(batch_size=1, generator=torch.Generator().manual_seed(seed), num_inference_steps=2).images[0]
        by_hand[seed] = (_score_by_hand(tiny_model, reference_images, image), image)
    np.testing.assert_allclose(result.scores, [by_hand[s][0] for s in (10, 11, 12, 13)], atol=2e-6)
    best_seed = max(by_hand, key=lambda s: by_hand[s][0])
    assert result.best.seed == best_seed
    np.testing.assert_array_equal(_pixels(result.best.image), _pixels(by_hand[best_seed][1]))
    assert result.best.match == pytest.approx(100 / (1 + math.exp(-10 * (result.best.score - 0.5))), abs=1e-6)
    assert result.best.calibrated is False  # the tiny head has no fitted curve: the default, said so


def test_stable_diffusion_pipeline_per_prompt_with_explicit_seeds(tiny_model, sd, reference_images):
    results = best_of_n(sd, reference_images, tiny_model, prompt=["a dog", "a red cat"], seeds=[7, 3, 99], **SD_KWARGS)
    assert [r.prompt for r in results] == ["a dog", "a red cat"]
    for r in results:
        assert [c.seed for c in r.candidates] == [7, 3, 99]
        assert r.steps_full == 4 and r.steps_run == 12 and r.compute_saved == 0.0
        again = sd(r.prompt, generator=torch.Generator().manual_seed(r.best.seed), **SD_KWARGS).images[0]
        np.testing.assert_array_equal(_pixels(r.best.image), _pixels(again))
        assert r.best.score == pytest.approx(_score_by_hand(tiny_model, reference_images, again), abs=2e-6)
        assert r.best.score == max(r.scores)


def test_a_plain_callable_and_the_reference_itself_wins(tiny_model, reference_images):
    target = reference_images[0]

    def generate(prompt, seed, size):
        if seed == 2:  # this seed "generates" the subject exactly
            return target
        rng = np.random.default_rng(seed)
        return [Image.fromarray(rng.integers(0, 256, size=(size, size, 3), dtype=np.uint8))]

    result = best_of_n(generate, [target], tiny_model, prompt="x", n=5, size=16)
    assert result.best.seed == 2
    assert result.best.score == pytest.approx(1.0, abs=1e-5)  # cosine of an image with itself
    assert result.steps_run is None and result.compute_saved is None  # a callable reports no steps
    # Precomputed reference embeddings give the same scores.
    again = best_of_n(generate, tiny_model.embed([target]), tiny_model, prompt="x", n=5, size=16)
    np.testing.assert_allclose(again.scores, result.scores, atol=1e-6)


def _previews_by_hand(model, sd, references, prompt, seeds, at_step):
    """Each seed's preview score at ``at_step``: latents captured by our own callback and
    decoded with the VAE as the documented preview does."""
    scores = {}
    for seed in seeds:
        captured = {}

        def grab(pipe, step, timestep, kwargs):
            if step == at_step:
                captured["latents"] = kwargs["latents"].clone()
            return kwargs

        sd(prompt, generator=torch.Generator().manual_seed(seed), callback_on_step_end=grab, **SD_KWARGS)
        with torch.no_grad():
            decoded = sd.vae.decode(captured["latents"] / sd.vae.config.scaling_factor).sample
        scores[seed] = _score_by_hand(model, references, (decoded / 2 + 0.5).clamp(0, 1))
    return scores


def test_early_rejection_stops_exactly_the_candidates_its_rule_names(tiny_model, sd, reference_images):
    seeds = [0, 1, 2, 3, 4, 5]
    rule = EarlyRejection(at_step=1, margin=0.0, keep_top=1)
    result = best_of_n(sd, reference_images, tiny_model, prompt="a toy", seeds=seeds, early_rejection=rule,
                       **SD_KWARGS)
    previews = _previews_by_hand(tiny_model, sd, reference_images, "a toy", seeds, at_step=1)
    best_so_far, expected_rejected = -math.inf, []
    for seed in seeds:
        if seed != seeds[0] and previews[seed] < best_so_far:
            expected_rejected.append(seed)
        best_so_far = max(best_so_far, previews[seed])
    rejected = [c.seed for c in result.candidates if c.rejected_at_step is not None]
    assert rejected == expected_rejected and rejected, "the tiny pipeline should reject at least one seed"
    for c in result.candidates:
        assert c.preview_score == pytest.approx(previews[c.seed], abs=2e-5)
        if c.seed in rejected:
            assert c.image is None and c.score is None and c.steps_run == 2 and c.rejected_at_step == 1
        else:
            assert c.image is not None and c.steps_run == 4
    expected_steps = 2 * len(rejected) + 4 * (len(seeds) - len(rejected))
    assert result.steps_run == expected_steps
    assert result.compute_saved == pytest.approx(1 - expected_steps / (4 * len(seeds)))
    finished = [c for c in result.candidates if c.score is not None]
    assert result.best.score == max(c.score for c in finished)


def test_bad_arguments_are_refused_with_the_value(tiny_model, ddpm, reference_images):
    with pytest.raises(InvalidInputError, match="distinct"):
        best_of_n(ddpm, reference_images, tiny_model, seeds=[1, 1])
    with pytest.raises(InvalidInputError, match="at least one candidate"):
        best_of_n(ddpm, reference_images, tiny_model, n=0)
    with pytest.raises(InvalidInputError, match="aggregate"):
        best_of_n(ddpm, reference_images, tiny_model, aggregate="median")
    with pytest.raises(InvalidInputError, match="DDPMPipeline has no callback_on_step_end"):
        best_of_n(ddpm, reference_images, tiny_model, n=2, early_rejection=EarlyRejection(at_step=0),
                  num_inference_steps=2)
    with pytest.raises(InvalidInputError, match="at_step"):
        EarlyRejection(at_step=-1)
