"""README.md is the front door: every relative link resolves, and its headline table is the committed results'."""

import functools
import importlib.util
import re
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
README = ROOT / "README.md"
LINK = re.compile(r"!?\[[^\]]*\]\(([^)\s]+)\)")


def _slug(heading: str) -> str:
    """GitHub's (and MkDocs' default toc) anchor for a Markdown heading."""
    text = re.sub(r"[`*_]|\{#[^}]+\}|\[([^\]]*)\]\([^)]*\)", r"\1", heading).strip().lower()
    return re.sub(r"[^\w\- ]", "", text).replace(" ", "-")


def _anchors(page: Path) -> set[str]:
    text = page.read_text()
    out = {_slug(h) for h in re.findall(r"^#{1,6} (.+)$", text, flags=re.M)}
    return out | set(re.findall(r"\{#([\w-]+)\}", text))


def _relative_links(text: str) -> list[str]:
    code_free = re.sub(r"```.*?```", "", text, flags=re.S)
    return [t for t in LINK.findall(code_free) if not re.match(r"^[a-z]+:", t)]


def test_every_relative_link_resolves_to_a_file_or_an_anchor():
    links = _relative_links(README.read_text())
    assert len(links) > 10  # the docs pages, the changelog, the plots
    for target in links:
        path, _, anchor = target.partition("#")
        page = (ROOT / path) if path else README
        assert page.is_file(), f"README links to {target}, which is not a file"
        if anchor and page.suffix == ".md":
            assert anchor in _anchors(page), f"README links to {target}: no heading #{anchor} in {path or 'README'}"


def test_the_link_check_catches_a_broken_link():
    assert _relative_links("see [x](docs/nope.md) and [y](https://example.com)") == ["docs/nope.md"]
    assert not (ROOT / "docs/nope.md").is_file()


def test_the_first_screen_has_both_commands():
    head = README.read_text().splitlines()[:40]
    assert any("python3 -m venv .venv && . .venv/bin/activate" in line for line in head)
    assert any("bash scripts/install.sh && safe-dit generate" in line for line in head)
    assert any("bash scripts/install.sh --test && python3 -m pytest -q" in line for line in head)
    assert len(README.read_text().splitlines()) <= 300


def test_ci_runs_the_readmes_test_command_and_the_strict_docs_build():
    ci = [line for line in (ROOT / ".ci" / "run").read_text().splitlines() if line and not line.startswith("#")]
    assert "bash scripts/install.sh --test && python3 -m pytest -q" in ci
    assert any("mkdocs build --strict" in line for line in ci)


@functools.cache
def _headline():
    spec = importlib.util.spec_from_file_location("headline_results", ROOT / "scripts" / "headline_results.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_the_headline_table_is_the_committed_results():
    table = _headline().table()
    if "| ? |" in table:
        pytest.skip("no git history here: the measurement dates cannot be read")
    block = re.search(r"<!-- headline-results:start -->\n(.*?)\n<!-- headline-results:end -->", README.read_text(),
                      flags=re.S)
    assert block, "README.md has no headline-results block"
    assert block.group(1) == table, "README's headline table differs: python3 scripts/headline_results.py"


def test_defaults_are_named_by_version():
    names = _headline().defaults_version
    assert names({"keep_ratio": 0.25, "anchor_interval": 5}) == "0.1"
    assert names({"keep_ratio": 0.15, "anchor_growth": 2.0, "final_selective_steps": 1}) == "0.4"
    from safe_dit.config import SafeConfig

    assert names(SafeConfig("safe-core").__dict__) == _current_version()[:3]


def _current_version() -> str:
    return re.search(r'^version = "([^"]+)"', (ROOT / "pyproject.toml").read_text(), flags=re.M).group(1)


def test_the_version_is_the_changelogs_latest_release():
    import safe_dit

    released = re.findall(r"^## \[(\d+\.\d+\.\d+)\]", (ROOT / "CHANGELOG.md").read_text(), flags=re.M)
    assert released and released[0] == _current_version() == safe_dit.__version__


def _table_after(text: str, heading: str) -> str:
    section = text.split(heading, 1)[1].split("\n## ", 1)[0]
    return "\n".join(line for line in section.splitlines() if line.startswith("|"))


def test_every_registered_backbone_has_a_row_in_the_readme_and_the_backbones_page():
    from safe_dit.adapters import supported_classes

    readme = _table_after(README.read_text(), "## Supported models")
    backbones = (ROOT / "docs" / "backbones.md").read_text()
    for name in supported_classes():
        assert f"`{name}`" in readme, f"README's supported-models table has no row for {name}"
        assert f"`{name}`" in backbones, f"docs/backbones.md has no row for {name}"
