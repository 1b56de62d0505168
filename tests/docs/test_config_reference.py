"""The SafeConfig reference page is generated from the dataclass: every field, its type and its default."""

import dataclasses
import functools
import importlib.util
from pathlib import Path

import pytest

from safe_dit.config import SafeConfig

ROOT = Path(__file__).resolve().parents[2]


@functools.cache
def _hooks():
    spec = importlib.util.spec_from_file_location("docs_hooks", ROOT / "scripts" / "docs_hooks.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def _section(page: str, name: str) -> str:
    start = page.index(f"### `{name}` {{#{name}}}")
    end = page.find("\n### ", start + 1)
    return page[start:] if end < 0 else page[start:end]


def test_every_field_has_a_section_with_its_type_and_default():
    page = _hooks().config_reference(SafeConfig)
    fields = dataclasses.fields(SafeConfig)
    assert page.startswith(f"{len(fields)} fields")
    for f in fields:
        assert f"| [`{f.name}`](#{f.name}) |" in page, f"{f.name} missing from the summary table"
        section = _section(page, f.name)
        assert f"default `{f.default!r}`" in section, f.name
        assert f"`{f.type}`" in section, f.name
        assert len(section.split("\n\n", 2)[-1].strip()) > 20, f"{f.name} has no description"


def test_the_page_marks_where_the_reference_goes():
    hooks = _hooks()
    page = (ROOT / "docs" / "configuration.md").read_text()
    assert page.count(hooks.MARKER) == 1
    rendered = hooks.on_page_markdown(page, None, None, None)
    assert hooks.MARKER not in rendered and "### `keep_ratio` {#keep_ratio}" in rendered


def test_a_field_without_a_docstring_entry_fails_the_build():
    @dataclasses.dataclass(frozen=True)
    class Partial:
        """A config.

        alpha:
            The first knob.
        """

        alpha: int = 1
        beta: float = 0.5

    with pytest.raises(_hooks().UndocumentedField, match="Partial.beta"):
        _hooks().config_reference(Partial)


def test_a_field_named_in_another_entry_points_there():
    @dataclasses.dataclass(frozen=True)
    class Shared:
        """A config.

        kind:
            Which kind; ``"random"`` is seeded by ``seed``.
        """

        kind: str = "x"
        seed: int = 0

    page = _hooks().config_reference(Shared)
    assert "See [`kind`](#kind)" in _section(page, "seed")


def test_the_results_page_renders_every_e2e_file():
    hooks = _hooks()
    page = (ROOT / "docs" / "results" / "index.md").read_text()
    assert page.count(hooks.RESULTS_MARKER) == 1
    rendered = hooks.on_page_markdown(page, None, None, None)
    rows = [line for line in rendered.splitlines() if line.startswith("| ") and "×" in line]
    assert len(rows) >= 8 and any("NVIDIA" in r for r in rows) and any("cores" in r for r in rows)
