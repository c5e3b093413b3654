"""Trainer configuration: files, overrides, refusals, shipped configs, the CLI."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest
import yaml

from comfy_nearid.errors import ConfigError
from trainer.cli import CONFIGS_DIR, main, resolve_config_path
from trainer.config import TrainConfig, config_to_dict, load_config, parse_override_args, write_config


def test_defaults_are_the_paper_recipe():
    # Values from PROTOCOL section 6 (R7 recipe).
    c = TrainConfig()
    assert c.model.backbone == "siglip2-so400m"
    assert (c.train.batch_size, c.train.epochs, c.train.mixed_precision) == (128, 11, "fp16")
    assert (c.optim.lr, c.optim.weight_decay, c.optim.warmup_steps, c.optim.schedule) == (1e-4, 1e-4, 100, "cosine")
    assert c.optim.max_grad_norm == 1.0
    assert (c.data.positives, c.data.negatives) == (2, 3)
    assert (c.loss.temperature, c.loss.alpha) == (0.07, 0.5)


def test_paper_yaml_matches_the_recipe():
    c = load_config(CONFIGS_DIR / "paper.yaml")
    assert c.model.backbone == "siglip2-so400m" and c.model.init_head == "own"
    assert (c.train.batch_size, c.train.epochs, c.train.mixed_precision) == (128, 11, "fp16")
    assert (c.optim.lr, c.optim.weight_decay, c.optim.warmup_steps, c.optim.max_grad_norm) == (1e-4, 1e-4, 100, 1.0)
    assert (c.data.positives, c.data.negatives, c.loss.temperature, c.loss.alpha) == (2, 3, 0.07, 0.5)
    assert c.data.format == "published" and len(c.data.distractor_paths) == 9


def test_synth_yaml_loads_with_the_small_backbone():
    c = load_config(CONFIGS_DIR / "synth.yaml")
    assert c.model.backbone == "mobilenet-v2"
    assert c.data.format == "folder"
    assert c.features.cache is True


def test_overrides_in_both_spellings_and_types(tmp_path):
    path = tmp_path / "c.yaml"
    path.write_text("train:\n  epochs: 4\noptim:\n  lr: 1e-3\n")  # YAML reads 1e-3 as a string
    c = load_config(
        path,
        [
            "--train.epochs", "2",
            "optim.weight_decay=0.05",
            "--data.sources", "object,part",
            "--resume=latest",
            "data.distractor_paths={a: /x, b: /y}",
            "--augment.flip_prob", "0.5",
            "--train.max_steps", "none",
            "--logging.progress", "false",
        ],
    )
    assert c.train.epochs == 2
    assert c.optim.lr == pytest.approx(1e-3)
    assert c.optim.weight_decay == pytest.approx(0.05)
    assert c.data.sources == ["object", "part"]
    assert c.checkpoint.resume == "latest"
    assert c.data.distractor_paths == {"a": "/x", "b": "/y"}
    assert c.augment.flip_prob == 0.5
    assert c.train.max_steps is None
    assert c.logging.progress is False


def test_json_config(tmp_path):
    path = tmp_path / "c.json"
    path.write_text(json.dumps({"seed": 7, "loss": {"alpha": 0.25}}))
    c = load_config(path)
    assert (c.seed, c.loss.alpha) == (7, 0.25)


@pytest.mark.parametrize(
    "text,overrides,message",
    [
        ("train:\n  epoch: 3\n", [], "unknown config key 'train.epoch'"),
        ("trian:\n  epochs: 3\n", [], "unknown config key 'trian'"),
        ("train:\n  epochs: three\n", [], "train.epochs: expected int"),
        ("train:\n  epochs: 2.5\n", [], "train.epochs: expected int"),
        ("train:\n  mixed_precision: fp8\n", [], "train.mixed_precision: must be one of"),
        ("logging:\n  progress: 1\n", [], "logging.progress: expected bool"),
        ("data:\n  sources: object\n", [], r"data.sources: expected list\[str\]"),
        ("", ["--optim.lr", "fast"], "optim.lr: expected float"),
        ("", ["--optim.learning_rate", "1"], "unknown config key 'optim.learning_rate'"),
        ("", ["--train", "3"], "config key 'train' is a section"),
        ("", ["--train.epochs"], "has no value"),
        ("", ["train.epochs"], "cannot read override"),
        ("", ["--loss.temperature", "0"], "loss.temperature must be > 0"),
        ("", ["--train.batch_size", "0"], "train.batch_size must be >= 1"),
        ("", ["--features.cache", "true", "--augment.flip_prob", "0.5"], "cannot be combined with augmentations"),
        ("- a\n- b\n", [], "must hold a mapping"),
        ("train: [\n", [], "is not valid YAML"),
    ],
)
def test_bad_configs_are_refused_naming_the_key(tmp_path, text, overrides, message):
    path = tmp_path / "bad.yaml"
    path.write_text(text)
    with pytest.raises(ConfigError, match=message):
        load_config(path, overrides)


def test_missing_config_file(tmp_path):
    with pytest.raises(ConfigError, match="does not exist"):
        load_config(tmp_path / "nope.yaml")


def test_resolved_config_round_trips(tmp_path):
    c = load_config(None, ["--seed", "3", "--data.sources", "x"])
    path = write_config(c, tmp_path / "run" / "config.yaml")
    again = load_config(path)
    assert config_to_dict(again) == config_to_dict(c)
    assert yaml.safe_load(path.read_text())["seed"] == 3


def test_override_parser_keeps_order_and_aliases():
    assert parse_override_args(["a.b=1", "--c.d", "2", "--resume", "latest"]) == [
        ("a.b", "1"),
        ("c.d", "2"),
        ("checkpoint.resume", "latest"),
    ]


def test_cli_print_config_and_shipped_names(capsys):
    assert resolve_config_path("synth") == CONFIGS_DIR / "synth.yaml"
    assert main(["--config", "synth", "--print-config", "--train.epochs", "5"]) == 0
    printed = yaml.safe_load(capsys.readouterr().out)
    assert printed["train"]["epochs"] == 5
    assert printed["model"]["backbone"] == "mobilenet-v2"


def test_cli_reports_config_errors_with_exit_code_2(caplog):
    assert main(["--print-config", "--train.epochz", "5"]) == 2
    assert "train.epochz" in caplog.text


def test_python_dash_m_trainer_runs(tmp_path):
    result = subprocess.run(
        [sys.executable, "-m", "trainer", "--print-config", "seed=11"],
        capture_output=True, text=True, timeout=300, cwd=tmp_path,
    )
    assert result.returncode == 0, result.stderr
    assert yaml.safe_load(result.stdout)["seed"] == 11
