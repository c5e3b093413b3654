"""Scoring plans: discovery order, the three subject layouts, DreamBench++ keys, and every
input problem stopping before any work."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from comfy_nearid.errors import DatasetError
from comfy_nearid.scoring import (
    dreambench_key,
    list_images,
    natural_sort_key,
    plan_from_mapping,
    plan_from_subject_folders,
    plan_single_subject,
)

from _scoring_helpers import write_image


def _names(paths, root):
    return [Path(p).relative_to(root).as_posix() for p in paths]


def test_discovery_is_recursive_natural_and_skips_non_images(tmp_path, rng):
    for rel in ["img10.png", "img2.png", "img1.jpg", "b/x.webp", "a/z.JPEG", ".hidden.png", ".cache/y.png",
                "notes.txt", "a/meta.json"]:
        path = tmp_path / rel
        path.parent.mkdir(parents=True, exist_ok=True)
        if path.suffix.lower() in (".png", ".jpg", ".webp", ".jpeg"):
            write_image(path, rng, fmt={"png": "PNG", "jpg": "JPEG", "webp": "WEBP", "jpeg": "JPEG"}[path.suffix.lower()[1:]])
        else:
            path.write_text("{}")
    # Hand-ordered: digit runs by value, folders by their relative path.
    assert _names(list_images(tmp_path), tmp_path) == ["a/z.JPEG", "b/x.webp", "img1.jpg", "img2.png", "img10.png"]


def test_natural_sort_key_orders_numbers_by_value():
    names = ["s10_2", "s2_10", "s2_9", "s1", "a"]
    assert sorted(names, key=natural_sort_key) == ["a", "s1", "s2_9", "s2_10", "s10_2"]


def test_dreambench_keys_are_relative_paths_with_dashes():
    assert dreambench_key("live_subject_animal_00_kitten/0_0.png") == "live_subject_animal_00_kitten-0_0"
    assert dreambench_key("object/20_rubik's_cube/3_1.jpg") == "object-20_rubik's_cube-3_1"
    assert dreambench_key("v1.2/img") == "v1.2-img"  # only the file's extension goes


def test_single_subject_with_files_and_a_reference_folder(tmp_path, rng):
    ref_a = write_image(tmp_path / "refs" / "a.png", rng)
    ref_b = write_image(tmp_path / "refs" / "b.png", rng)
    gens = [write_image(tmp_path / "gen" / f"{i}.png", rng) for i in range(3)]
    plan = plan_single_subject([ref_a], [tmp_path / "gen"])
    assert [s.name for s in plan.subjects] == ["a"]
    assert plan.subjects[0].references == (ref_a,)
    assert [it.path for it in plan.items] == gens
    assert [it.index for it in plan.items] == [0, 1, 2]
    from_folder = plan_single_subject([tmp_path / "refs"], [tmp_path / "gen"], subject="dog")
    assert from_folder.subjects[0].name == "dog"
    assert from_folder.subjects[0].references == (ref_a, ref_b)
    assert [it.key_path for it in from_folder.items] == ["0.png", "1.png", "2.png"]


def test_two_generated_folders_share_a_key_root(tmp_path, rng):
    ref = write_image(tmp_path / "ref.png", rng)
    write_image(tmp_path / "runs" / "lr1" / "0.png", rng)
    write_image(tmp_path / "runs" / "lr2" / "0.png", rng)
    plan = plan_single_subject([ref], [tmp_path / "runs" / "lr1", tmp_path / "runs" / "lr2"])
    assert plan.key_root == (tmp_path / "runs").resolve()
    assert plan.dreambench_keys() == ["lr1-0", "lr2-0"]


def _two_subject_tree(root: Path, rng) -> dict[str, list[Path]]:
    files = {
        "dog_refs": [write_image(root / "refs" / "dog" / f"{i}.png", rng) for i in range(2)],
        "cat_refs": [write_image(root / "refs" / "cat.jpg", rng, fmt="JPEG")],
        "dog_gen": [write_image(root / "gen" / "dog" / f"{i}.png", rng) for i in range(3)],
        "cat_gen": [write_image(root / "gen" / "cat" / f"{i}.png", rng) for i in range(2)],
    }
    return files


def test_csv_mapping_pairs_each_image_with_its_own_references(tmp_path, rng):
    files = _two_subject_tree(tmp_path, rng)
    (tmp_path / "map.csv").write_text(
        "subject,references,generated\n"
        "dog,refs/dog,gen/dog\n"
        "cat,refs/cat.jpg,gen/cat\n"
    )
    plan = plan_from_mapping(tmp_path / "map.csv")
    refs = {s.name: s.references for s in plan.subjects}
    assert refs == {"dog": tuple(files["dog_refs"]), "cat": tuple(files["cat_refs"])}
    by_subject = {name: [it.path for it in plan.items if it.subject == name] for name in refs}
    assert by_subject == {"dog": files["dog_gen"], "cat": files["cat_gen"]}
    assert plan.dreambench_keys() == ["dog-0", "dog-1", "dog-2", "cat-0", "cat-1"]


def test_json_mapping_in_both_shapes_and_merged_rows(tmp_path, rng):
    files = _two_subject_tree(tmp_path, rng)
    (tmp_path / "map.json").write_text(json.dumps({
        "dog": {"references": ["refs/dog/0.png", "refs/dog/1.png"], "generated": "gen/dog"},
        "cat": {"references": "refs/cat.jpg", "generated": ["gen/cat"]},
    }))
    as_object = plan_from_mapping(tmp_path / "map.json")
    (tmp_path / "list.json").write_text(json.dumps([
        {"subject": "dog", "references": "refs/dog/0.png", "generated": "gen/dog"},
        {"subject": "cat", "references": "refs/cat.jpg", "generated": "gen/cat"},
        {"subject": "dog", "references": "refs/dog/1.png", "generated": "gen/dog"},
    ]))
    as_list = plan_from_mapping(tmp_path / "list.json")
    for plan in (as_object, as_list):
        assert [(s.name, s.references) for s in plan.subjects] == [
            ("dog", tuple(files["dog_refs"])), ("cat", tuple(files["cat_refs"]))]
        assert [it.path for it in plan.items] == files["dog_gen"] + files["cat_gen"]


@pytest.mark.parametrize("content, message", [
    ('{"dog": {"references": "refs/dog", "generated": "gen/dog", "weight": [2]}}', "weight: an extra column must hold text"),
    ('{"dog": {"references": "refs/dog", "generated": "gen/dog", "rank": "1"}}', "column 'rank' clashes"),
    ('{"dog": {"references": "refs/dog"}}', "missing \\['generated'\\]"),
    ('[1, 2]', "entry 0"),
    ('{"dog": {"references": "refs/nope.png", "generated": "gen/dog"}}', "nope.png does not exist"),
    ('{"dog": {"references": "refs/dog", "generated": "gen/nope"}}', "gen/nope does not exist"),
    ("not json", "is not valid JSON"),
])
def test_bad_json_mappings_name_the_problem(tmp_path, rng, content, message):
    _two_subject_tree(tmp_path, rng)
    (tmp_path / "map.json").write_text(content)
    with pytest.raises(DatasetError, match=message):
        plan_from_mapping(tmp_path / "map.json")


def test_bad_csv_mapping_header_is_named(tmp_path, rng):
    _two_subject_tree(tmp_path, rng)
    (tmp_path / "map.csv").write_text("name,refs,gens\ndog,refs/dog,gen/dog\n")
    with pytest.raises(DatasetError, match="header must hold"):
        plan_from_mapping(tmp_path / "map.csv")
    (tmp_path / "map.yaml").write_text("x")
    with pytest.raises(DatasetError, match="unknown format"):
        plan_from_mapping(tmp_path / "map.yaml")


def test_dreambench_style_folders_match_flat_and_nested_names(tmp_path, rng):
    kitten_refs = [write_image(tmp_path / "refs" / "live_subject_animal" / "00_kitten" / f"{i}.jpg", rng, fmt="JPEG")
                   for i in range(2)]
    hat_ref = write_image(tmp_path / "refs" / "object" / "01_hat" / "0.jpg", rng, fmt="JPEG")
    write_image(tmp_path / "refs" / "object" / "02_unused" / "0.jpg", rng, fmt="JPEG")
    kitten = [write_image(tmp_path / "emu2" / "live_subject_animal_00_kitten" / f"{p}_0.png", rng) for p in (0, 1, 10)]
    hat = [write_image(tmp_path / "emu2" / "object" / "01_hat" / "0_0.png", rng)]
    plan = plan_from_subject_folders(tmp_path / "refs", [tmp_path / "emu2"])
    assert [(s.name, s.references) for s in plan.subjects] == [
        ("live_subject_animal/00_kitten", tuple(kitten_refs)), ("object/01_hat", (hat_ref,))]
    assert [it.path for it in plan.items] == kitten + hat
    assert plan.dreambench_keys() == [
        "live_subject_animal_00_kitten-0_0", "live_subject_animal_00_kitten-1_0",
        "live_subject_animal_00_kitten-10_0", "object-01_hat-0_0"]


def test_images_outside_any_subject_folder_stop_the_plan(tmp_path, rng):
    write_image(tmp_path / "refs" / "dog" / "0.png", rng)
    write_image(tmp_path / "gen" / "dog" / "0.png", rng)
    write_image(tmp_path / "gen" / "doggo" / "0.png", rng)
    with pytest.raises(DatasetError, match="not in a folder named after a reference subject.*doggo"):
        plan_from_subject_folders(tmp_path / "refs", [tmp_path / "gen"])
    with pytest.raises(DatasetError, match="no folder in .*other.* is named after a subject"):
        write_image(tmp_path / "other" / "cat" / "0.png", rng)
        plan_from_subject_folders(tmp_path / "refs", [tmp_path / "other"])


def test_missing_reference_and_empty_folders_stop_before_any_work(tmp_path, rng):
    ref = write_image(tmp_path / "ref.png", rng)
    write_image(tmp_path / "gen" / "0.png", rng)
    (tmp_path / "empty_gen").mkdir()
    (tmp_path / "empty_gen" / "caption.txt").write_text("a dog")
    (tmp_path / "empty_refs").mkdir()
    with pytest.raises(DatasetError, match="missing.png does not exist"):
        plan_single_subject([tmp_path / "missing.png"], [tmp_path / "gen"])
    with pytest.raises(DatasetError, match="empty_refs holds no image"):
        plan_single_subject([tmp_path / "empty_refs"], [tmp_path / "gen"])
    with pytest.raises(DatasetError, match="empty_gen holds no image"):
        plan_single_subject([ref], [tmp_path / "empty_gen"])
    with pytest.raises(DatasetError, match="nowhere does not exist"):
        plan_single_subject([ref], [tmp_path / "nowhere"])


def test_a_shared_dreambench_key_is_refused(tmp_path, rng):
    ref = write_image(tmp_path / "ref.png", rng)
    write_image(tmp_path / "gen" / "a" / "b-c.png", rng)
    write_image(tmp_path / "gen" / "a-b" / "c.png", rng)
    plan = plan_single_subject([ref], [tmp_path / "gen"])
    with pytest.raises(DatasetError, match="'a-b-c' is shared"):
        plan.dreambench_keys()


def test_a_subject_folder_inside_another_keeps_its_own_images(tmp_path, rng):
    write_image(tmp_path / "refs" / "animal" / "0.png", rng)
    write_image(tmp_path / "refs" / "animal" / "cat" / "0.png", rng)
    outer = write_image(tmp_path / "gen" / "animal" / "0.png", rng)
    inner = write_image(tmp_path / "gen" / "animal" / "cat" / "1.png", rng)
    plan = plan_from_subject_folders(tmp_path / "refs", [tmp_path / "gen"])
    assert [(it.subject, it.path) for it in plan.items] == [("animal", outer), ("animal/cat", inner)]
