"""Compare the stock and safe-dit junit XML of scripts/diffusers_conformance.sh.

    python scripts/conformance_report.py OUT_DIR [--json summary.json] [--root DIFFUSERS_CHECKOUT]

OUT_DIR holds stock/*.xml, safe-dit/*.xml (one per test file, junit_family=xunit1) and safe-dit/calls.jsonl
(per test: patched models built, safe-dit attention calls; written by scripts/safe_dit_conformance.py).
Prints per file the passed/failed/skipped counts of both runs, every test that passes stock and fails under
safe-dit (with the first line of its error and its class: designed refusal, expected numeric difference or
defect), the tests that built a patched model but made no safe-dit attention call, and writes a JSON summary.
Exit 0 only when no stock-pass -> safe-dit-fail is a defect.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import xml.etree.ElementTree as ET
from pathlib import Path

RUNS = ("stock", "safe-dit")

# Every stock-pass -> safe-dit-fail is classified: a designed refusal (safe-dit's own one-line SafeDitError for
# what it cannot run exactly), an expected numeric difference (a test that holds the output to the stock model's
# numbers, which the approximate scheduled modes do not claim), or, matching neither, a defect. A refusal is
# designed only where its message is one of these; any other SafeDitError counts as a defect.
DESIGNED_REFUSALS = (
    ("cannot be combined with", "a diffusers step cache (FirstBlockCache, FasterCache, PAB, TaylorSeer, MagCache) on "
     "a safe-core/safe-sw model: it would mix whole-step tensors of every token with the selective steps' rows; "
     "safe-dit's own step reuse (reuse_every) stands in, dense-fp composes with the cache"),
    ("needs one transformer call per sampling step", "two transformer calls per step (true CFG with a negative "
     "prompt, skip-layer guidance): each would overwrite the other's caches; dense-fp runs them"),
)
# (test-name fragment, why the scheduled modes' output may differ there): only tests that compare with numbers
NUMERIC = ()


def _first_line(text: str | None) -> str:
    for line in (text or "").splitlines():
        line = line.strip()
        if line:
            return line[:400]
    return ""


def _error_line(el) -> str:
    """The most telling line: the last 'E   ...' exception line of the traceback, else the message."""
    body = el.text or ""
    e_lines = [ln[1:].strip() for ln in body.splitlines() if ln.startswith("E ") and ln[1:].strip()]
    for ln in e_lines:  # first line that names an exception type
        head = ln.split(":", 1)[0]
        if head.endswith(("Error", "Exception", "Exit")) or head.startswith("safe_dit"):
            return ln[:400]
    return _first_line(el.get("message")) or (e_lines[0][:400] if e_lines else _first_line(body))


def parse_run(folder: Path) -> dict[str, dict]:
    """test id -> {file, outcome, error} over all XML files in ``folder``."""
    tests: dict[str, dict] = {}
    for xml in sorted(folder.glob("*.xml")):
        try:
            root = ET.parse(xml).getroot()
        except ET.ParseError as exc:
            print(f"warning: cannot parse {xml}: {exc}", file=sys.stderr)
            continue
        for case in root.iter("testcase"):
            # the test file this XML is for (xunit1's "file" names where a mixin defines the test)
            file = "tests/" + xml.stem.replace("__", "/") + ".py"
            tid = f"{case.get('classname')}::{case.get('name')}"
            outcome, error = "passed", ""
            for child in case:
                if child.tag in ("failure", "error"):
                    # an error in teardown after a pass still fails the test
                    outcome, error = "failed", _error_line(child)
                    break
                if child.tag == "skipped":
                    outcome, error = "skipped", _first_line(child.get("message"))
            prev = tests.get(tid)
            if prev is None or prev["outcome"] != "failed":
                tests[tid] = {"file": file, "outcome": outcome, "error": error, "xml": xml.name}
    return tests


def load_calls(path: Path) -> dict[str, dict]:
    calls: dict[str, dict] = {}
    if path.exists():
        for line in path.read_text().splitlines():
            if line.strip():
                rec = json.loads(line)
                calls[rec["nodeid"]] = rec
    return calls


def _nodeid_to_tid(nodeid: str) -> str:
    # tests/pipelines/flux/test_pipeline_flux.py::Cls::test_x[param]
    #   -> tests.pipelines.flux.test_pipeline_flux.Cls::test_x[param]
    path, _, rest = nodeid.partition("::")
    module = path[:-3].replace("/", ".") if path.endswith(".py") else path
    parts = rest.split("::")
    return ".".join([module, *parts[:-1]]) + "::" + parts[-1]


def _diffusers_tests_rev(root: str | None) -> str | None:
    if not root:
        return None
    marker = Path(root) / "DIFFUSERS_TESTS_REV"
    if marker.exists():
        return marker.read_text().strip()
    try:
        return subprocess.run(["git", "-C", root, "rev-parse", "HEAD"], capture_output=True, text=True,
                              check=True).stdout.strip() or None
    except Exception:
        return None


def classify(test_id: str, error: str) -> tuple[str, str]:
    """(designed refusal | expected numeric difference | defect, why) of one stock-pass -> safe-dit-fail."""
    if "SafeDitError" in error:
        for fragment, why in DESIGNED_REFUSALS:
            if fragment in error:
                return "designed refusal", why
        return "defect", "a SafeDitError that is none of the designed refusals"
    for fragment, why in NUMERIC:
        if fragment in test_id and error.startswith("AssertionError"):
            return "expected numeric difference", why
    return "defect", "no designed refusal, no expected numeric difference"


def build(out: Path, root: str | None = None) -> dict:
    runs = {r: parse_run(out / r) for r in RUNS}
    calls = load_calls(out / "safe-dit" / "calls.jsonl")
    files: dict[str, dict] = {}
    for run, tests in runs.items():
        for t in tests.values():
            counts = files.setdefault(t["file"], {r: {"passed": 0, "failed": 0, "skipped": 0} for r in RUNS})
            counts[run][t["outcome"]] += 1
    stock, safe = runs["stock"], runs["safe-dit"]
    regressions, newly_skipped, missing, fixed = [], [], [], []
    for tid, t in sorted(stock.items()):
        s = safe.get(tid)
        if s is None:
            missing.append({"id": tid, "file": t["file"], "stock": t["outcome"]})
        elif t["outcome"] == "passed" and s["outcome"] == "failed":
            kind, why = classify(tid, s["error"])
            regressions.append({"id": tid, "file": t["file"], "error": s["error"], "class": kind, "why": why})
        elif t["outcome"] == "passed" and s["outcome"] == "skipped":
            newly_skipped.append({"id": tid, "file": t["file"], "reason": s["error"]})
        elif t["outcome"] == "failed" and s["outcome"] == "passed":
            fixed.append({"id": tid, "file": t["file"]})
    no_calls, patched = [], 0
    for nodeid, rec in sorted(calls.items()):
        if rec.get("models", 0) > 0:
            patched += 1
            if rec.get("attention_calls", 0) == 0:
                tid = _nodeid_to_tid(nodeid)
                no_calls.append({"id": tid, "file": nodeid.partition("::")[0],
                                 "outcome": safe.get(tid, {}).get("outcome"), "models": rec["models"]})
    stock_failed_both = sorted(tid for tid, t in stock.items()
                               if t["outcome"] == "failed" and safe.get(tid, {}).get("outcome") == "failed")
    incomplete = (out / "incomplete.txt").read_text().split("\n") if (out / "incomplete.txt").exists() else []
    mode_file = out / "safe-dit" / "mode"
    classes = {k: sum(r["class"] == k for r in regressions)
               for k in ("designed refusal", "expected numeric difference", "defect")}
    return {
        "mode": mode_file.read_text().strip() if mode_file.exists() else "dense-fp",
        "diffusers_tests_rev": _diffusers_tests_rev(root),
        "files": files,
        "totals": {r: {k: sum(f[r][k] for f in files.values()) for k in ("passed", "failed", "skipped")}
                   for r in RUNS},
        "stock_pass_safe_dit_fail": regressions,
        "stock_pass_safe_dit_fail_by_class": classes,
        "selective_steps": sum(rec.get("selective_steps", 0) for rec in calls.values()),
        "stock_pass_safe_dit_skip": newly_skipped,
        "stock_fail_safe_dit_pass": fixed,
        "failed_in_both": stock_failed_both,
        "missing_in_safe_dit_run": missing,
        "tests_building_patched_models": patched,
        "patched_but_no_safe_dit_attention_call": no_calls,
        "incomplete": [ln for ln in incomplete if ln.strip()],
    }


def render(summary: dict) -> str:
    lines = [f"diffusers' own tests: stock vs safe-dit ({summary.get('mode', 'dense-fp')})"]
    if summary.get("diffusers_tests_rev"):
        lines.append(f"diffusers tests at: {summary['diffusers_tests_rev']}")
    lines.append("")
    w = max([len(f) for f in summary["files"]] + [20])
    lines.append(f"{'file':<{w}}  {'stock p/f/s':>14}  {'safe-dit p/f/s':>14}")
    for f, c in sorted(summary["files"].items()):
        s, d = c["stock"], c["safe-dit"]
        lines.append(f"{f:<{w}}  {s['passed']:>4}/{s['failed']:>3}/{s['skipped']:>4}  "
                     f"{d['passed']:>4}/{d['failed']:>3}/{d['skipped']:>4}")
    s, d = summary["totals"]["stock"], summary["totals"]["safe-dit"]
    lines.append(f"{'TOTAL':<{w}}  {s['passed']:>4}/{s['failed']:>3}/{s['skipped']:>4}  "
                 f"{d['passed']:>4}/{d['failed']:>3}/{d['skipped']:>4}")
    lines.append("")
    reg = summary["stock_pass_safe_dit_fail"]
    by_class = summary.get("stock_pass_safe_dit_fail_by_class", {})
    lines.append(f"stock-pass -> safe-dit-fail: {len(reg)} (" + ", ".join(f"{k}: {v}" for k, v in by_class.items())
                 + ")")
    for r in reg:
        lines.append(f"  [{r['class']}] {r['id']}\n      {r['error']}")
    whys = {}
    for r in reg:
        whys.setdefault((r["class"], r["why"]), []).append(r["id"].rsplit("::", 1)[-1])
    for (kind, why), ids in whys.items():
        lines.append(f"  {kind} ({len(ids)}): {why}")
    for key, label in (("stock_pass_safe_dit_skip", "stock-pass -> safe-dit-skip"),
                       ("stock_fail_safe_dit_pass", "stock-fail -> safe-dit-pass"),
                       ("missing_in_safe_dit_run", "in stock run only")):
        items = summary[key]
        lines.append(f"{label}: {len(items)}")
        for r in items[:50]:
            lines.append(f"  {r['id']}" + (f"  ({r['reason']})" if r.get("reason") else ""))
    lines.append(f"failed in both runs (stock failures, not counted): {len(summary['failed_in_both'])}")
    nc = summary["patched_but_no_safe_dit_attention_call"]
    lines.append(f"tests that built a patched model: {summary['tests_building_patched_models']}; "
                 f"of them with 0 safe-dit attention calls: {len(nc)}")
    if summary.get("mode", "dense-fp") != "dense-fp":
        lines.append(f"selective steps run (only the sensitive rows computed): {summary.get('selective_steps', 0)}")
    by_file: dict[str, dict[str, int]] = {}
    for r in nc:
        c = by_file.setdefault(r["file"], {})
        c[r["outcome"]] = c.get(r["outcome"], 0) + 1
    for f, c in sorted(by_file.items()):
        lines.append(f"  {f}: " + ", ".join(f"{v} {k}" for k, v in sorted(c.items())))
    if nc:
        lines.append("  (ids in the JSON summary: patched_but_no_safe_dit_attention_call)")
    if summary["incomplete"]:
        lines.append("INCOMPLETE: " + "; ".join(summary["incomplete"]))
    return "\n".join(lines)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("out_dir", type=Path)
    ap.add_argument("--json", type=Path, default=None, help="write the summary here (default OUT_DIR/summary.json)")
    ap.add_argument("--root", default=None, help="the diffusers checkout the tests came from (for its revision)")
    args = ap.parse_args(argv)
    summary = build(args.out_dir, args.root)
    (args.json or args.out_dir / "summary.json").write_text(json.dumps(summary, indent=1) + "\n")
    print(render(summary))
    return 0 if not summary["stock_pass_safe_dit_fail_by_class"]["defect"] else 1


if __name__ == "__main__":
    sys.exit(main())
