"""Partitioned scoring without Ray: shard readers (img2dataset parquet, webdataset tar), the
local partition engine against `nearid score` on the same images, resume, and bad inputs."""

from __future__ import annotations

import io
import json
import sys
import tarfile
from pathlib import Path

import pytest

from comfy_nearid.cli import EXIT_BAD_INPUT, main
from comfy_nearid.errors import DatasetError
from comfy_nearid.scoring.partitions import read_partition_rows
from comfy_nearid.scoring.sources import Partition, SubjectField, read_partition, shard_partitions

from _scale_helpers import CORRUPT_KEY, assert_same_rows, scale_image_set  # noqa: F401 (fixture)
from _scoring_helpers import TINY_MODEL_ARGS


@pytest.mark.parametrize("kind", ["parquet", "wds"])
def test_local_engine_on_shards_gives_the_rows_of_nearid_score(scale_image_set, tmp_path, kind, capsys):
    root, expected = scale_image_set
    suffix = "parquet" if kind == "parquet" else "tar"
    out = tmp_path / "out"
    assert main(["score", "--references-root", str(root / "refs"), str(root / kind / f"*.{suffix}"), "-o", str(out),
                 "--batch-size", "4", *TINY_MODEL_ARGS, "--no-cache"]) == 0
    assert "14 image(s), 1 unreadable, 2 partition(s)" in capsys.readouterr().out
    assert sorted(p.name for p in out.glob("*.parquet")) == ["00000.parquet", "00001.parquet"]
    rows = read_partition_rows(out)
    assert_same_rows(rows, expected)
    corrupt = next(r for r in rows if r.path == CORRUPT_KEY)
    assert corrupt.score is None and corrupt.error == "not a recognised image format"
    summary = json.loads((out / "_summary.json").read_text())
    assert summary["num_images"] == 14 and summary["num_errors"] == 1
    assert summary["subjects"]["cat"]["num_images"] == 7


def test_local_partitions_of_a_folder_resume_only_what_is_missing(scale_image_set, tmp_path, capsys):
    root, expected = scale_image_set
    common = ["score", "--references-root", str(root / "refs"), str(root / "gen"), "--batch-size", "4",
              "--partition-size", "4", *TINY_MODEL_ARGS, "--no-cache"]
    out = tmp_path / "out"
    assert main([*common, "-o", str(out)]) == 0
    first = {p.name: p.read_bytes() for p in out.glob("*.parquet")}
    assert len(first) == 4  # 14 images / 4 per partition
    assert_same_rows(read_partition_rows(out), expected)
    (out / "part-00002.parquet").unlink()
    (out / ".part-00002.parquet.tmp-999").write_bytes(b"half a file from a killed run")
    assert main([*common, "-o", str(out)]) == EXIT_BAD_INPUT
    assert "--resume" in capsys.readouterr().err
    assert main([*common, "-o", str(out), "--resume"]) == 0
    assert "3 taken from the previous run" in capsys.readouterr().out
    assert {p.name: p.read_bytes() for p in out.glob("*.parquet")}.keys() == first.keys()
    assert not list(out.glob(".*.tmp-*"))
    assert_same_rows(read_partition_rows(out), expected)


def test_resume_with_another_aggregate_is_refused(scale_image_set, tmp_path, capsys):
    root, _ = scale_image_set
    common = ["score", "--references-root", str(root / "refs"), str(root / "parquet" / "*.parquet"),
              "-o", str(tmp_path / "out"), *TINY_MODEL_ARGS, "--no-cache"]
    assert main(common) == 0
    assert main([*common, "--resume", "--aggregate", "max"]) == EXIT_BAD_INPUT
    assert "aggregate='mean'" in capsys.readouterr().err


def _tar(path: Path, members: dict[str, bytes]) -> Path:
    with tarfile.open(path, "w") as tar:
        for name, payload in members.items():
            info = tarfile.TarInfo(name)
            info.size = len(payload)
            tar.addfile(info, io.BytesIO(payload))
    return path


def test_webdataset_samples_without_subject_or_image_become_error_refs(tmp_path):
    shard = _tar(tmp_path / "a.tar", {
        "x/1.jpg": b"jpegbytes", "x/1.json": b'{"subject": "dog"}',
        "x/2.jpg": b"jpegbytes", "x/2.json": b'{"other": 1}',
        "x/3.json": b'{"subject": "dog"}',
        "x/4.jpg": b"jpegbytes", "x/4.json": b"{not json",
    })
    (partition,) = shard_partitions([str(shard)])
    refs = [r for batch in read_partition(partition, 3, SubjectField("subject")) for r in batch]
    assert [(r.path, r.subject, r.data is not None) for r in refs] == [
        ("x/1", "dog", True), ("x/2", "", False), ("x/3", "dog", False), ("x/4", "", False)]
    assert "no subject in field 'subject'" in refs[1].error
    assert "has no image" in refs[2].error
    assert "not valid JSON" in refs[3].error
    fixed = [r for b in read_partition(partition, 10, SubjectField(fixed="me")) for r in b]
    assert [r.subject for r in fixed] == ["me"] * 4 and fixed[1].error is None


def test_bad_shard_inputs_name_the_problem(tmp_path):
    import pyarrow as pa
    import pyarrow.parquet as pq

    (tmp_path / "a").mkdir()
    (tmp_path / "b").mkdir()
    _tar(tmp_path / "a" / "s.tar", {"1.jpg": b"x"})
    _tar(tmp_path / "b" / "s.tar", {"1.jpg": b"x"})
    with pytest.raises(DatasetError, match="share the name 's'"):
        shard_partitions([str(tmp_path / "*" / "s.tar")])
    with pytest.raises(DatasetError, match="matches no file"):
        shard_partitions([str(tmp_path / "none-*.tar")])
    pq.write_table(pa.table({"key": ["1"], "caption": ["no image"]}), tmp_path / "p.parquet")
    (part,) = shard_partitions([str(tmp_path / "p.parquet")])
    with pytest.raises(DatasetError, match="no image column"):
        list(read_partition(part, 4, SubjectField()))
    pq.write_table(pa.table({"key": ["1"], "jpg": [b"x"]}), tmp_path / "q.parquet")
    (part,) = shard_partitions([str(tmp_path / "q.parquet")])
    with pytest.raises(DatasetError, match="no subject column 'subject'"):
        list(read_partition(part, 4, SubjectField()))


def test_partition_round_trips_through_json():
    p = Partition("part-00001", "items", items=(("a/1.png", "dog"), ("b/2.png", "cat")))
    assert Partition.from_json(p.to_json()) == p


def test_missing_ray_says_what_to_install(monkeypatch):
    from comfy_nearid import ray as ray_adapter

    monkeypatch.setitem(sys.modules, "ray", None)  # `import ray` raises ImportError
    with pytest.raises(ray_adapter.RayNotInstalledError, match=r"pip install comfy-nearid\[scale\]"):
        ray_adapter.require_ray()


def test_actor_phases_from_hand_worked_timestamps():
    from comfy_nearid.ray import PartitionTiming, actor_phases

    def timing(name, actor, import_started, imported, constructed, ready, started, finished, rows):
        return PartitionTiming(name, actor, import_started, imported, constructed, ready, started, finished, rows, 1)

    # Actor a: ready at 104, two partitions of 20 rows ending at 108.5 -> 40 rows in 4.5 s.
    # Actor b: ready at 103, one partition of 20 rows ending at 107 -> 20 rows in 4 s.
    timings = [timing("p0", "a", 100.25, 101.0, 102.0, 104.0, 104.5, 106.5, 20),
               timing("p1", "b", 99.0, 100.5, 101.0, 103.0, 103.0, 107.0, 20),
               timing("p2", "a", 100.25, 101.0, 102.0, 104.0, 106.5, 108.5, 20)]
    phases = actor_phases(timings, execution_started=100.0)
    assert phases["actors"] == 2
    assert phases["worker_start"] == pytest.approx(0.25)  # a's process at 100.25; b's was up before
    assert phases["imports"] == pytest.approx(1.5)  # b: 99 -> 100.5
    assert phases["model_load"] == pytest.approx(2.0)
    assert phases["actors_ready"] == pytest.approx(4.0)
    assert phases["scoring"] == pytest.approx(108.5 - 103.0)
    assert phases["steady_images_per_s"] == pytest.approx(40 / 4.5 + 20 / 4)
    assert phases["busy"] == pytest.approx((4 + 4) / (4.5 + 4))
    assert actor_phases([], 0.0) == {}


def test_partitioned_runs_keep_the_mapping_files_label_columns(scale_image_set, tmp_path, capsys):
    """A mapping file's extra columns reach the parquet rows, each image's own (the same
    values `nearid score` writes into its rows file); resuming with other columns is refused."""
    import pyarrow.parquet as pq

    from comfy_nearid.scoring import read_rows

    root, _ = scale_image_set
    mapping = tmp_path / "m.csv"
    lines = ["subject,references,generated,checkpoint,method"]
    for n, subject in enumerate(("cat", "dog")):
        lines.append(f"{subject},{root / 'refs' / subject},{root / 'gen' / subject},ckpt-{100 * (n + 1)},lora")
    mapping.write_text("\n".join(lines) + "\n")
    common = ["score", "--mapping", str(mapping), "--batch-size", "4", *TINY_MODEL_ARGS, "--no-cache"]
    assert main([*common, "-o", str(tmp_path / "rows.csv")]) == 0
    streamed = {r.path: r.labels for r in read_rows(tmp_path / "rows.csv")}
    assert all(set(labels) == {"checkpoint", "method"} for labels in streamed.values())
    out = tmp_path / "parts"
    assert main([*common, "--partition-size", "4", "-o", str(out)]) == 0
    tables = [pq.read_table(p) for p in sorted(out.glob("*.parquet"))]
    assert all(t.column_names[-2:] == ["checkpoint", "method"] for t in tables)
    got = {rec["path"]: {"checkpoint": rec["checkpoint"], "method": rec["method"]}
           for t in tables for rec in t.to_pylist()}
    assert got == streamed and len(got) == 14
    # the dog's images carry the dog's checkpoint, worked out from the file written above
    assert {v["checkpoint"] for p, v in got.items() if f"{root / 'gen' / 'dog'}" in p} == {"ckpt-200"}
    assert json.loads((out / "_config.json").read_text())["label_columns"] == ["checkpoint", "method"]
    capsys.readouterr()
    # resuming the same folder from a mapping without those columns would mix row layouts
    plain = tmp_path / "plain.csv"
    plain.write_text("\n".join(line.rsplit(",", 2)[0] for line in lines) + "\n")
    rc = main(["score", "--mapping", str(plain), "--batch-size", "4", *TINY_MODEL_ARGS, "--no-cache",
               "--partition-size", "4", "-o", str(out), "--resume"])
    assert rc == EXIT_BAD_INPUT
    assert "label_columns=['checkpoint', 'method']" in capsys.readouterr().err
    # outputs written before the config recorded label columns (none) still resume
    old = tmp_path / "old"
    plain_run = ["score", "--mapping", str(plain), "--batch-size", "4", *TINY_MODEL_ARGS, "--no-cache",
                 "--partition-size", "4", "-o", str(old)]
    assert main(plain_run) == 0
    config = json.loads((old / "_config.json").read_text())
    assert config.pop("label_columns") == []
    (old / "_config.json").write_text(json.dumps(config))
    (old / "part-00001.parquet").unlink()
    assert main([*plain_run, "--resume"]) == 0
    assert "3 taken from the previous run" in capsys.readouterr().out
