"""safe-dit midt: CI-sized runs, refusal of broken cases, clear argument errors."""

import json

import pytest
import torch

from safe_dit.bench import midt
from safe_dit.cli import main
from safe_dit.config import SafeDitError


def test_midt_small_sweep_writes_table_json_and_plot(tmp_path, capsys):
    js, png = tmp_path / "m.json", tmp_path / "m.png"
    argv = ["midt", "--seq-lens", "64", "128", "--head-dims", "72", "--dtypes", "float32", "bfloat16",
            "--repeats", "2", "--no-progress", "--json", str(js), "--plot", str(png)]
    assert main(argv) == 0
    lines = capsys.readouterr().out.strip().splitlines()
    result = json.loads(lines[-1])
    assert json.loads(js.read_text())["cases"] == result["cases"]
    assert png.stat().st_size > 1000
    assert len(result["cases"]) == 2 * 2 * len(midt.MASKS)
    for c in result["cases"]:
        assert {"seq_len", "head_dim", "dtype", "mask", "maskless_ms", "masked_ms", "tax"} <= set(c)
        assert c["maskless_ms"] > 0 and c["masked_ms"] > 0
        assert c["tax"] == pytest.approx(c["masked_ms"] / c["maskless_ms"])
        assert c["masked_kernels"] and c["maskless_kernels"]
        assert c["redundant"] == (c["mask"] != "key-padding")
    full = [c for c in result["cases"] if c["mask"] == "bool-full" and c["seq_len"] == 128]
    assert full[0]["mask_storage_mb"] == pytest.approx(2 * 128 * 128 / 2**20)
    assert "redundant-mask tax" in "\n".join(lines[:-1])


def test_masks_are_what_they_claim():
    for kind in midt.MASKS:
        m = midt.build_mask(kind, 1, 2, 16, torch.float32, "cpu")
        assert m.shape == (1, 2, 16, 16)
    rc = midt.build_mask("additive-rowconst", 1, 1, 16, torch.float32, "cpu")
    assert torch.all(rc == rc[..., :1]) and rc[..., 0].unique().numel() > 1
    kp = midt.build_mask("key-padding", 1, 1, 16, torch.float32, "cpu")
    assert kp[0, 0, 0].sum() == 12 and torch.all(kp == kp[..., :1, :])


def test_a_mask_that_changes_the_output_is_refused(monkeypatch):
    real = midt.build_mask

    def broken(kind, batch, heads, n, dtype, device):
        m = real(kind, batch, heads, n, dtype, device).clone()
        m[..., 0, : n // 2] = False if m.dtype == torch.bool else -1e4  # no longer row-constant
        return m

    monkeypatch.setattr(midt, "build_mask", broken)
    with pytest.raises(SafeDitError, match="correctness check failed"):
        midt.run_case("cpu", "float32", 64, 32, 2, 1, "bool-full", 0, 1)


@pytest.mark.parametrize("argv,match", [
    (["--dtypes", "float16"], "float16 is only measured on CUDA"),
    (["--seq-lens", "0"], "must be >= 1"),
])
def test_bad_arguments(argv, match, capsys):
    assert main(["midt", "--no-progress"] + argv) == 2
    assert match in capsys.readouterr().err


def test_midt_flags_noisy_timings():
    from safe_dit.bench.midt import format_table

    row = dict(device="cpu", dtype="float32", head_dim=64, seq_len=256, mask="bool-all-true", maskless_ms=1.0,
               masked_ms=2.0, tax=2.0, maskless_peak_mb=1.0, masked_peak_mb=1.0, masked_kernels=[])
    summary = {"cpu": dict(redundant_tax_min=2.0, redundant_tax_max=2.0, redundant_tax_median=2.0, longest_seq_len=256,
                           redundant_tax_median_at_longest=2.0)}
    quiet = format_table({"cases": [dict(row, repeat_spread=0.1)], "summary": summary})
    noisy = format_table({"cases": [dict(row, repeat_spread=3.0)], "summary": summary})
    assert "warning" not in quiet and "1 of 1 cases" in noisy and "quiet machine" in noisy


def test_an_unknown_mask_is_refused_by_the_parser(capsys):
    with pytest.raises(SystemExit) as exit_:
        main(["midt", "--masks", "causal"])
    assert exit_.value.code == 2 and "invalid choice: 'causal'" in capsys.readouterr().err
