"""The streaming scorer in-process: scores equal the model called directly, multi-subject
pairing, error rows, strict mode, overwrite protection, resume, the cache, the outputs."""

from __future__ import annotations

import csv
import io
import json
import statistics
import threading
import time

import numpy as np
import pytest

from comfy_nearid import load_model
from comfy_nearid.embedding_cache import EmbeddingCache
from comfy_nearid.errors import ConfigError, ImageLoadError, InvalidInputError
from comfy_nearid.metrics.human import load_score_file
from comfy_nearid.scoring import (
    ROW_FIELDS,
    OutputPaths,
    RunSettings,
    ScoringOptions,
    plan_from_mapping,
    plan_single_subject,
    prefetch,
    read_rows,
    score_plan,
)

from _scoring_helpers import (
    cosines_direct,
    default_identity_match,
    ranks_by_hand,
    write_broken_files,
    write_image,
)

FAST = ScoringOptions(batch_size=4, num_workers=2, prefetch_batches=2, progress=False)


@pytest.fixture
def one_subject(tmp_path, rng):
    refs = [write_image(tmp_path / "refs" / f"r{i}.png", rng) for i in range(3)]
    gens = [write_image(tmp_path / "gen" / f"g{i}.png", rng, size=(40 + i, 30)) for i in range(10)]
    return refs, gens


def _f32(x: float) -> float:
    return float(np.float32(x))


@pytest.mark.parametrize("aggregate", ["mean", "max"])
def test_rows_equal_the_model_called_directly(tiny_model, tmp_path, one_subject, aggregate):
    refs, gens = one_subject
    plan = plan_single_subject([tmp_path / "refs"], [tmp_path / "gen"])
    out = OutputPaths.for_rows(tmp_path / "out" / "scores.csv")
    options = ScoringOptions(aggregate=aggregate, batch_size=4, progress=False)
    result = score_plan(tiny_model, plan, out, RunSettings(options=options))
    rows = read_rows(out.rows)
    expected = cosines_direct(tiny_model, refs, gens)
    agg = expected.mean(axis=1) if aggregate == "mean" else expected.max(axis=1)
    assert [r.path for r in rows] == [str(g) for g in gens]
    assert all(r.subject == "refs" and r.error is None for r in rows)
    np.testing.assert_allclose([r.cosines for r in rows], expected, atol=2e-6, rtol=0)
    np.testing.assert_allclose([r.score for r in rows], agg, atol=2e-6, rtol=0)
    np.testing.assert_allclose([r.match for r in rows], [default_identity_match(a) for a in agg], atol=2e-4)
    assert all(r.calibrated is False for r in rows)  # no fitted curve in the head: the rows say so
    assert [r.rank for r in rows] == ranks_by_hand([r.score for r in rows])
    summary = json.loads(out.summary.read_text())["subjects"]["refs"]
    assert summary["num_images"] == 10 and summary["num_errors"] == 0
    assert summary["mean"] == pytest.approx(float(np.mean(agg)), abs=2e-6)
    assert summary["median"] == pytest.approx(statistics.median(agg.tolist()), abs=2e-6)
    assert summary["best"] == pytest.approx(float(agg.max()), abs=2e-6)
    assert summary["best_path"] == str(gens[int(np.argmax(agg))])
    assert result.num_scored == 10 and result.subjects["refs"]["best_path"] == summary["best_path"]
    config = json.loads(out.config.read_text())
    assert config["model_identity"] == tiny_model.identity and config["aggregate"] == aggregate


def test_many_subjects_each_scored_against_their_own_references(tiny_model, tmp_path, rng):
    dog_refs = [write_image(tmp_path / "refs" / "dog" / f"{i}.png", rng) for i in range(2)]
    cat_refs = [write_image(tmp_path / "refs" / "cat.png", rng)]
    dog_gen = [write_image(tmp_path / "gen" / "dog" / f"{i}.png", rng) for i in range(5)]
    cat_gen = [write_image(tmp_path / "gen" / "cat" / f"{i}.png", rng) for i in range(4)]
    (tmp_path / "map.csv").write_text("subject,references,generated\ndog,refs/dog,gen/dog\ncat,refs/cat.png,gen/cat\n")
    out = OutputPaths.for_rows(tmp_path / "scores.jsonl", dreambench=tmp_path / "db" / "method.json")
    score_plan(tiny_model, plan_from_mapping(tmp_path / "map.csv"), out, RunSettings(options=FAST))
    rows = read_rows(out.rows)
    assert [(r.subject, r.path) for r in rows] == [("dog", str(p)) for p in dog_gen] + [("cat", str(p)) for p in cat_gen]
    dog_cos = cosines_direct(tiny_model, dog_refs, dog_gen)
    cat_cos = cosines_direct(tiny_model, cat_refs, cat_gen)
    np.testing.assert_allclose([r.cosines for r in rows[:5]], dog_cos, atol=2e-6, rtol=0)
    np.testing.assert_allclose([r.cosines for r in rows[5:]], cat_cos, atol=2e-6, rtol=0)
    # Ranks restart per subject.
    assert [r.rank for r in rows[:5]] == ranks_by_hand(dog_cos.mean(axis=1).tolist())
    assert [r.rank for r in rows[5:]] == ranks_by_hand(cat_cos.mean(axis=1).tolist())
    # DreamBench++ JSON: documented keys, 100 x cosine, in plan order, readable by `eval human`.
    scores = load_score_file(out.dreambench)
    assert list(scores) == [f"dog-{i}" for i in range(5)] + [f"cat-{i}" for i in range(4)]
    np.testing.assert_allclose(list(scores.values()),
                               100 * np.concatenate([dog_cos.mean(axis=1), cat_cos.mean(axis=1)]), atol=5e-4)


def test_broken_files_become_error_rows_and_the_run_goes_on(tiny_model, tmp_path, rng, one_subject):
    refs, gens = one_subject
    reasons = write_broken_files(tmp_path / "gen", rng)
    out = OutputPaths.for_rows(tmp_path / "scores.csv", dreambench=tmp_path / "db.json")
    result = score_plan(tiny_model, plan_single_subject(refs, [tmp_path / "gen"]), out, RunSettings(options=FAST))
    rows = {r.path.rsplit("/", 1)[-1]: r for r in read_rows(out.rows)}
    assert len(rows) == 14 and result.num_errors == 4 and result.num_scored == 10
    for name, words in reasons.items():
        row = rows[name]
        assert words in row.error, (name, row.error)
        assert row.score is None and row.rank is None and row.cosines == ()
    good = [rows[g.name] for g in gens]
    assert sorted(r.rank for r in good) == list(range(1, 11))
    np.testing.assert_allclose([r.score for r in good], cosines_direct(tiny_model, refs, gens).mean(axis=1), atol=2e-6)
    summary = json.loads(out.summary.read_text())["subjects"]
    assert summary[plan_single_subject(refs, [tmp_path / "gen"]).subjects[0].name]["num_errors"] == 4
    assert len(json.loads(out.dreambench.read_text())) == 10  # unreadable images are left out


def test_strict_mode_fails_naming_the_file(tiny_model, tmp_path, rng, one_subject):
    refs, _ = one_subject
    write_broken_files(tmp_path / "gen", rng)
    out = OutputPaths.for_rows(tmp_path / "scores.csv")
    options = ScoringOptions(batch_size=4, progress=False, strict=True)
    with pytest.raises(ImageLoadError, match="b_corrupt.png.*--strict"):
        score_plan(tiny_model, plan_single_subject(refs, [tmp_path / "gen"]), out, RunSettings(options=options))
    assert not out.summary.exists()  # a failed run is not finalised


def test_unreadable_reference_stops_before_any_row(tiny_model, tmp_path, rng):
    write_image(tmp_path / "gen" / "0.png", rng)
    bad_ref = tmp_path / "ref.png"
    bad_ref.write_bytes(b"\x89PNG\r\n\x1a\n garbage")
    out = OutputPaths.for_rows(tmp_path / "scores.csv")
    with pytest.raises(ImageLoadError, match="ref.png"):
        score_plan(tiny_model, plan_single_subject([bad_ref], [tmp_path / "gen"]), out, RunSettings(options=FAST))
    assert not any(p.exists() for p in out.finals())


def test_outputs_are_never_overwritten_without_permission(tiny_model, tmp_path, one_subject):
    refs, _ = one_subject
    plan = plan_single_subject(refs, [tmp_path / "gen"])
    out = OutputPaths.for_rows(tmp_path / "scores.csv")
    out.rows.write_text("precious\n")
    with pytest.raises(InvalidInputError, match="scores.csv already exists.*--overwrite.*--resume"):
        score_plan(tiny_model, plan, out, RunSettings(options=FAST))
    assert out.rows.read_text() == "precious\n"
    other_summary = OutputPaths.for_rows(tmp_path / "other.csv", summary=tmp_path / "keep.json")
    other_summary.summary.write_text("{}")
    with pytest.raises(InvalidInputError, match="keep.json already exists"):
        score_plan(tiny_model, plan, other_summary, RunSettings(options=FAST))
    score_plan(tiny_model, plan, out, RunSettings(options=FAST, overwrite=True))
    assert len(read_rows(out.rows)) == 10


def _full_run(model, plan, path, **kw):
    out = OutputPaths.for_rows(path, dreambench=path.with_suffix(".db.json"))
    score_plan(model, plan, out, RunSettings(options=FAST, **kw))
    return out


@pytest.mark.parametrize("fmt", ["csv", "jsonl"])
def test_resume_after_a_crash_mid_write_equals_an_uninterrupted_run(tiny_model, tmp_path, one_subject, fmt):
    refs, _ = one_subject
    plan = plan_single_subject(refs, [tmp_path / "gen"])
    reference = _full_run(tiny_model, plan, tmp_path / f"full.{fmt}")
    # What a crash leaves: the unranked rows of the first batches, then half a line.
    out = OutputPaths.for_rows(tmp_path / f"crashed.{fmt}", dreambench=tmp_path / "crashed.db.json")
    score_plan(tiny_model, plan, out, RunSettings(options=FAST))
    lines = out.rows.read_text().splitlines(keepends=True)
    header = lines[:1] if fmt == "csv" else []
    body = [_without_rank(line, fmt) for line in lines[len(header):]]
    out.rows.write_text("".join(header + body[:5] + [body[5][: len(body[5]) // 2]]))
    out.summary.unlink()
    out.dreambench.unlink()
    result = score_plan(tiny_model, plan, out, RunSettings(options=FAST, resume=True))
    assert result.num_resumed == 5
    assert out.rows.read_text() == reference.rows.read_text()
    assert out.dreambench.read_text() == reference.dreambench.read_text()
    assert json.loads(out.summary.read_text()) == json.loads(reference.summary.read_text())


def _without_rank(line: str, fmt: str) -> str:
    """A finished row as it looked while the run was going (ranks come at the end)."""
    if fmt == "jsonl":
        rec = json.loads(line)
        rec["rank"] = None
        return json.dumps(rec) + "\n"
    fields = next(csv.reader([line]))
    fields[ROW_FIELDS.index("rank")] = ""
    buf = io.StringIO()
    csv.writer(buf, lineterminator="\n").writerow(fields)
    return buf.getvalue()


def test_resume_never_duplicates_rows_already_written_twice(tiny_model, tmp_path, one_subject):
    refs, _ = one_subject
    plan = plan_single_subject(refs, [tmp_path / "gen"])
    reference = _full_run(tiny_model, plan, tmp_path / "full.csv")
    out = OutputPaths.for_rows(tmp_path / "dup.csv")
    lines = reference.rows.read_text().splitlines(keepends=True)
    out.rows.write_text("".join(lines[:4] + lines[2:4]))  # a batch flushed twice
    score_plan(tiny_model, plan, out, RunSettings(options=FAST, resume=True))
    assert out.rows.read_text() == reference.rows.read_text()


def test_resume_of_a_complete_run_touches_no_model(tiny_model, tmp_path, one_subject):
    refs, _ = one_subject
    plan = plan_single_subject(refs, [tmp_path / "gen"])
    cache = EmbeddingCache(tmp_path / "cache.sqlite")
    out = _full_run(tiny_model, plan, tmp_path / "s.csv", cache=cache)
    before = out.rows.read_text()
    score_plan(_NoForwardModel(tiny_model), plan, out, RunSettings(options=FAST, cache=cache, resume=True))
    assert out.rows.read_text() == before


def test_resume_with_another_model_is_refused(tiny_model, tmp_path, one_subject):
    refs, _ = one_subject
    plan = plan_single_subject(refs, [tmp_path / "gen"])
    out = _full_run(tiny_model, plan, tmp_path / "s.csv")
    other = load_model(backbone="tiny-siglip", pretrained=False, device="cpu", dtype="fp32", seed=3)
    with pytest.raises(ConfigError, match="model_identity"):
        score_plan(other, plan, out, RunSettings(options=FAST, resume=True))
    with pytest.raises(ConfigError, match="aggregate"):
        score_plan(tiny_model, plan, out,
                   RunSettings(options=ScoringOptions(aggregate="max", batch_size=4, progress=False), resume=True))


class _NoForwardModel:
    """The real model's preprocessing and identity; any forward pass fails the test."""

    def __init__(self, model) -> None:
        self.identity = model.identity
        self.dtype, self.device = model.dtype, model.device
        self.preprocess = model.preprocess
        self.head_metadata = model.head_metadata
        self.head_source = model.head_source

    def embed(self, *a, **k):
        raise AssertionError("embed was called although everything was cached")

    def embed_pixels(self, *a, **k):
        raise AssertionError("embed_pixels was called although everything was cached")


def test_a_cached_rerun_gives_the_same_rows_without_any_forward_pass(tiny_model, tmp_path, one_subject):
    refs, _ = one_subject
    plan = plan_single_subject(refs, [tmp_path / "gen"])
    cache = EmbeddingCache(tmp_path / "cache.sqlite")
    first = _full_run(tiny_model, plan, tmp_path / "first.csv", cache=cache)
    assert cache.count(tiny_model.identity) == 13  # 10 generated + 3 references
    second = OutputPaths.for_rows(tmp_path / "second.csv")
    score_plan(_NoForwardModel(tiny_model), plan, second, RunSettings(options=FAST, cache=cache))
    assert second.rows.read_text() == first.rows.read_text()


def test_prefetch_keeps_order_and_bounds_the_batches_in_memory():
    prepared_not_consumed = []
    lock = threading.Lock()
    peak = [0]

    def prepare(item):
        time.sleep(0.002 * (item % 3))  # finish out of order
        with lock:
            prepared_not_consumed.append(item)
            peak[0] = max(peak[0], len(prepared_not_consumed))
        return item * 10

    batches = [list(range(k * 5, k * 5 + 5)) for k in range(12)]
    seen = []
    for batch, results, pixels in prefetch(prepare, batches, num_workers=3, depth=2):
        assert results == [i * 10 for i in batch] and pixels is None
        seen.extend(batch)
        with lock:
            for i in batch:
                prepared_not_consumed.remove(i)
    assert seen == list(range(60))
    assert peak[0] <= 3 * 5  # the batch in hand plus `depth` batches ahead


def test_batches_on_cores_keeps_order_bounds_batches_in_flight_and_runs_torch_on_one_thread():
    import torch

    from comfy_nearid.prefetch import batches_on_cores

    before = torch.get_num_threads()
    torch.set_num_threads(2)
    lock = threading.Lock()
    started_not_consumed: list[int] = []
    peak, threads_seen = [0], set()

    def work(batch):
        with lock:
            started_not_consumed.append(batch[0])
            peak[0] = max(peak[0], len(started_not_consumed))
        threads_seen.add(torch.get_num_threads())
        x = torch.arange(len(batch), dtype=torch.float64) + batch[0]
        return (x * 10).tolist()

    try:
        batches = [list(range(k * 5, k * 5 + 5)) for k in range(12)]
        seen = []
        for batch, result in batches_on_cores(work, batches, cores=2):
            assert result == [i * 10.0 for i in batch]
            seen.extend(batch)
            with lock:
                started_not_consumed.remove(batch[0])
        assert seen == list(range(60))
        assert peak[0] <= 2 * 2  # two batches per core at most, whatever the number of batches
        assert threads_seen == {1}  # torch ran on one thread in each worker
        assert torch.get_num_threads() == 2  # and has its threads back
    finally:
        torch.set_num_threads(before)


def test_cores_for_a_device_is_torchs_threads_on_cpu_and_one_elsewhere():
    import torch

    from comfy_nearid.prefetch import cores_for

    assert cores_for("cpu") == cores_for(torch.device("cpu")) == torch.get_num_threads()
    assert cores_for("cuda") == cores_for(torch.device("cuda", 0)) == 1


def test_batches_on_cores_passes_a_failure_on_and_restores_torch_threads():
    import torch

    from comfy_nearid.prefetch import batches_on_cores

    before = torch.get_num_threads()
    torch.set_num_threads(2)

    def work(batch):
        if batch[0] == 3:
            raise InvalidInputError(f"cannot decode image {batch[0]}")
        return batch

    try:
        with pytest.raises(InvalidInputError, match="cannot decode image 3"):
            list(batches_on_cores(work, [[k] for k in range(8)], cores=2))
        assert torch.get_num_threads() == 2
        # one core: inline, in this thread, torch's threads untouched
        callers = []
        out = list(batches_on_cores(lambda b: callers.append((threading.current_thread(), torch.get_num_threads())) or b,
                                    [[1], [2]], cores=1))
        assert out == [([1], [1]), ([2], [2])]
        assert callers == [(threading.current_thread(), 2)] * 2
    finally:
        torch.set_num_threads(before)


def test_decode_threads_write_the_pixels_into_the_batch_the_model_reads(tiny_model, tmp_path, one_subject):
    """The in-place batch fill: each batch's buffer is what the forward pass gets (no stacking
    of per-image tensors), holding exactly the preprocessed pixels, and the rows are exact."""
    import torch

    from comfy_nearid.images import load_image
    from comfy_nearid.scoring.unit import ScoringUnit

    refs, gens = one_subject
    references = {"s": tiny_model.embed(refs).numpy()}
    unit = ScoringUnit(tiny_model, references)
    buffers, forward_inputs = [], []
    make_buffer, embed_pixels = unit.pixel_buffer, tiny_model.embed_pixels
    unit.pixel_buffer = lambda n: buffers.append(make_buffer(n)) or buffers[-1]
    tiny_model.embed_pixels = lambda pixels, *a, **k: forward_inputs.append(pixels) or embed_pixels(pixels, *a, **k)
    try:
        from comfy_nearid.scoring.unit import ImageRef

        batches = [[ImageRef(str(p), "s") for p in gens[k : k + 4]] for k in range(0, len(gens), 4)]
        rows = [r for _, batch_rows in unit.score_batches(batches, num_workers=2, prefetch_batches=1) for r in batch_rows]
    finally:
        del tiny_model.embed_pixels
    assert len(forward_inputs) == len(buffers) == 3
    for batch, buffer, given in zip(batches, buffers, forward_inputs):
        assert given.data_ptr() == buffer.data_ptr()
        assert torch.equal(given, tiny_model.preprocess_batch([load_image(ref.path) for ref in batch]))
    np.testing.assert_allclose([r.cosines for r in rows], cosines_direct(tiny_model, refs, gens), atol=2e-6, rtol=0)


def test_a_broken_file_in_a_batch_leaves_the_other_rows_exact(tiny_model, tmp_path, one_subject):
    refs, gens = one_subject
    broken = tmp_path / "gen" / "g3b.png"
    broken.write_bytes(b"not an image")
    plan = plan_single_subject([tmp_path / "refs"], [tmp_path / "gen"])
    out = OutputPaths.for_rows(tmp_path / "o.csv")
    score_plan(tiny_model, plan, out, RunSettings(options=ScoringOptions(batch_size=4, num_workers=2, progress=False)))
    rows = read_rows(out.rows)
    good = [r for r in rows if r.error is None]
    assert [r.path for r in rows if r.error] == [str(broken)]
    np.testing.assert_allclose([r.cosines for r in good], cosines_direct(tiny_model, refs, gens), atol=2e-6, rtol=0)
