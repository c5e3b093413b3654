"""The field's standard metrics as scorers: CLIP-I, DINO-I, DINOv2 next to NearID.

Preprocessing is checked against each convention's own reference implementation (torchvision
transforms for DINO / DINOv2, open_clip's ``image_transform`` for CLIP) on odd-sized images;
the readouts against the upstream model code; ``nearid score --scorer`` columns against each
scorer run alone.
"""

from __future__ import annotations

import csv
import json
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from comfy_nearid import get_backbone_spec, load_model
from comfy_nearid.cli import main
from comfy_nearid.errors import DatasetError, InvalidInputError, WeightsNotFoundError
from comfy_nearid.evaluate.scorers import parse_scorer_spec
from comfy_nearid.images import Preprocess
from comfy_nearid.scoring import read_rows

from _scoring_helpers import write_image

# The conventions, as published (DINO eval_knn.py / DINOv2 make_classification_eval_transform:
# Resize(256, bicubic) + CenterCrop(224) + ImageNet statistics; CLIP: open_clip's own transform).
IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
ODD_SIZES = [(37, 53), (53, 37), (301, 199), (199, 301), (224, 224), (256, 300), (640, 17), (17, 640), (1, 1), (225, 224)]


def _odd_images() -> list[Image.Image]:
    rng = np.random.default_rng(7)
    out = []
    for w, h in ODD_SIZES:
        # smooth content plus noise: resampling differences show up on both kinds of pixels
        yy, xx = np.mgrid[0:h, 0:w]
        base = np.stack([(xx * 255 // max(w, 1)), (yy * 255 // max(h, 1)), ((xx + yy) * 7) % 256], -1)
        noise = rng.integers(-40, 41, size=(h, w, 3))
        out.append(Image.fromarray(np.clip(base + noise, 0, 255).astype(np.uint8), "RGB"))
    return out


def _max_pixel_difference(ours: torch.Tensor, reference: torch.Tensor, std) -> float:
    """Largest difference in 0..1 pixel units (normalised values times the std)."""
    assert ours.shape == reference.shape
    scale = torch.tensor(std, dtype=torch.float32).view(3, 1, 1)
    return float(((ours - reference) * scale).abs().max())


def _torchvision_convention(resize: int, crop: int, mean, std):
    from torchvision import transforms as T

    return T.Compose([
        T.Resize(resize, interpolation=T.InterpolationMode.BICUBIC), T.CenterCrop(crop),
        T.ToTensor(), T.Normalize(mean, std),
    ])


@pytest.mark.parametrize("backbone", ["dino-vits16", "dino-vits8", "dinov2-vits14"])
def test_dino_preprocessing_equals_torchvision_resize_256_centre_crop_224(backbone):
    preprocess = get_backbone_spec(backbone).preprocess
    reference = _torchvision_convention(256, 224, IMAGENET_MEAN, IMAGENET_STD)
    for image in _odd_images():
        ours = preprocess(image)
        assert ours.shape == (3, 224, 224)
        assert _max_pixel_difference(ours, reference(image), IMAGENET_STD) <= 1 / 255, image.size


def test_clip_preprocessing_equals_open_clip_image_transform():
    import open_clip

    cfg = open_clip.pretrained.get_pretrained_cfg("ViT-B-32", "openai")
    reference = open_clip.image_transform(224, is_train=False, mean=cfg["mean"], std=cfg["std"],
                                          interpolation=cfg["interpolation"], resize_mode=cfg["resize_mode"])
    preprocess = get_backbone_spec("clip-vit-b32").preprocess
    for image in _odd_images():
        ours = preprocess(image)
        assert ours.shape == (3, 224, 224)
        assert _max_pixel_difference(ours, reference(image), cfg["std"]) <= 1 / 255, image.size


@pytest.mark.parametrize("backbone, resize, crop", [("tiny-dino", 32, 28), ("tiny-clip", 36, 32)])
def test_tiny_test_variants_follow_the_same_convention(backbone, resize, crop):
    spec = get_backbone_spec(backbone)
    reference = _torchvision_convention(resize, crop, spec.mean, spec.std)
    for image in _odd_images():
        assert _max_pixel_difference(spec.preprocess(image), reference(image), spec.std) <= 1 / 255


def test_the_nearid_default_stays_a_squash_resize_without_crop():
    preprocess = Preprocess(30)
    for image in _odd_images():
        expected = np.asarray(image.resize((30, 30), Image.Resampling.BICUBIC), dtype=np.float32) / 255.0
        expected = torch.from_numpy(((expected - 0.5) / 0.5).transpose(2, 0, 1).copy())
        assert torch.equal(preprocess(image), expected)
    # the description is part of every cache key: unchanged for the squash default
    assert preprocess.describe() == "resize30-bicubic-squash-mean0.5,0.5,0.5-std0.5,0.5,0.5"
    assert get_backbone_spec("tiny-siglip").preprocess == Preprocess(30)


def test_preprocess_rejects_bad_settings():
    with pytest.raises(InvalidInputError, match="resize must be one of"):
        Preprocess(32, resize="crop")
    with pytest.raises(InvalidInputError, match="smaller than the crop"):
        Preprocess(32, resize="shorter", resize_size=16)
    with pytest.raises(InvalidInputError, match="applies to resize='shorter' only"):
        Preprocess(32, resize_size=40)
    with pytest.raises(InvalidInputError, match="interpolation"):
        Preprocess(32, interpolation="area")


def test_metric_names_are_pooled_readouts_of_their_backbones():
    assert parse_scorer_spec("clip-i") == ("pooled", "clip-vit-b32")
    assert parse_scorer_spec("dino-i") == ("pooled", "dino-vits16")
    assert parse_scorer_spec("dino-i-s8") == ("pooled", "dino-vits8")
    assert parse_scorer_spec("dinov2") == ("pooled", "dinov2-vits14")
    with pytest.raises(InvalidInputError, match="clip-i, dino-i"):
        parse_scorer_spec("clip")


def test_clip_readout_is_open_clips_own_image_embedding():
    """Our open_clip image tower's pooled readout equals ``CLIP.encode_image`` of an open_clip
    model (built by open_clip itself) that holds the same image-tower weights."""
    import open_clip

    spec = get_backbone_spec("tiny-clip")
    model = load_model(backbone="tiny-clip", readout="pooled", pretrained=False, device="cpu")
    vision = dict(open_clip.get_model_config("ViT-B-32")["vision_cfg"], **spec.open_clip_kwargs["vision_cfg"])
    clip = open_clip.CLIP(embed_dim=16, vision_cfg=vision, quick_gelu=True,
                          text_cfg={"context_length": 8, "vocab_size": 32, "width": 16, "heads": 2, "layers": 1})
    clip.visual.load_state_dict(model.backbone.trunk.state_dict())
    clip.eval()
    images = _odd_images()[:4]
    pixels = model.preprocess_batch(images)
    with torch.no_grad():
        expected = torch.nn.functional.normalize(clip.encode_image(pixels), dim=-1)
    torch.testing.assert_close(model.embed(images), expected, rtol=1e-5, atol=1e-5)


def test_dino_readout_is_the_final_norm_class_token():
    model = load_model(backbone="tiny-dino", readout="pooled", pretrained=False, device="cpu")
    trunk = model.backbone.trunk
    images = _odd_images()[:3]
    pixels = model.preprocess_batch(images)
    with torch.no_grad():  # the ViT computed step by step: patches + [CLS] + positions -> blocks -> norm
        x = trunk.patch_embed(pixels)
        x = torch.cat([trunk.cls_token.expand(len(x), -1, -1), x], dim=1) + trunk.pos_embed
        x = trunk.norm(trunk.blocks(x))
    torch.testing.assert_close(model.embed(images), torch.nn.functional.normalize(x[:, 0], dim=-1),
                               rtol=1e-5, atol=1e-5)
    tokens = load_model(backbone="tiny-dino", readout="mean", pretrained=False, device="cpu")
    torch.testing.assert_close(tokens.embed(images), torch.nn.functional.normalize(x[:, 1:].mean(1), dim=-1),
                               rtol=1e-5, atol=1e-5)


def test_clip_weights_in_open_clip_layout_load_from_a_file(tmp_path):
    """A whole-CLIP state dict (``visual.*`` plus text keys) loads into the image tower."""
    from safetensors.torch import save_file

    source = load_model(backbone="tiny-clip", readout="pooled", pretrained=False, device="cpu", seed=3)
    state = {f"visual.{k}": v.contiguous() for k, v in source.backbone.trunk.state_dict().items()}
    state["text_projection"] = torch.zeros(4, 4)
    path = tmp_path / "open_clip_model.safetensors"
    save_file(state, str(path))
    loaded = load_model(backbone="tiny-clip", readout="pooled", backbone_weights=path, device="cpu", seed=5)
    images = _odd_images()[:2]
    torch.testing.assert_close(loaded.embed(images), source.embed(images))


def test_pretrained_metric_weights_are_never_downloaded_implicitly(tmp_path, monkeypatch):
    monkeypatch.setenv("NEARID_WEIGHTS_DIR", str(tmp_path / "weights"))
    monkeypatch.delenv("NEARID_ALLOW_DOWNLOAD", raising=False)
    for backbone, repo in (("dino-vits16", "timm/vit_small_patch16_224.dino"),
                           ("dinov2-vits14", "timm/vit_small_patch14_dinov2.lvd142m")):
        with pytest.raises(WeightsNotFoundError) as e:
            load_model(backbone=backbone, readout="pooled", device="cpu")
        assert repo in str(e.value) and str(tmp_path / "weights" / backbone) in str(e.value)
    with pytest.raises(WeightsNotFoundError, match="vit_base_patch32_clip_224.openai"):
        load_model(backbone="clip-vit-b32", readout="pooled", device="cpu")


# ------------------------------------------------------------------ nearid score --scorer

SCORERS = ["head", "pooled:tiny-dino", "clip=pooled:tiny-clip"]
MODEL = ["--backbone", "tiny-siglip", "--random-weights", "--no-cache", "--no-progress", "--batch-size", "3"]


def _folder(tmp_path: Path) -> list[str]:
    rng = np.random.default_rng(11)
    write_image(tmp_path / "ref" / "r.png", rng, size=(41, 29))
    for i, size in enumerate([(37, 53), (60, 31), (33, 33), (70, 50), (29, 41)]):
        write_image(tmp_path / "gen" / f"{i}.png", rng, size=size)
    (tmp_path / "gen" / "broken.png").write_bytes(b"not an image")
    return ["--reference", str(tmp_path / "ref"), str(tmp_path / "gen")]


def _scores(path: Path, column: str = "score") -> dict[str, str]:
    with open(path, newline="", encoding="utf-8") as f:
        return {row["path"]: row[column] for row in csv.DictReader(f)}


def test_three_scorers_in_one_run_equal_each_scorer_run_alone(tmp_path):
    layout = _folder(tmp_path)
    together = tmp_path / "together.csv"
    dreambench = tmp_path / "metrics" / "{scorer}" / "method.json"
    args = ["score", *layout, "-o", str(together), *MODEL, "--dreambench-json", str(dreambench)]
    assert main([*args, *(a for s in SCORERS for a in ("--scorer", s))]) == 0
    header = together.read_text(encoding="utf-8").splitlines()[0]
    assert header == "path,subject,cosines,score,match,calibrated,rank,error,score:pooled:tiny-dino,score:clip"

    for scorer, column in zip(SCORERS, ["score", "score:pooled:tiny-dino", "score:clip"]):
        alone = tmp_path / f"alone-{column.replace(':', '_')}.csv"
        alone_json = tmp_path / f"alone-{column.replace(':', '_')}.json"
        assert main(["score", *layout, "-o", str(alone), *MODEL, "--scorer", scorer,
                     "--dreambench-json", str(alone_json)]) == 0
        assert alone.read_text(encoding="utf-8").splitlines()[0] == "path,subject,cosines,score,match,calibrated,rank,error"
        expected = _scores(alone)
        assert _scores(together, column) == expected
        assert sum(1 for v in expected.values() if v) == 5  # five scored, the broken file empty
        name = scorer.split("=")[0].replace(":", "_")
        written = json.loads((tmp_path / "metrics" / name / "method.json").read_text())
        assert written == json.loads(alone_json.read_text())
        assert sorted(written.values()) == pytest.approx(sorted(100 * float(v) for v in expected.values() if v))

    rows = read_rows(together)  # the library reads the extra columns back
    by_path = {r.path: r for r in rows}
    clip_alone = _scores(tmp_path / "alone-score_clip.csv")
    for path, value in clip_alone.items():
        assert by_path[path].scorer_scores["clip"] == (float(value) if value else None)
    summary = json.loads((tmp_path / "together.summary.json").read_text())
    assert summary["scorer"] == "head" and list(summary["scorers"]) == ["pooled:tiny-dino", "clip"]
    alone_summary = json.loads((tmp_path / "alone-score_clip.summary.json").read_text())
    assert summary["scorers"]["clip"]["subjects"]["ref"]["mean"] == alone_summary["subjects"]["ref"]["mean"]

    # resuming the finished run rewrites nothing
    before = together.read_bytes()
    assert main([*args, "--resume", *(a for s in SCORERS for a in ("--scorer", s))]) == 0
    assert together.read_bytes() == before


def test_jsonl_rows_carry_the_score_columns(tmp_path):
    layout = _folder(tmp_path)
    out = tmp_path / "rows.jsonl"
    assert main(["score", *layout, "-o", str(out), *MODEL, "--scorer", "head", "--scorer", "pooled:tiny-dino"]) == 0
    records = [json.loads(line) for line in out.read_text(encoding="utf-8").splitlines()]
    alone = tmp_path / "alone.jsonl"
    assert main(["score", *layout, "-o", str(alone), *MODEL, "--scorer", "pooled:tiny-dino"]) == 0
    expected = {json.loads(line)["path"]: json.loads(line)["score"] for line in alone.read_text().splitlines()}
    assert {r["path"]: r["score:pooled:tiny-dino"] for r in records} == expected


def test_several_scorers_need_one_dreambench_file_each(tmp_path, capsys):
    layout = _folder(tmp_path)
    code = main(["score", *layout, "-o", str(tmp_path / "x.csv"), *MODEL, "--scorer", "head",
                 "--scorer", "pooled:tiny-dino", "--dreambench-json", str(tmp_path / "one.json")])
    assert code != 0
    assert "{scorer}" in capsys.readouterr().err
    assert not (tmp_path / "x.csv").exists()


def test_a_rows_file_with_a_bad_score_column_is_refused(tmp_path):
    path = tmp_path / "rows.csv"
    path.write_text("path,subject,cosines,score,calibrated,rank,error,clip\nx.png,s,0.5,0.5,,1,,0.2\n")
    with pytest.raises(DatasetError, match="score:<name>"):
        read_rows(path)


@pytest.mark.slow  # builds the real DINO ViT-S/16 (random weights) twice: ~30 s on a busy CPU
def test_eval_ssr_takes_a_metric_name_and_its_similarities_are_the_models(tmp_path):
    """``nearid eval ssr --scorer dino-i``: the DINO ViT-S/16 CLS readout (random weights here);
    view-view similarities equal cosines of the same model's embeddings computed directly."""
    from _eval_helpers import write_tiny_dataset
    from comfy_nearid.data.folder import FolderDataset

    root = write_tiny_dataset(tmp_path / "ds", n_samples=2, seed=3)
    out = tmp_path / "out"
    assert main(["eval", "ssr", "--data", str(root), "--scorer", "dino-i", "--random-weights", "--device", "cpu",
                 "--bootstrap", "0", "--no-progress", "--out", str(out)]) == 0
    with open(out / "dino-i.samples.csv", newline="") as f:
        table = {row["id"]: row for row in csv.DictReader(f)}
    model = load_model(backbone="dino-vits16", readout="pooled", pretrained=False, device="cpu")
    first = next(iter(FolderDataset(root)))
    views = [ref.load() for ref in first.views[:2]]
    emb = model.embed(views)
    sim_01 = float(emb[0] @ emb[1])
    assert float(table[first.id]["sim_01"]) == pytest.approx(sim_01, abs=1e-5)


def test_masks_follow_the_centre_crop():
    """tiny-dino: shorter side 32, crop 28. A 64x32 image is not resized; the crop keeps
    columns 18..45 and rows 2..29. A mask of exactly that window covers every token; a mask
    of the 18 left columns lies wholly outside the crop."""
    from comfy_nearid.model import masks_to_token_mask

    spec = get_backbone_spec("tiny-dino")
    window = np.zeros((32, 64), dtype=np.float32)
    window[2:30, 18:46] = 1.0
    assert masks_to_token_mask([window], spec).all()
    left = np.zeros((32, 64), dtype=np.float32)
    left[:, :18] = 1.0
    # wholly outside the crop, so empty once cropped: the one policy for an empty mask keeps
    # every token (it would keep none if the crop were not applied to the mask first)
    assert masks_to_token_mask([left], spec).all()
    # the window's left half: only the tokens of those columns of the crop
    half = np.zeros((32, 64), dtype=np.float32)
    half[2:30, 18:32] = 1.0
    grid = masks_to_token_mask([half], spec)[0].reshape(spec.grid_size)
    gh, gw = spec.grid_size
    assert grid[:, : gw // 2].all() and not grid[:, gw // 2:].any()


@pytest.mark.slow  # builds the real-size networks (random weights): about a minute on a busy CPU
@pytest.mark.parametrize("backbone, file_name, prefix", [
    ("dino-vits16", "model.safetensors", ""),
    ("dinov2-vits14", "model.safetensors", ""),
    ("clip-vit-b32", "open_clip_model.safetensors", "visual."),
])
def test_real_metric_backbones_load_their_weights_from_the_weights_folder(backbone, file_name, prefix, tmp_path,
                                                                          monkeypatch):
    """Weights written in the upstream layout (timm's, or open_clip's whole-CLIP ``visual.*``)
    are found in ``$NEARID_WEIGHTS_DIR/<backbone>/`` and give the embeddings of the network
    they came from; the pooled width is the metric's."""
    from safetensors.torch import save_file

    source = load_model(backbone=backbone, readout="pooled", pretrained=False, device="cpu", seed=1)
    folder = tmp_path / "weights" / backbone
    folder.mkdir(parents=True)
    save_file({prefix + k: v.contiguous() for k, v in source.backbone.trunk.state_dict().items()},
              str(folder / file_name))
    monkeypatch.setenv("NEARID_WEIGHTS_DIR", str(tmp_path / "weights"))
    loaded = load_model(backbone=backbone, readout="pooled", device="cpu")
    images = _odd_images()[:3]
    expected = source.embed(images)
    assert expected.shape == (3, get_backbone_spec(backbone).pooled_dim or get_backbone_spec(backbone).embed_dim)
    torch.testing.assert_close(loaded.embed(images), expected, rtol=1e-5, atol=1e-5)
