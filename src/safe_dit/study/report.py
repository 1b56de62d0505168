"""Report a study's votes: preference rates with confidence intervals, a one-sided non-inferiority test of B
against A at a stated margin, a per-prompt breakdown, a PNG plot and JSON.

Every vote scores B: 1 when B was preferred, 0.5 for "the same", 0 when A was preferred. B's win rate is the
mean score; 0.5 means raters cannot tell the settings apart. The test, at margin M (default 0.10):

  H0: win rate <= 0.5 - M   (B is worse than A by more than the margin)
  H1: win rate >  0.5 - M   (B is non-inferior)

a one-sided z-test on the mean score whose standard error is clustered by pair (votes on the same prompt
and image pair are not independent); B is called non-inferior when p < alpha, i.e. when the lower bound of
the one-sided (1 - alpha) interval lies above 0.5 - M. The rates of A, B and "same" get Wilson intervals at
the --confidence level. Few votes, few pairs: the normal approximation is rough; the JSON has every count.

  safe-dit study report studies/dense-fp-vs-safe-core          # DIR/report.json and DIR/report.png
  safe-dit study report studies/mine --margin 0.05 --plot plot.png --json result.json
"""

from __future__ import annotations

import io
import json
import math
import sys
from collections import Counter
from pathlib import Path
from statistics import NormalDist

from safe_dit.config import SafeDitError
from safe_dit.study.store import Study, Votes, default_db

SCORE = {"b": 1.0, "same": 0.5, "a": 0.0}


def wilson(k: int, n: int, confidence: float) -> tuple[float, float]:
    """Wilson score interval of a proportion k / n (two-sided, at ``confidence``)."""
    if n == 0:
        return 0.0, 1.0
    z = NormalDist().inv_cdf(0.5 + confidence / 2)
    p = k / n
    centre = (p + z * z / (2 * n)) / (1 + z * z / n)
    half = z / (1 + z * z / n) * math.sqrt(p * (1 - p) / n + z * z / (4 * n * n))
    return max(0.0, centre - half), min(1.0, centre + half)


def non_inferiority(votes: list[dict], margin: float, alpha: float) -> dict:
    """One-sided z-test of B's win rate (ties half) against 0.5 - margin, standard error clustered by pair."""
    n = len(votes)
    bound = 0.5 - margin
    out = dict(hypothesis=f"H0: win rate of B <= {bound:g} (B worse than A by more than the margin {margin:g}); "
                          f"H1: win rate > {bound:g}",
               method="one-sided z-test on per-vote scores (B 1, same 0.5, A 0), standard error clustered by pair",
               margin=margin, alpha=alpha, null_win_rate=bound, votes=n)
    if n == 0:
        return out | dict(win_rate=None, se=None, z=None, p_value=None, lower_bound=None, non_inferior=None,
                          verdict="no votes yet")
    scores = [SCORE[v["choice"]] for v in votes]
    mean = sum(scores) / n
    sums: dict[str, float] = {}
    for v, s in zip(votes, scores):
        sums[v["pair"]] = sums.get(v["pair"], 0.0) + (s - mean)
    clusters = len(sums)
    # CR1 sandwich variance of a mean: sum over pairs of the squared summed residuals, small-sample corrected
    var = sum(r * r for r in sums.values()) / (n * n) * (clusters / (clusters - 1) if clusters > 1 else 1.0)
    se = math.sqrt(var)
    z_alpha = NormalDist().inv_cdf(1 - alpha)
    if se == 0:
        z = math.inf if mean > bound else -math.inf
        p = 0.0 if mean > bound else 1.0
    else:
        z = (mean - bound) / se
        p = 1 - NormalDist().cdf(z)
    lower = mean - z_alpha * se
    ok = p < alpha
    verdict = (f"B non-inferior to A at margin {margin:g} (p = {p:.3g} < {alpha:g})" if ok else
               f"non-inferiority not shown at margin {margin:g} (p = {p:.3g} >= {alpha:g})")
    if se == 0:
        verdict += "; every vote scored the same, so the test has no spread to work with (p is 0 or 1)"
    if clusters < 10:
        verdict += f"; only {_n(clusters, 'pair')} voted on: the normal approximation is rough"
    return out | dict(win_rate=mean, se=se, z=z if math.isfinite(z) else None, p_value=p, lower_bound=lower,
                      non_inferior=ok, pairs_voted=clusters, verdict=verdict)


def analyse(study: Study, votes: list[dict], margin: float, confidence: float) -> dict:
    counts = Counter(v["choice"] for v in votes)
    n = len(votes)
    rates = {k: dict(count=counts.get(k, 0), rate=counts.get(k, 0) / n if n else None,
                     ci=list(wilson(counts.get(k, 0), n, confidence))) for k in ("a", "b", "same")}
    per_pair = []
    for pid, pair in study.pairs.items():
        pv = [v for v in votes if v["pair"] == pid]
        c = Counter(v["choice"] for v in pv)
        per_pair.append(dict(pair=pid, prompt=pair["prompt"], seed=pair["seed"], votes=len(pv), a=c.get("a", 0),
                             b=c.get("b", 0), same=c.get("same", 0),
                             win_rate_b=sum(SCORE[v["choice"]] for v in pv) / len(pv) if pv else None,
                             psnr_b_vs_a=pair.get("psnr_b_vs_a")))
    sides = Counter(v["left"] for v in votes)
    keys = Counter(v["key"] for v in votes)
    m = study.manifest
    return dict(
        report="safe-dit study", study=str(study.folder), a=m["a"], b=m["b"],
        model=m.get("model"), weights=m.get("weights"), size=[m.get("height"), m.get("width")],
        guidance=m.get("guidance"), speedup_b_vs_a=m.get("speedup_b_vs_a"),
        votes=n, raters=len({v["rater"] for v in votes}), pairs=len(study.pairs), confidence=confidence,
        preference=rates, test=non_inferiority(votes, margin, round(1 - confidence, 12)),
        per_rater={r: dict(Counter(v["choice"] for v in votes if v["rater"] == r))
                   for r in sorted({v["rater"] for v in votes})},
        shown_left=dict(a=sides.get("a", 0), b=sides.get("b", 0)), keys=dict(keys), per_prompt=per_pair,
    )


def _n(count: int, noun: str) -> str:
    return f"{count} {noun}{'' if count == 1 else 's'}"


def table(r: dict) -> str:
    a, b = r["a"]["spec"], r["b"]["spec"]
    lines = [f"{_n(r['votes'], 'vote')} by {_n(r['raters'], 'rater')} on {_n(r['pairs'], 'pair')}: A = {a}, B = {b}"]
    level = f"{r['confidence']:.0%}"
    for k, label in (("b", f"B ({b}) better"), ("same", "the same"), ("a", f"A ({a}) better")):
        e = r["preference"][k]
        rate = "-" if e["rate"] is None else f"{e['rate']:6.1%}"
        lines.append(f"  {label:32} {e['count']:5d}  {rate:>6}  {level} CI [{e['ci'][0]:.1%}, {e['ci'][1]:.1%}]")
    t = r["test"]
    if t["win_rate"] is not None:
        lines.append(f"  win rate of B (same = 1/2): {t['win_rate']:.3f} +- {t['se']:.3f} (clustered SE), "
                     f"one-sided lower bound {t['lower_bound']:.3f} vs {t['null_win_rate']:g}")
    lines.append(f"  {t['verdict']}")
    lines.append(f"{'pair':5} {'A':>3} {'=':>3} {'B':>3}  {'PSNR':>5}  prompt")
    for p in r["per_prompt"]:
        psnr = "" if p["psnr_b_vs_a"] is None else f"{p['psnr_b_vs_a']:5.1f}"
        lines.append(f"{p['pair']:5} {p['a']:3d} {p['same']:3d} {p['b']:3d}  {psnr:>5}  {p['prompt']}")
    return "\n".join(lines)


def plot(r: dict):
    """The report figure as a PIL image: overall preference with intervals, and the votes per prompt."""
    from PIL import Image

    from safe_dit.bench.report import pyplot

    plt = pyplot()
    rows = r["per_prompt"]
    fig, (ax, bx) = plt.subplots(1, 2, figsize=(12, max(3.6, 0.22 * len(rows) + 1.6)),
                                 gridspec_kw=dict(width_ratios=[1, 1.4]))
    a, b = r["a"]["spec"], r["b"]["spec"]
    colours = {"a": "tab:blue", "same": "0.7", "b": "tab:orange"}
    labels = {"a": f"A better ({a})", "same": "the same", "b": f"B better ({b})"}
    for i, k in enumerate(("a", "same", "b")):
        e = r["preference"][k]
        rate = e["rate"] or 0.0
        ax.bar(i, rate, color=colours[k])
        ax.errorbar(i, rate, yerr=[[rate - e["ci"][0]], [e["ci"][1] - rate]], color="k", capsize=4)
        top = e["ci"][1]  # the count sits above the interval, clear of its cap
        ax.annotate(f"{e['count']}", (i, top), xytext=(0, 4), textcoords="offset points", ha="center", fontsize=8,
                    bbox=dict(fc="white", ec="none", pad=0.5))
    t = r["test"]
    if t["win_rate"] is not None:
        ax.axhline(t["win_rate"], color="tab:green", lw=1.2, label=f"win rate of B {t['win_rate']:.2f} "
                                                                     f"(lower bound {t['lower_bound']:.2f})")
        ax.axhline(t["null_win_rate"], color="tab:red", lw=1, ls="--",
                   label=f"non-inferiority bound 0.5 - {t['margin']:g}")
        ax.legend(fontsize=7, loc="upper center", bbox_to_anchor=(0.5, -0.08))
    ax.set_xticks(range(3), [labels[k] for k in ("a", "same", "b")], fontsize=7)
    ax.set_ylim(0, 1.1)
    ax.set_ylabel(f"share of votes ({r['confidence']:.0%} Wilson intervals)")
    short = ("no votes yet" if t["non_inferior"] is None else
             f"B non-inferior at margin {t['margin']:g}: {'yes' if t['non_inferior'] else 'not shown'} "
             f"(p = {t['p_value']:.3g})")
    counts = f"{_n(r['votes'], 'vote')}, {_n(r['raters'], 'rater')}, {_n(r['pairs'], 'pair')}"
    ax.set_title(f"{counts}\n{short}", fontsize=8)
    names = [f"{p['pair']} {p['prompt'] if len(p['prompt']) <= 70 else p['prompt'][:67] + '...'}" for p in rows]
    left = [0.0] * len(rows)
    for k in ("a", "same", "b"):
        vals = [p[k] for p in rows]
        bx.barh(range(len(rows)), vals, left=left, color=colours[k], label=labels[k])
        left = [x + y for x, y in zip(left, vals)]
    bx.set_yticks(range(len(rows)), names, fontsize=5.5)
    bx.xaxis.get_major_locator().set_params(integer=True)
    bx.invert_yaxis()
    bx.set_xlabel("votes")
    bx.set_title("per prompt", fontsize=9, pad=20)
    bx.legend(fontsize=7, loc="lower center", bbox_to_anchor=(0.5, 1.0), ncol=3, frameon=False)  # above the bars
    fig.suptitle(f"blinded study: A = {a} vs B = {b}  ({r['size'][0]}x{r['size'][1]}, {r['model']})", fontsize=10)
    fig.tight_layout()
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=110)
    plt.close(fig)
    buf.seek(0)
    image = Image.open(buf)
    image.load()
    return image


def configure_parser(p) -> None:
    p.add_argument("study", metavar="DIR", help="a study folder (its votes in DIR/votes.sqlite unless --db)")
    p.add_argument("--db", metavar="PATH", help="the votes database (None: DIR/votes.sqlite)")
    p.add_argument("--margin", type=float, default=0.10,
                   help="non-inferiority margin on B's win rate: B may lose by at most this much to 0.5")
    p.add_argument("--confidence", type=float, default=0.95,
                   help="level of the intervals; the test's alpha is 1 - confidence (one-sided)")
    p.add_argument("--json", metavar="PATH", help="the result JSON (None: DIR/report.json)")
    p.add_argument("--plot", metavar="PATH", help="the PNG plot (None: DIR/report.png)")
    p.set_defaults(func=run)


def run(args) -> int:
    from safe_dit.bench.files import write_together

    if not (math.isfinite(args.margin) and 0 <= args.margin < 0.5):
        raise SafeDitError(f"--margin must be in [0, 0.5), got {args.margin}")
    if not (math.isfinite(args.confidence) and 0.5 <= args.confidence < 1):
        raise SafeDitError(f"--confidence must be in [0.5, 1), got {args.confidence}")
    folder = Path(args.study)
    plot_path = Path(args.plot) if args.plot else folder / "report.png"
    json_path = Path(args.json) if args.json else folder / "report.json"
    if plot_path.suffix.lower() != ".png":
        raise SafeDitError(f"--plot must end in .png, got {plot_path.name!r}")
    for path in (plot_path, json_path):
        if path.is_dir():
            raise SafeDitError(f"{str(path)!r} is a folder: name a file")
        if path.parent.exists() and not path.parent.is_dir():
            raise SafeDitError(f"{str(path)!r}: {str(path.parent)!r} is a file, not a folder")
    study = Study(folder, verify=False)  # reporting needs the manifest, not the image bytes
    store = Votes(Path(args.db) if args.db else default_db(folder), study, read_only=True)
    try:
        votes = [v for v in store.all() if v["pair"] in study.pairs]
    finally:
        store.close()
    result = analyse(study, votes, args.margin, args.confidence)
    result["files"] = dict(json=str(json_path), plot=str(plot_path))
    plot_path.parent.mkdir(parents=True, exist_ok=True)
    write_together({plot_path: plot(result)}, result, json_path)
    print(table(result))
    sys.stdout.write(json.dumps(result, allow_nan=False) + "\n")
    return 0
