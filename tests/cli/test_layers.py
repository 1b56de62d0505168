"""The layers show in the folders and imports go one way: cli -> commands -> study -> bench -> embedded ->
inspection -> testing -> api -> adapters -> engine -> config. Read from the sources (no import), so it is checked
for every module, including those that import their dependencies inside functions."""

from __future__ import annotations

import ast
from pathlib import Path

import safe_dit

ROOT = Path(safe_dit.__file__).parent
RANK = {"config": 0, "safe_dit": 0, "engine": 1, "adapters": 2, "api": 3, "testing": 4, "inspection": 5,
        "embedded": 6, "bench": 7, "study": 8, "commands": 9, "cli": 10}
PUBLIC_FACE = {"__init__", "api", "config", "cli"}  # the only top-level modules


def _layer(module: str) -> str:
    parts = module.split(".")
    return parts[1] if len(parts) > 1 else "safe_dit"


def _imports(path: Path):
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
        if isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            names = [node.module]
        elif isinstance(node, ast.Import):
            names = [a.name for a in node.names]
        else:
            continue
        yield from (n for n in names if n == "safe_dit" or n.startswith("safe_dit."))


def test_top_level_modules_are_the_public_face_only():
    assert {p.stem for p in ROOT.glob("*.py")} == PUBLIC_FACE
    assert set(RANK) >= {p.name for p in ROOT.iterdir() if p.is_dir() and (p / "__init__.py").exists()}


def test_no_module_over_400_lines():
    long = {str(p.relative_to(ROOT)): n for p in ROOT.rglob("*.py") if (n := len(p.read_text().splitlines())) > 400}
    assert not long


def test_imports_go_one_way():
    upward = []
    for path in ROOT.rglob("*.py"):
        if path == ROOT / "__init__.py":  # the package's lazy face: safe_dit.apply_safe_dit loads api on first use
            continue
        source = _layer("safe_dit." + ".".join(path.relative_to(ROOT).with_suffix("").parts))
        for target in _imports(path):
            layer = _layer(target)
            if layer != source and RANK[layer] >= RANK[source]:
                upward.append(f"{path.relative_to(ROOT)} imports {target}")
    assert not upward
