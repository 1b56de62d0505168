"""MkDocs hooks for the safe-dit site (``hooks:`` in mkdocs.yml).

* The committed result files under ``benchmarks/results`` (plots, JSON, text tables) are served at
  ``benchmarks/results/`` inside the site, so the pages show them without a copy in ``docs/``.
* ``CHANGELOG.md`` at the repository root is the ``changelog.md`` page.
* ``docs/results/index.md`` gets the table of every end-to-end result file at its marker
  (``scripts/headline_results.py``, the same table as the README's).
* ``docs/configuration.md`` gets the ``SafeConfig`` reference at its marker, rendered from the dataclass
  (``dataclasses.fields``: name, type, default) and its docstring (one entry per field), so the page cannot
  drift from the code. A field without an entry fails the build.
"""

from __future__ import annotations

import dataclasses
import inspect
import re
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
RESULTS = ROOT / "benchmarks" / "results"
RESULT_SUFFIXES = (".png", ".json", ".txt")
MARKER = "<!-- safe-config-reference -->"
RESULTS_MARKER = "<!-- e2e-results-table -->"

_ENTRY = re.compile(r"^([a-z_][a-z0-9_]*(?: / [a-z_][a-z0-9_]*)*):\s*$")


class UndocumentedField(RuntimeError):
    """A dataclass field has no entry in the class docstring."""


def docstring_entries(cls) -> tuple[str, list[tuple[str, tuple[str, ...], list[str]]]]:
    """Split ``cls.__doc__`` into its introduction and ``(group, names, body lines)`` entries.

    An entry is a line ``name:`` (or ``a / b:``) followed by indented lines; an unindented paragraph between
    entries starts a new group (its first sentence names the group)."""
    lines = inspect.cleandoc(cls.__doc__ or "").splitlines()
    intro: list[str] = []
    entries: list[tuple[str, tuple[str, ...], list[str]]] = []
    group, pending, current = "Method", [], None
    for line in lines:
        match = _ENTRY.match(line)
        if match:
            if pending:  # a paragraph between entries opens a group: "Ablation knobs (...)" -> "Ablation knobs"
                group = " ".join(pending).split("(")[0].strip().rstrip(":.")
                pending = []
            current = (group, tuple(n.strip() for n in match.group(1).split("/")), [])
            entries.append(current)
        elif line.startswith(" ") and current is not None:
            current[2].append(line.strip())
        else:
            current = None
            if not entries:
                intro.append(line.strip())
            elif line.strip():
                pending.append(line.strip())
    return "\n".join(intro).strip(), entries


def _body_markdown(body: list[str]) -> str:
    """Docstring lines -> Markdown: lines opening with a literal (``mode``'s values) become bullets."""
    out, para = [], []
    starts = {m.end() for m in (re.match(r"^``[^`]+``\s+", line) for line in body) if m}
    heads = sum(bool(re.match(r"^``[^`]+``\s", line)) for line in body)
    listing = heads >= 2 and len(starts) == 1  # a column of literals with their text aligned (mode's values)
    for line in body:
        if listing and re.match(r"^``[^`]+``\s", line):
            if para:
                out.append(" ".join(para))
                para = []
            name, text = re.match(r"^(``[^`]+``)\s+(.*)$", line).groups()
            out.append(f"* {name}: {text}")
        elif out and out[-1].startswith("* ") and not para:
            out[-1] += " " + line
        else:
            para.append(line)
    if para:
        out.append(" ".join(para))
    text = "\n".join(out)
    return re.sub(r"``([^`]+)``", r"`\1`", text)


def config_reference(cls=None) -> str:
    """The Markdown reference of a dataclass (default: ``safe_dit.SafeConfig``): one section per field with its
    type, default and docstring entry. Raises :class:`UndocumentedField` for a field that has no entry and is
    not named (as ````name````) in another field's entry."""
    if cls is None:
        cls = _safe_config()
    _, entries = docstring_entries(cls)
    by_name = {name: (group, names, body) for group, names, body in entries for name in names}
    fields = dataclasses.fields(cls)
    known = {f.name for f in fields}
    stray = sorted(set(by_name) - known)
    if stray:
        raise UndocumentedField(f"{cls.__name__}'s docstring documents fields it does not have: {', '.join(stray)}")
    parts: list[tuple[str, str]] = []
    for f in fields:
        if f.name in by_name:
            _, names, body = by_name[f.name]
            text = _body_markdown(body)
            if len(names) > 1:
                text = "Documented together with " + ", ".join(f"`{n}`" for n in names if n != f.name) + ". " + text
        else:
            owner = next((e for e in entries if f"``{f.name}``" in " ".join(e[2])), None)
            if owner is None:
                raise UndocumentedField(f"{cls.__name__}.{f.name} has no entry in the class docstring")
            text = f"See [`{owner[1][0]}`](#{owner[1][0]}): " + _body_markdown(owner[2])
        default = "required" if f.default is dataclasses.MISSING else f"`{f.default!r}`"
        kind = str(f.type).replace("|", "&#124;")
        parts.append(
            (f"| [`{f.name}`](#{f.name}) | `{kind}` | {default} |",
             f"### `{f.name}` {{#{f.name}}}\n\n`{f.type}`, default {default}.\n\n{text}\n")
        )
    out = [f"{len(fields)} fields, in the order of the dataclass.\n",
           "## Fields\n\n| field | type | default |\n|---|---|---|"]
    out.extend(row for row, _ in parts)
    out.append("")
    out.extend(detail for _, detail in parts)
    return "\n".join(out)


def _safe_config():
    src = str(ROOT / "src")
    if src not in sys.path:
        sys.path.insert(0, src)  # the checkout being documented, before any installed copy
    from safe_dit.config import SafeConfig

    return SafeConfig


# ---- mkdocs event hooks -------------------------------------------------------------------------------------

def on_files(files, config):
    from mkdocs.structure.files import File

    for path in sorted(RESULTS.iterdir()):
        if path.suffix in RESULT_SUFFIXES:
            files.append(File.generated(config, f"benchmarks/results/{path.name}", abs_src_path=str(path)))
    files.append(File.generated(config, "changelog.md", content=(ROOT / "CHANGELOG.md").read_text()))
    return files


def e2e_results_table() -> str:
    """The README's headline table (``scripts/headline_results.py``), rendered from the committed result files."""
    import importlib.util

    spec = importlib.util.spec_from_file_location("headline_results", ROOT / "scripts" / "headline_results.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module.table()


def on_page_markdown(markdown, page, config, files):
    if MARKER in markdown:
        markdown = markdown.replace(MARKER, config_reference())
    if RESULTS_MARKER in markdown:
        markdown = markdown.replace(RESULTS_MARKER, e2e_results_table())
    return markdown
