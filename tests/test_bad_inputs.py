"""Every bad input a user can hand us, table-driven: `nearid score`, `nearid eval ssr/mtg/human`,
head and weights files, the nodes. Each case checks the exit status, that the message names the
culprit, that no traceback reaches the user, and that no good row was lost (the good rows equal
those of a run without the bad entries). The corpus is written by tests/_bad_inputs.py."""

from __future__ import annotations

import json
import os
import shutil
import sys
import threading
import warnings
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

import _bad_inputs as corpus
from _scoring_helpers import TINY_MODEL_ARGS, cosines_direct, run_nearid
from comfy_nearid.cli import main

N_GOOD = 4
SCORE_ARGS = (*TINY_MODEL_ARGS, "--batch-size", "1", "--workers", "2")  # batch 1: every float independent of neighbours


# ============================================================================ helpers
def _rows(path: Path, gen: Path) -> dict[str, dict]:
    """Rows by path relative to ``gen`` (the path as found in the folder)."""
    out = {}
    for line in path.read_text(encoding="utf-8").splitlines():
        row = json.loads(line)
        out[Path(row["path"]).relative_to(gen).as_posix()] = row
    return out


def _run(argv: list[str], capsys) -> tuple[int, str, str]:
    rc = main(argv)
    captured = capsys.readouterr()
    assert "Traceback" not in captured.err, captured.err
    return rc, captured.out, captured.err


@pytest.fixture(scope="module")
def good_tree(tmp_path_factory):
    """One reference and N_GOOD good generated images, and the rows of a clean run over them."""
    root = tmp_path_factory.mktemp("good")
    rng = np.random.default_rng(7)
    ref = corpus.write_png(root / "ref.png", rng)
    gen = root / "gen"
    for i in range(N_GOOD):
        corpus.write_png(gen / f"g{i}.png", rng)
    assert main(["score", "--reference", str(ref), str(gen), "-o", str(root / "clean.jsonl"), "--no-cache",
                 *SCORE_ARGS]) == 0
    return ref, gen, _rows(root / "clean.jsonl", gen)


def _copy_good(good_gen: Path, dest: Path) -> Path:
    shutil.copytree(good_gen, dest)
    return dest


def _decode_counter(monkeypatch) -> list[str]:
    """Count every image decode (the refusals below must come before the first one)."""
    import comfy_nearid.images as images

    calls: list[str] = []
    real = images.decode_image

    def counting(opener, description, mode="RGB"):
        calls.append(description)
        return real(opener, description, mode)

    monkeypatch.setattr(images, "decode_image", counting)
    return calls


# ============================================================================ score: entries in GEN_DIR
@pytest.mark.parametrize("case", sorted(corpus.ENTRY_CASES))
def test_score_reports_a_bad_entry_as_a_row_and_keeps_every_good_row(case, good_tree, tiny_model, tmp_path,
                                                                       monkeypatch, capsys, caplog):
    ref, good_gen, clean = good_tree
    gen = _copy_good(good_gen, tmp_path / "gen")
    outside = tmp_path / "outside"
    outside.mkdir()
    entry = corpus.ENTRY_CASES[case](gen, outside, np.random.default_rng(1))
    if entry.pixel_limit is not None:
        monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", entry.pixel_limit)
    out = tmp_path / "o.jsonl"
    rc, printed, err = _run(["score", "--reference", str(ref), str(gen), "-o", str(out), "--no-cache", *SCORE_ARGS],
                            capsys)
    assert rc == 0, err
    rows = _rows(out, gen)
    expected_names = set(clean) | {b.name for b in entry.bad} | {g.name for g in entry.good}
    assert set(rows) == expected_names
    for name, row in clean.items():  # no good row lost or changed
        assert rows[name]["error"] is None
        assert (rows[name]["score"], rows[name]["cosines"]) == (row["score"], row["cosines"])
    for bad in entry.bad:
        row = rows[bad.name]
        assert row["score"] is None and row["rank"] is None
        assert bad.reason in row["error"], row["error"]
    if entry.good:
        expected = cosines_direct(tiny_model, [ref], [g.equivalent for g in entry.good])[:, 0]
        got = [rows[g.name]["score"] for g in entry.good]
        np.testing.assert_allclose(got, expected, atol=2e-6)
    if not entry.good:  # same good images, same ranks
        assert {n: rows[n]["rank"] for n in clean} == {n: r["rank"] for n, r in clean.items()}
    if entry.warns:
        assert any(entry.warns in r.getMessage() for r in caplog.records if r.levelname == "WARNING")
    summary = json.loads((tmp_path / "o.summary.json").read_text())
    assert summary["num_errors"] == len(entry.bad)


def test_score_with_every_bad_entry_at_once(good_tree, tmp_path, monkeypatch, capsys):
    ref, good_gen, clean = good_tree
    gen = _copy_good(good_gen, tmp_path / "gen")
    outside = tmp_path / "outside"
    outside.mkdir()
    bad, good = [], []
    for name, build in corpus.ENTRY_CASES.items():
        entry = build(gen, outside, np.random.default_rng(len(name)))
        bad += entry.bad
        good += entry.good
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", corpus.BOMB_LIMIT)
    out = tmp_path / "o.csv"
    rc, printed, err = _run(["score", "--reference", str(ref), str(gen), "-o", str(out), "--no-cache",
                             *TINY_MODEL_ARGS, "--batch-size", "5"], capsys)
    assert rc == 0, err
    import csv

    with open(out, newline="", encoding="utf-8") as f:
        rows = {Path(r["path"]).relative_to(gen).as_posix(): r for r in csv.DictReader(f)}
    assert set(rows) == set(clean) | {b.name for b in bad} | {g.name for g in good}
    assert all(rows[b.name]["error"] and b.reason in rows[b.name]["error"] for b in bad)
    assert all(not rows[n]["error"] for n in [*clean, *(g.name for g in good)])
    assert f"{len(bad)} unreadable" in printed


@pytest.mark.slow
@pytest.mark.timeout(300)
def test_a_fifo_in_gen_dir_never_hangs_a_real_process(tmp_path):
    rng = np.random.default_rng(0)
    ref = corpus.write_png(tmp_path / "ref.png", rng)
    gen = tmp_path / "gen"
    corpus.write_png(gen / "a.png", rng)
    os.mkfifo(gen / "b.png")
    os.mkfifo(tmp_path / "ref_pipe.png")
    proc = run_nearid(["score", "--reference", str(ref), str(gen), "-o", str(tmp_path / "o.jsonl"), "--no-cache",
                       *TINY_MODEL_ARGS], cwd=tmp_path, timeout=240)
    assert proc.returncode == 0, proc.stderr
    rows = _rows(tmp_path / "o.jsonl", gen)
    assert rows["a.png"]["error"] is None and "FIFO" in rows["b.png"]["error"]
    # A FIFO given as the reference is refused before any work, not read.
    proc = run_nearid(["score", "--reference", str(tmp_path / "ref_pipe.png"), str(gen), "-o",
                       str(tmp_path / "o2.jsonl"), "--no-cache", *TINY_MODEL_ARGS], cwd=tmp_path, timeout=240)
    assert proc.returncode == 2 and "ref_pipe.png" in proc.stderr and "FIFO" in proc.stderr
    assert "Traceback" not in proc.stderr


# ============================================================================ score: refused before any work
def _afile(tmp: Path) -> Path:
    path = tmp / "afile"
    path.write_text("a file, not a folder")
    return path


def _head_with(tmp: Path, tiny_model, **changes) -> Path:
    good = tmp / "good_head.safetensors"
    if not good.exists():
        tiny_model.save_head(good)
    return corpus.tampered_head(good, tmp / "bad_head.safetensors", **changes)


# name -> builder(tmp, tiny_model) -> (argv replacing parts of the default run, words the message names)
SCORE_REFUSALS = {
    "output_parent_is_a_file": lambda t, m: ({"-o": str(_afile(t) / "o.jsonl")}, "afile"),
    "output_is_a_directory": lambda t, m: ({"-o": str((t / "dir.jsonl").mkdir() or t / "dir.jsonl")}, "is a directory"),
    "summary_parent_is_a_file": lambda t, m: ({"--summary": str(_afile(t) / "s.json")}, "afile"),
    "dreambench_parent_is_a_file": lambda t, m: ({"--dreambench-json": str(_afile(t) / "d.json")}, "afile"),
    "cache_parent_is_a_file": lambda t, m: ({"--cache": str(_afile(t) / "c.sqlite")}, "embedding cache"),
    "cache_is_a_directory": lambda t, m: ({"--cache": str(t)}, "is a directory"),
    "reference_dangling_link": lambda t, m: (
        {"--reference": str((t / "r.png").symlink_to(t / "gone.png") or t / "r.png")}, "r.png"),
    "backbone_weights_torch_pickle": lambda t, m: (
        {"--backbone-weights": str(corpus.pickled_object(t / "w.pt")), "--random-weights": None}, "w.pt"),
    "backbone_weights_plain_pickle": lambda t, m: (
        {"--backbone-weights": str(corpus.plain_pickle(t / "w.bin")), "--random-weights": None}, "w.bin"),
    "backbone_weights_pickle_renamed_safetensors": lambda t, m: (
        {"--backbone-weights": str(corpus.pickle_renamed_safetensors(t / "w.safetensors")),
         "--random-weights": None}, "w.safetensors"),
    "head_pickle_renamed_safetensors": lambda t, m: (
        {"--head": str(corpus.pickle_renamed_safetensors(t / "h.safetensors")), "--backbone": None}, "h.safetensors"),
    "head_huge_header_length": lambda t, m: (
        {"--head": str(corpus.huge_header_length(t / "h.safetensors")), "--backbone": None}, "h.safetensors"),
    "head_metadata_mismatching_tensors": lambda t, m: (
        {"--head": str(_head_with(t, m, mlp_dim="20")), "--backbone": None}, "mlp.fc1.weight has shape"),
    "mapping_with_gen_dir": lambda t, m: ({"--mapping": str(_afile(t))}, "--mapping"),
}
if Path("/proc/self").is_dir():
    SCORE_REFUSALS["output_under_proc"] = lambda t, m: ({"-o": "/proc/nearid-no-such/o.jsonl"}, "/proc/nearid-no-such")
    SCORE_REFUSALS["cache_under_proc"] = lambda t, m: ({"--cache": "/proc/nearid-no-such/c.sqlite"}, "/proc/nearid-no-such")


def _score_argv(ref: Path, gen: Path, out: Path, overrides: dict[str, str | None]) -> list[str]:
    options: dict[str, str | None] = {"--reference": str(ref), "-o": str(out), "--no-cache": "", "--random-weights": ""}
    if "--cache" in overrides:
        options.pop("--no-cache")
    options.update(overrides)
    argv = ["score", str(gen)]
    for key, value in options.items():
        if value is None:
            continue
        argv += [key] if value == "" else [key, value]
    base = [a for a in TINY_MODEL_ARGS if a != "--random-weights"]
    if "--backbone" in overrides:  # a head file names its backbone
        i = base.index("--backbone")
        base = base[:i] + base[i + 2:]
    return argv + base


@pytest.mark.parametrize("case", sorted(SCORE_REFUSALS))
def test_score_refuses_bad_paths_and_model_files_before_decoding_any_image(case, good_tree, tiny_model, tmp_path,
                                                                           monkeypatch, capsys):
    ref, gen, _ = good_tree
    overrides, culprit = SCORE_REFUSALS[case](tmp_path, tiny_model)
    out = tmp_path / "o.jsonl"
    decoded = _decode_counter(monkeypatch)
    rc, printed, err = _run(_score_argv(ref, gen, out, overrides), capsys)
    assert rc == 2, err
    assert culprit in err
    assert len(err.strip().splitlines()) == 1, err
    assert decoded == []
    assert not out.exists()


@pytest.mark.skipif(os.geteuid() == 0, reason="root writes through file permissions")
@pytest.mark.parametrize("what", ["folder", "rows_file_resume", "cache_file"])
def test_score_refuses_paths_without_write_permission_with_the_right_advice(what, good_tree, tmp_path, capsys):
    ref, gen, _ = good_tree
    locked = tmp_path / "locked"
    locked.mkdir()
    argv = ["score", "--reference", str(ref), str(gen), *TINY_MODEL_ARGS]
    if what == "folder":
        argv += ["-o", str(locked / "o.jsonl"), "--no-cache"]
    elif what == "rows_file_resume":
        (locked / "o.jsonl").write_text("")
        (locked / "o.jsonl").chmod(0o444)
        argv += ["-o", str(locked / "o.jsonl"), "--no-cache", "--resume"]
    else:
        (locked / "c.sqlite").write_bytes(b"")
        (locked / "c.sqlite").chmod(0o444)
        argv += ["-o", str(tmp_path / "o.jsonl"), "--cache", str(locked / "c.sqlite")]
    locked.chmod(0o555)
    try:
        rc, _, err = _run(argv, capsys)
    finally:
        locked.chmod(0o755)
    assert rc == 2 and "permission denied" in err and "delete it" not in err


@pytest.mark.parametrize("case", sorted(corpus.HEAD_METADATA_CASES))
def test_tampered_head_metadata_is_refused_naming_the_field(case, good_tree, tiny_model, tmp_path, capsys):
    from comfy_nearid import load_model
    from comfy_nearid.errors import CheckpointError

    key, value, words = corpus.HEAD_METADATA_CASES[case]
    head = _head_with(tmp_path, tiny_model, **{key: value})
    with pytest.raises(CheckpointError) as info:  # the library
        load_model(head=head, pretrained=False, device="cpu")
    assert repr(key) in str(info.value) and words in str(info.value) and "bad_head.safetensors" in str(info.value)
    ref, gen, _ = good_tree
    rc, _, err = _run(_score_argv(ref, gen, tmp_path / "o.jsonl", {"--head": str(head), "--backbone": None}), capsys)
    assert rc == 2 and repr(key) in err and words in err  # the CLI


def test_pickled_backbone_weights_are_refused_by_the_library(tmp_path):
    from comfy_nearid import load_model
    from comfy_nearid.errors import CheckpointError

    for path in (corpus.pickled_object(tmp_path / "w.pt"), corpus.plain_pickle(tmp_path / "p.bin")):
        with pytest.raises(CheckpointError, match=rf"{path.name}.*(pickle|cannot read weights)"):
            load_model(backbone="tiny-siglip", backbone_weights=path, device="cpu")


def test_strict_resume_stays_strict(good_tree, tmp_path, capsys):
    ref, good_gen, clean = good_tree
    gen = _copy_good(good_gen, tmp_path / "gen")
    corpus.corrupt_png(gen, tmp_path, np.random.default_rng(0))
    out = tmp_path / "o.jsonl"
    argv = ["score", "--reference", str(ref), str(gen), "-o", str(out), "--no-cache", *SCORE_ARGS]
    rc, _, err = _run([*argv, "--strict"], capsys)
    assert rc == 2 and "x_corrupt.png" in err
    rc, _, err = _run([*argv, "--strict", "--resume"], capsys)
    assert rc == 2 and "x_corrupt.png" in err and "--strict" in err
    assert not (tmp_path / "o.summary.json").exists()  # never finished
    rc, _, err = _run([*argv, "--resume"], capsys)  # without --strict: the error row is accepted
    assert rc == 0, err
    rows = _rows(out, gen)
    assert "corrupt" in rows["x_corrupt.png"]["error"]
    assert {n: rows[n]["score"] for n in clean} == {n: r["score"] for n, r in clean.items()}


def test_mapping_files_in_other_encodings_or_with_duplicate_keys(good_tree, tmp_path, capsys):
    ref, gen, clean = good_tree
    cases = {
        "bom.csv": (b"\xef\xbb\xbf" + f"subject,references,generated\ndog,{ref},{gen}\n".encode(), None),
        "latin1.csv": (f"subject,references,generated\nd\u00e9,{ref},{gen}\n".encode("latin-1"), "not UTF-8"),
        "gz.json": (__import__("gzip").compress(b"{}"), "gzip"),
        "dup.json": (json.dumps({"dog": {"references": str(ref), "generated": str(gen)}})[:-1].encode()
                     + b', "dog": {}}', "'dog' appears twice"),
    }
    for name, (data, words) in cases.items():
        mapping = tmp_path / name
        mapping.write_bytes(data)
        out = tmp_path / f"{name}.jsonl"
        rc, _, err = _run(["score", "--mapping", str(mapping), "-o", str(out), "--no-cache", *SCORE_ARGS], capsys)
        if words is None:
            assert rc == 0, err
            rows = _rows(out, gen)
            assert {n: r["score"] for n, r in rows.items()} == {n: r["score"] for n, r in clean.items()}
        else:
            assert rc == 2 and words in err and name in err, err


# ============================================================================ ranks
def test_ranks_break_ties_by_path_and_ignore_float_noise():
    from comfy_nearid.scoring.outputs import _ranks_within_subjects

    # Hand-worked: subject 0 holds d (0.9), b and a tied at 0.5 (b 1e-7 above: float noise),
    # c 0.3, an error row e; subject 1 holds z 0.2 and y 0.2 (exact tie).
    paths = ["d", "b", "a", "c", "e", "z", "y"]
    subjects = np.array([0, 0, 0, 0, 0, 1, 1])
    scores = np.array([0.9, 0.5 + 1e-7, 0.5, 0.3, np.nan, 0.2, 0.2])
    assert _ranks_within_subjects(subjects, scores, paths).tolist() == [1, 3, 2, 4, 0, 2, 1]


def test_cache_on_and_off_give_the_same_ranks(good_tree, tmp_path, capsys):
    ref, good_gen, _ = good_tree
    gen = _copy_good(good_gen, tmp_path / "gen")
    for i in range(N_GOOD):  # exact duplicates: tied scores whatever the batching
        shutil.copy(gen / f"g{i}.png", gen / f"copy{i}.png")
    ranks = []
    for name, cache in (("off", ["--no-cache"]), ("cold", ["--cache", str(tmp_path / "c.sqlite")]),
                        ("warm", ["--cache", str(tmp_path / "c.sqlite")])):
        out = tmp_path / f"{name}.jsonl"
        rc, _, err = _run(["score", "--reference", str(ref), str(gen), "-o", str(out), *cache, *TINY_MODEL_ARGS,
                           "--batch-size", "3"], capsys)
        assert rc == 0, err
        ranks.append({n: r["rank"] for n, r in _rows(out, gen).items()})
    assert ranks[0] == ranks[1] == ranks[2]
    for i in range(N_GOOD):  # of each tied pair, the smaller path ranks first
        assert ranks[0][f"copy{i}.png"] + 1 == ranks[0][f"g{i}.png"]


# ============================================================================ image decoding in threads
def test_threaded_decoding_refuses_every_bomb_and_leaves_warning_filters_alone(tmp_path, monkeypatch):
    from comfy_nearid.errors import ImageLoadError
    from comfy_nearid.images import load_image

    bomb = tmp_path / "bomb.png"
    Image.fromarray(np.zeros((64, 64, 3), np.uint8)).save(bomb)  # 4,096 px
    small = corpus.write_png(tmp_path / "small.png", np.random.default_rng(0))
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", corpus.BOMB_LIMIT)
    filters_before = list(warnings.filters)
    interval = sys.getswitchinterval()
    sys.setswitchinterval(1e-6)  # force thread switches inside the decoder

    def attempt(i: int) -> str:
        try:
            load_image(bomb if i % 2 == 0 else small)
            return "decoded"
        except ImageLoadError as e:
            return "refused" if "decompression-bomb" in str(e) else str(e)

    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", Image.DecompressionBombWarning)  # the test's own noise only
            filters_inside = list(warnings.filters)
            with ThreadPoolExecutor(8) as pool:
                outcomes = list(pool.map(attempt, range(800)))
            assert list(warnings.filters) == filters_inside
    finally:
        sys.setswitchinterval(interval)
    assert outcomes[0::2] == ["refused"] * 400
    assert outcomes[1::2] == ["decoded"] * 400
    assert list(warnings.filters) == filters_before
    assert Image.MAX_IMAGE_PIXELS == corpus.BOMB_LIMIT  # read, never changed
    # A caller's own Image.open afterwards: Pillow's usual warning, not an error.
    with warnings.catch_warnings(record=True) as seen:
        warnings.simplefilter("always")
        with Image.open(bomb) as im:
            im.load()
    assert any(issubclass(w.category, Image.DecompressionBombWarning) for w in seen)
    assert threading.active_count() >= 1


# ============================================================================ CLI top level
def test_unexpected_errors_are_one_line_with_a_hint_and_the_traceback_under_v(monkeypatch, capsys):
    import comfy_nearid.commands.backbones as backbones

    def broken(args):
        raise RuntimeError("disk on fire")

    monkeypatch.setattr(backbones, "run", broken)
    rc = main(["backbones"])
    err = capsys.readouterr().err
    assert rc == 1 and err.strip().splitlines() == [
        "nearid backbones: unexpected error: RuntimeError: disk on fire; run with -v for the traceback"]
    rc = main(["-v", "backbones"])
    err = capsys.readouterr().err
    assert rc == 1 and "Traceback" in err and "disk on fire" in err


# ============================================================================ eval ssr / mtg
@pytest.fixture(scope="module")
def plain_csv(tmp_path_factory):
    plain = tmp_path_factory.mktemp("csv") / "plain.csv"
    plain.write_text(corpus.SIMILARITY_CSV, encoding="utf-8")
    return plain


def _eval_summary(out: Path) -> dict:
    return json.loads((out / "summary.json").read_text())["x"]


@pytest.mark.parametrize("benchmark", ["ssr", "mtg"])
@pytest.mark.parametrize("variant", sorted(corpus.SIMILARITY_CSV_VARIANTS))
def test_eval_similarity_csv_variants(variant, benchmark, plain_csv, tmp_path, capsys):
    data, words = corpus.SIMILARITY_CSV_VARIANTS[variant]
    path = tmp_path / f"{variant}.csv"
    path.write_bytes(data)
    out = tmp_path / "o"
    rc, _, err = _run(["eval", benchmark, "--csv", f"x={path}", "--out", str(out), "--bootstrap", "0"], capsys)
    if words is None:
        assert rc == 0, err
        clean_out = tmp_path / "clean"
        assert main(["eval", benchmark, "--csv", f"x={plain_csv}", "--out", str(clean_out), "--bootstrap", "0"]) == 0
        assert _eval_summary(out) == _eval_summary(clean_out)
    else:
        assert rc == 2, err
        assert words in err and path.name in err, err
        assert len(err.strip().splitlines()) == 1
        assert not (out / "summary.json").exists()


def test_eval_refuses_unwritable_outputs_before_reading_anything(plain_csv, tmp_path, capsys):
    plain = plain_csv
    afile = _afile(tmp_path)
    for extra, culprit in ((["--out", str(afile / "o")], "afile"),
                           (["--out", str(tmp_path / "o"), "--json", str(afile / "s.json")], "afile"),
                           (["--out", str(tmp_path / "o"), "--cache", str(afile / "c.sqlite")], "afile")):
        rc, _, err = _run(["eval", "ssr", "--csv", str(plain), "--bootstrap", "0", *extra], capsys)
        assert rc == 2 and culprit in err, err
    assert not (tmp_path / "o" / "summary.json").exists()


# ============================================================================ eval human
HUMAN_KEYS = [f"object_0{i // 3}_thing-{i % 3}" for i in range(6)] + [f"style_0{i // 3}_art-{i % 3}" for i in range(6)]


def _ratings_tree(root: Path) -> Path:
    rng = np.random.default_rng(0)
    for gi, group in enumerate(("group1", "group2")):
        d = root / "data_human_rating" / "merged_data" / group
        d.mkdir(parents=True)
        for mi, method in enumerate(("m_a", "m_b")):
            (d / f"{method}-cp.json").write_text(json.dumps(
                {k: float((i * 3 + gi * 2 + mi) % 5) for i, k in enumerate(HUMAN_KEYS)}))
    metric = root / "metric_x"
    metric.mkdir()
    for method in ("m_a", "m_b"):
        (metric / f"{method}.json").write_text(json.dumps({f"{k}_0": float(rng.normal()) for k in HUMAN_KEYS}))
    return root


@pytest.mark.parametrize("variant", sorted(corpus.ratings_variants({"k": 1.0})))
@pytest.mark.parametrize("which", ["human_group1", "metric"])
def test_eval_human_ratings_variants(variant, which, tmp_path, capsys):
    root = _ratings_tree(tmp_path / "ratings")
    clean = tmp_path / "clean"
    assert main(["eval", "human", "--ratings", str(root), "--metric", "metric_x", "--out", str(clean)]) == 0
    capsys.readouterr()
    target = (root / "data_human_rating" / "merged_data" / "group1" / "m_a-cp.json" if which == "human_group1"
              else root / "metric_x" / "m_a.json")
    data, words = corpus.ratings_variants(json.loads(target.read_text()))[variant]
    target.write_bytes(data)
    out = tmp_path / "o"
    rc, _, err = _run(["eval", "human", "--ratings", str(root), "--metric", "metric_x", "--out", str(out)], capsys)
    if words is None:
        assert rc == 0, err
        assert json.loads((out / "human_alignment.json").read_text()) == \
            json.loads((clean / "human_alignment.json").read_text())
    else:
        assert rc == 2, err
        assert words in err and target.name in err, err


# ============================================================================ nodes
@pytest.mark.parametrize("case", ["num_heads_zero", "mlp_dim_one_billion", "provenance_bad_json",
                                  "calibration_a_number", "interpolation_unknown"])
def test_loader_node_refuses_tampered_heads_naming_the_field(case, tiny_model, tmp_path):
    from _comfyui_helpers import import_pack
    from comfy_nearid.errors import CheckpointError

    loader = import_pack().nodes.loader
    key, value, words = corpus.HEAD_METADATA_CASES[case]
    head = _head_with(tmp_path, tiny_model, **{key: value})
    loader.clear_cache()
    with pytest.raises(CheckpointError, match=rf"bad_head.safetensors.*'{key}'.*{words}"):
        loader.NearIDModelLoader().load(str(head))


@pytest.mark.parametrize("builder", [corpus.pickle_renamed_safetensors, corpus.huge_header_length])
def test_loader_node_refuses_non_safetensors_head_files(builder, tmp_path):
    from _comfyui_helpers import import_pack
    from comfy_nearid.errors import CheckpointError

    loader = import_pack().nodes.loader
    head = builder(tmp_path / "h.safetensors")
    loader.clear_cache()
    with pytest.raises(CheckpointError, match="h.safetensors"):
        loader.NearIDModelLoader().load(str(head))


def test_scoring_node_cache_in_an_impossible_place_is_a_clear_error(tiny_model, tmp_path, monkeypatch):
    from _comfyui_helpers import import_pack, structured_images, to_comfy
    from comfy_nearid.errors import ConfigError

    scoring = import_pack().nodes.scoring
    monkeypatch.setenv("NEARID_EMBEDDING_CACHE", str(_afile(tmp_path) / "c.sqlite"))
    node = scoring.NearIDIdentityScore()
    images = to_comfy(structured_images(1, 2))
    with pytest.raises(ConfigError, match="afile"):
        node.score(tiny_model, images, reference=images, use_cache=True)


@pytest.mark.parametrize("entry", ["fifo", "dangling_link", "link_loop"])
@pytest.mark.parametrize("benchmark", ["ssr", "mtg"])
def test_eval_dataset_with_a_non_regular_image_stops_naming_it_and_never_hangs(entry, benchmark, tmp_path, capsys):
    from _eval_helpers import write_tiny_dataset, write_tiny_mtg

    if benchmark == "ssr":
        root = write_tiny_dataset(tmp_path / "data", n_samples=3)
        victim = root / "s001" / "view2.png"
    else:
        root = write_tiny_mtg(tmp_path / "data", n_samples=3)
        victim = sorted(p for p in root.rglob("*.png") if "mask" not in p.name)[1]
    victim.unlink()
    if entry == "fifo":
        os.mkfifo(victim)
    elif entry == "dangling_link":
        victim.symlink_to(tmp_path / "gone.png")
    else:
        victim.symlink_to(victim.name)
    rc, _, err = _run(["eval", benchmark, "--data", str(root), "--scorer", "mean:tiny-siglip", "--random-weights",
                       "--bootstrap", "0", "--out", str(tmp_path / "o"), "--no-progress", "--device", "cpu"], capsys)
    assert rc == 2 and victim.name in err and len(err.strip().splitlines()) == 1, err


@pytest.mark.parametrize("rows_name, rows_data, config_data, words", [
    ("o.jsonl", b"\xff\xfe garbage\n", None, "line 1: not UTF-8"),
    ("o.jsonl", b'{"path": 1}\n', None, "not a score row"),
    ("o.csv", b"name,value\nx,1\n", None, "not written by `nearid score`"),
    ("o.jsonl", b"", b'{"command": "score"', "o.config.json is unreadable"),
])
def test_resume_onto_files_that_are_not_ours_is_refused(rows_name, rows_data, config_data, words, good_tree,
                                                         tmp_path, capsys):
    ref, gen, _ = good_tree
    out = tmp_path / rows_name
    out.write_bytes(rows_data)
    if config_data is not None:
        (tmp_path / "o.config.json").write_bytes(config_data)
    rc, _, err = _run(["score", "--reference", str(ref), str(gen), "-o", str(out), "--no-cache", "--resume",
                       *SCORE_ARGS], capsys)
    assert rc == 2 and words in err, err
    assert out.read_bytes() == rows_data  # left as it was
