"""The trainer's validation reports what `nearid eval ssr` reports for the exported head.

Validation embeds through the same readout as the library (IdentityModel.embed_tokens) on fp32
tokens (live, or a float32 feature cache beside a float16 training cache), masks images with
the same mask -> token-grid function, and gives a distractor without its own mask its view's
mask, as the evaluator does. So the last validation's SSR / PA of ``head_last.safetensors``
equal `nearid eval ssr --scorer head:head_last.safetensors` on the same split, and the
validation embeddings equal ``load_model(head=...).embed`` of the same images.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from comfy_nearid import load_model
from comfy_nearid.cli import main
from comfy_nearid.data.folder import FolderDataset
from trainer.data import ImageSlot, scan_layout
from trainer.loop import train
from trainer.validation import live_embedder

from _trainer_helpers import make_folder_dataset, tiny_config

torch.set_num_threads(1)


@pytest.fixture(scope="module")
def roots(tmp_path_factory):
    base = tmp_path_factory.mktemp("val-eq")
    train_root = make_folder_dataset(base / "train", n_samples=8, seed=1)
    val_root = make_folder_dataset(base / "val", n_samples=6, seed=2)
    # a distractor without a mask of its own: both sides must give it its view's mask
    for path in (val_root / "id0001").glob("*/mask1.png"):
        path.unlink()
    return train_root, val_root


def _eval_cli(head: Path, val_root: Path, out: Path, masks: bool) -> dict:
    argv = ["eval", "ssr", "--data", str(val_root), "--scorer", f"head:{head}", "--random-weights",
            "--device", "cpu", "--batch-size", "5", "--bootstrap", "0", "--no-progress",
            "--out", str(out), "--json", str(out / "summary.json")]
    assert main(argv + (["--masks"] if masks else [])) == 0
    return json.loads((out / "summary.json").read_text())[f"head:{head}"]


@pytest.mark.parametrize(
    "cache,masks",
    [(False, False), (True, False), (True, True)],
    ids=["live", "float16-cache", "float16-cache-masks"],
)
def test_last_validation_equals_nearid_eval_on_the_exported_head(tmp_path, roots, cache, masks):
    train_root, val_root = roots
    cfg = tiny_config(
        tmp_path, train_root, train__epochs=1,
        data__val=str(val_root), data__foreground_mask=masks,
        features__cache=cache, features__dtype="float16",  # training tokens rounded; validation not
    )
    result = train(cfg)
    assert result.global_step == 2
    val = result.last_validation
    evaluated = _eval_cli(result.last_head_path, val_root, tmp_path / "eval", masks)
    assert evaluated["n_samples"] == val["n_samples"] == 12  # 6 samples x 2 sources, pooled
    assert evaluated["n_trials"] == val["n_trials"]
    assert evaluated["ssr"] == val["ssr"]
    assert evaluated["pa"] == val["pa"]
    assert evaluated["pa_reference"] == val["pa_reference"]
    for source, stats in val["by_source"].items():
        assert evaluated["by_source"][source]["ssr"] == stats["ssr"], source


def test_validation_embeddings_are_the_exported_heads(tmp_path, roots):
    # Sensitive to a rounding of tokens: fp16 tokens move tiny-siglip embeddings by ~1e-3.
    _, val_root = roots
    model = load_model(backbone="tiny-siglip", pretrained=False, device="cpu", dtype="fp32", seed=0)
    torch.manual_seed(3)
    model.head.reset_parameters()
    head_file = model.save_head(tmp_path / "head.safetensors")
    dataset = FolderDataset(val_root)
    layout = scan_layout(dataset, None, require_distractors=True, purpose="validation")
    keys = [(s.index, ImageSlot(k)) for s in layout.samples for k in s.views]
    keys += [(s.index, ImageSlot(k, "object")) for s in layout.samples for k in s.distractors.get("object", [])]
    validation = live_embedder(model, model.head, dataset, foreground_mask=True, batch_size=4)(keys)

    exported = load_model(head=head_file, pretrained=False, device="cpu", seed=0)
    images, masks = [], []
    for index, slot in keys:
        sample = dataset[index]
        images.append(slot.ref(sample).load())
        # the evaluator's rule, written out: a distractor's own mask, else its view's mask
        own = sample.distractor_masks.get(slot.source, [None] * 3)[slot.view] if slot.source else None
        mask = own if own is not None else sample.masks[slot.view]
        masks.append(mask.load())
    assert any(
        slot.source and dataset[i].distractor_masks[slot.source][slot.view] is None for i, slot in keys
    ), "the fixture should hold a distractor without its own mask"
    expected = torch.cat([exported.embed(images[i : i + 1], masks=masks[i : i + 1]) for i in range(len(images))])
    torch.testing.assert_close(validation, expected, atol=1e-6, rtol=0)
    rounded = exported.embed_tokens(
        exported.tokens(exported.preprocess_batch(images[:4])).half().float(),
        exported.token_mask(masks[:4], 4),
    )
    assert (rounded - expected[:4]).abs().max() > 1e-6  # the test can see a token rounding
