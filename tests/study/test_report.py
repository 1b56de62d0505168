"""`safe-dit study report`: rates with Wilson intervals, the clustered one-sided non-inferiority test, the
per-prompt breakdown, and its files."""

from __future__ import annotations

import json
import math

import pytest

from safe_dit.study.report import non_inferiority, wilson
from safe_dit.study.store import Study, Votes


@pytest.mark.parametrize("k, n", [(0, 5), (3, 10), (10, 10), (17, 40)])
def test_wilson_intervals_match_scipy(k, n):
    from scipy.stats import binomtest

    ci = binomtest(k, n).proportion_ci(confidence_level=0.95, method="wilson")
    assert wilson(k, n, 0.95) == pytest.approx((ci.low, ci.high), abs=1e-9)


def test_the_test_is_a_clustered_z_test_on_tie_split_scores():
    votes = [dict(pair="p1", choice="b"), dict(pair="p1", choice="same"), dict(pair="p2", choice="a"),
             dict(pair="p2", choice="a"), dict(pair="p3", choice="b"), dict(pair="p3", choice="b")]
    t = non_inferiority(votes, margin=0.1, alpha=0.05)
    scores = {"p1": [1, 0.5], "p2": [0, 0], "p3": [1, 1]}
    mean = 3.5 / 6
    var = sum(sum(s - mean for s in v) ** 2 for v in scores.values()) / 36 * 3 / 2  # CR1, 3 clusters
    z = (mean - 0.4) / math.sqrt(var)
    assert t["win_rate"] == pytest.approx(mean) and t["se"] == pytest.approx(math.sqrt(var))
    assert t["p_value"] == pytest.approx(0.5 * math.erfc(z / math.sqrt(2)))
    assert t["non_inferior"] is (t["p_value"] < 0.05) and "only 3 pairs" in t["verdict"]
    assert non_inferiority([dict(pair=f"p{i}", choice="same") for i in range(12)], 0.1, 0.05)["non_inferior"]
    assert not non_inferiority([dict(pair=f"p{i}", choice="a") for i in range(12)], 0.1, 0.05)["non_inferior"]
    assert non_inferiority([], 0.1, 0.05)["verdict"] == "no votes yet"


def test_the_report_counts_equal_the_votes(study_dir, tmp_path, cli):
    db = tmp_path / "votes.sqlite"
    study = Study(study_dir)
    store = Votes(db, study)
    ids = sorted(study.pairs)
    cast = {("r1", ids[0]): "left", ("r1", ids[1]): "right", ("r1", ids[2]): "same", ("r2", ids[0]): "left",
            ("r2", ids[3]): "right", ("r3", ids[0]): "same"}
    expected = {"a": 0, "b": 0, "same": 0}
    per_pair = {}
    for (rater, pair), key in cast.items():
        assert store.add(rater, pair, key)
        left = store.left(rater, pair)
        choice = "same" if key == "same" else left if key == "left" else {"a": "b", "b": "a"}[left]
        expected[choice] += 1
        per_pair.setdefault(pair, {"a": 0, "b": 0, "same": 0})[choice] += 1
    store.close()
    code, out, err = cli("study", "report", str(study_dir), "--db", str(db), "--json", str(tmp_path / "r.json"),
                         "--plot", str(tmp_path / "plots" / "r.png"), "--margin", "0.2")
    assert code == 0, err
    result = json.loads(out.splitlines()[-1])
    assert json.loads((tmp_path / "r.json").read_text())["preference"] == result["preference"]
    assert {k: result["preference"][k]["count"] for k in expected} == expected
    assert (result["votes"], result["raters"], result["pairs"]) == (6, 3, 6)
    for row in result["per_prompt"]:
        assert {k: row[k] for k in ("a", "b", "same")} == per_pair.get(row["pair"], {"a": 0, "b": 0, "same": 0})
    assert result["test"]["margin"] == 0.2 and result["test"]["null_win_rate"] == pytest.approx(0.3)
    assert result["a"]["spec"] == "dense-fp" and result["b"]["spec"] == "safe-core"
    png = (tmp_path / "plots" / "r.png").read_bytes()
    assert png.startswith(b"\x89PNG") and len(png) > 10_000
    assert f"{sum(expected.values())} votes by 3 raters" in out


@pytest.mark.parametrize("extra, message", [
    (["--margin", "0.5"], "--margin must be in [0, 0.5)"),
    (["--margin", "nan"], "--margin must be in [0, 0.5)"),
    (["--confidence", "1"], "--confidence must be in [0.5, 1)"),
    (["--plot", "x.jpg"], "--plot must end in .png"),
])
def test_bad_report_options_are_one_line_errors(study_dir, cli, extra, message):
    code, _, err = cli("study", "report", str(study_dir), *extra)
    assert code == 2 and message in err and err.count("\n") == 1


def test_a_study_never_served_has_no_votes_to_report(study_dir, tmp_path, cli):
    code, _, err = cli("study", "report", str(study_dir), "--db", str(tmp_path / "none.sqlite"))
    assert code == 2 and "no votes yet" in err
    code, _, err = cli("study", "report", str(tmp_path))
    assert code == 2 and "holds no study" in err
