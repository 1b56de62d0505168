"""The CLI as a user meets it: --help, audit, bench forward, bench e2e (CI-sized)."""

import json

import pytest

from safe_dit.cli import main


def _last_json(capsys):
    out = capsys.readouterr().out.strip().splitlines()
    return json.loads(out[-1]), "\n".join(out[:-1])


@pytest.mark.parametrize("argv", [[], ["audit"], ["midt"], ["bench"], ["bench", "forward"], ["bench", "e2e"]])
def test_help_teaches(argv, capsys):
    with pytest.raises(SystemExit) as exit_:
        main(argv + ["--help"])
    assert exit_.value.code == 0
    text = capsys.readouterr().out
    assert "usage: safe-dit" in text and len(text) > 200


def test_audit_cli(tmp_path, capsys):
    path = tmp_path / "audit.json"
    assert main(["audit", "--height-tokens", "3", "--width-tokens", "5", "--json", str(path)]) == 0
    summary, table = _last_json(capsys)
    assert summary["stock_masked_calls"] == summary["stock_calls"] == 4
    assert summary["safe_masked_calls"] == 0
    assert "elided: certified" in table and "rewritten: split-batch" in table
    report = json.loads(path.read_text())
    assert len(report["stock"]) == 4 and len(report["safe"]) == 6


def test_audit_rejects_bad_lengths(capsys):
    assert main(["audit", "--batch", "2", "--valid-lens", "3"]) == 2
    assert "--valid-lens needs 2 values" in capsys.readouterr().err


def test_bench_forward_quick(tmp_path, capsys):
    png = tmp_path / "fwd.png"
    assert main(["bench", "forward", "--quick", "--no-progress", "--json", str(tmp_path / "f.json"),
                 "--plot", str(png)]) == 0
    result, table = _last_json(capsys)
    assert {r["mode"] for r in result["rows"]} == {"dense", "dense-fp", "maskless-oracle"}
    assert all(r["status"] == "ok" and r["seconds"] > 0 for r in result["rows"])
    fp = [r for r in result["rows"] if r["mode"] == "dense-fp"]
    assert all(r["max_abs_err_vs_dense"] < 1e-4 for r in fp)
    assert result["environment"]["torch"] and png.stat().st_size > 1000
    assert "dense/dense-fp" in table


def test_bench_e2e_quick(tmp_path, capsys):
    png = tmp_path / "e2e.png"
    assert main(["bench", "e2e", "--quick", "--no-progress", "--json", str(tmp_path / "e.json"),
                 "--plot", str(png)]) == 0
    result, _ = _last_json(capsys)
    rows = result["rows"]
    assert {(r["tokens"], r["mode"]) for r in rows} == {(t, m) for t in (64, 256)
                                                        for m in ("dense", "dense-fp", "safe-core", "safe-sw")}
    for r in rows:
        assert r["status"] == "ok" and r["seconds"] > 0 and r["peak_memory_mb"] > 0
        assert set(r) >= {"tokens", "mode", "seconds", "peak_memory_mb", "status"}
    core = [r for r in rows if r["mode"] == "safe-core"]
    assert all(r["token_fraction"] < 1 and "selective" in r["steps"] for r in core)
    assert json.loads((tmp_path / "e.json").read_text())["rows"] == rows
    assert png.stat().st_size > 1000


def test_bench_e2e_modes_subset_keeps_what_the_ratios_need(capsys):
    assert main(["bench", "e2e", "--quick", "--no-progress", "--modes", "dense"]) == 0
    result, _ = _last_json(capsys)
    assert {r["mode"] for r in result["rows"]} == {"dense", "dense-fp", "safe-core"}  # no safe-sw run
    assert result["summary"][0]["total_gain"] > 0


def test_bench_rejects_bad_arguments(capsys):
    assert main(["bench", "e2e", "--steps", "0"]) == 2
    assert "must be >= 1" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        main(["bench", "forward", "--dtype", "int8"])
