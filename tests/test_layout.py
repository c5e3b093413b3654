"""The layout of docs/ARCHITECTURE.md, checked on the source: the library (``comfy_nearid``
outside its CLI layer ``comfy_nearid/commands``) imports no trainer code, nor ComfyUI."""

from __future__ import annotations

import ast
from pathlib import Path

LIBRARY = Path(__file__).resolve().parents[1] / "comfy_nearid"
CLI_LAYER = LIBRARY / "commands"


def _imported_modules(path: Path, root: Path = LIBRARY.parent) -> list[tuple[int, str]]:
    """Every module an import statement names, at any depth (function bodies included);
    relative imports resolved against the file's package (``root``: the folder holding it)."""
    tree = ast.parse(path.read_text(encoding="utf-8"), filename=str(path))
    package = list(path.relative_to(root).with_suffix("").parts[:-1])
    out = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            out += [(node.lineno, alias.name) for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = package[: len(package) - node.level + 1]
                name = ".".join(base + ([node.module] if node.module else []))
            else:
                name = node.module or ""
            out.append((node.lineno, name))
    return out


def _library_files() -> list[Path]:
    return [p for p in sorted(LIBRARY.rglob("*.py")) if CLI_LAYER not in p.parents]


def test_the_scan_sees_relative_and_nested_imports(tmp_path):
    # the checker itself, on a hand-written package: nested, relative and parent imports
    probe = tmp_path / "pkg" / "sub" / "probe.py"
    probe.parent.mkdir(parents=True)
    probe.write_text(
        "import os\n"
        "def f():\n    from trainer.loop import train\n"
        "from .model import load_model\n"
        "from ..evaluate import Scorer\n"
        "from . import images\n"
    )
    assert _imported_modules(probe, tmp_path) == [
        (1, "os"), (4, "pkg.sub.model"), (5, "pkg.evaluate"), (6, "pkg.sub"), (3, "trainer.loop"),
    ]


def test_library_imports_no_trainer_code():
    offenders = [
        f"{path.relative_to(LIBRARY.parent)}:{line} imports {name}"
        for path in _library_files()
        for line, name in _imported_modules(path)
        if name == "trainer" or name.startswith("trainer.")
    ]
    assert not offenders, "\n".join(offenders)
    assert len(_library_files()) > 20  # the scan really looked at the library


def test_cli_layer_is_where_the_trainer_is_reached():
    # the demo's training step lives in the trainer and the CLI layer hands it to the library
    names = [name for path in CLI_LAYER.glob("*.py") for _, name in _imported_modules(path)]
    assert "trainer.demo" in names
