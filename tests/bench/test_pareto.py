"""safe-dit pareto: peers attach and detach cleanly, unsupported ones say why, the front and
verdicts are right on constructed points, and the CLI contract (on a micro model, --quick)."""

from __future__ import annotations

import json

import pytest
import torch

from safe_dit import SafeConfig, apply_safe_dit, remove_safe_dit
from safe_dit.bench.pareto import Setting, default_settings, pareto_front, verdicts
from safe_dit.bench.peers import PeerSetting, PeerUnsupported, apply_peer, calibrate_mag_ratios
from safe_dit.cli import main
from safe_dit.testing.kits import build_lumina_pipeline

STEPS = 6


def _run(pipe, seed=0):
    g = torch.Generator().manual_seed(7)
    embeds = [torch.randn(1, 8, 32, generator=g) for _ in range(2)]
    return pipe(prompt_embeds=embeds[0], prompt_attention_mask=torch.tensor([[1] * 6 + [0] * 2]),
                negative_prompt_embeds=embeds[1], negative_prompt_attention_mask=torch.tensor([[1] * 2 + [0] * 6]),
                height=64, width=64, num_inference_steps=STEPS, guidance_scale=4.0, output_type="latent",
                generator=torch.Generator().manual_seed(seed)).images


@pytest.fixture(scope="module")
def pipe():
    p = build_lumina_pipeline()
    p.set_progress_bar_config(disable=True)
    apply_safe_dit(p, SafeConfig("dense-fp"))
    yield p
    remove_safe_dit(p)


def _hooks(model):
    return sorted((n, h) for n, m in model.named_modules() if hasattr(m, "_diffusers_hook")
                  for h in m._diffusers_hook.hooks)


@pytest.mark.parametrize("setting", [
    PeerSetting("first-block-cache", {"threshold": 0.5}), PeerSetting("taylorseer", {"cache_interval": 2}),
    PeerSetting("faster-cache", {"block_skip": 2}), PeerSetting("pab", {"block_skip": 2}),
    PeerSetting("sea-cache", {"threshold": 0.5}),
], ids=lambda s: s.method)
def test_peer_changes_the_output_is_repeatable_and_removes_cleanly(pipe, setting):
    ref = _run(pipe)
    before = _hooks(pipe.transformer)
    undo = apply_peer(pipe, setting, STEPS)
    try:
        assert len(_hooks(pipe.transformer)) > len(before)
        a, b = _run(pipe), _run(pipe)  # state is reset between pipeline calls
        assert torch.equal(a, b) and torch.isfinite(a).all()
        assert not torch.allclose(a, ref, atol=1e-6)  # the method really skipped work
    finally:
        undo()
    assert [h for h in _hooks(pipe.transformer) if h not in before] == []
    assert torch.equal(_run(pipe), ref)


def test_mag_cache_calibrates_then_skips(pipe):
    ratios = calibrate_mag_ratios(pipe, STEPS, lambda: _run(pipe, seed=1))
    assert len(ratios) == STEPS and ratios[0] == 1.0
    ref = _run(pipe)
    undo = apply_peer(pipe, PeerSetting("mag-cache", {"threshold": 10.0}), STEPS, mag_ratios=ratios)
    try:
        out = _run(pipe)
    finally:
        undo()
    assert not torch.allclose(out, ref, atol=1e-6)


def test_unsupported_peers_say_why_and_leave_nothing_behind(pipe):
    before = _hooks(pipe.transformer)
    with pytest.raises(PeerUnsupported, match="NucleusMoEImageTransformerBlock"):
        apply_peer(pipe, PeerSetting("text-kv-cache", {}), STEPS)
    with pytest.raises(PeerUnsupported, match="unknown peer"):
        apply_peer(pipe, PeerSetting("warp-drive", {}), STEPS)
    assert _hooks(pipe.transformer) == before


def test_pareto_front_and_verdicts():
    pts = {"a": (1.0, 40.0), "b": (2.0, 30.0), "c": (1.5, 25.0), "d": (3.0, 30.0)}
    assert pareto_front(pts) == ["a", "d"]
    fp = SafeConfig("dense-fp")
    settings = [Setting("core", "safe-dit", SafeConfig("safe-core")),
                Setting("p-slow", "peer", fp, peer=PeerSetting("pab", {})),
                Setting("p-fast", "peer", fp, peer=PeerSetting("pab", {})),
                Setting("p-best", "peer", fp, peer=PeerSetting("pab", {}))]
    quality = {"core": {"q": 30.0}, "p-slow": {"q": 28.0}, "p-fast": {"q": 29.0}, "p-best": {"q": 35.0}}
    speed = {"core": 2.0, "p-slow": 1.5, "p-fast": 2.5, "p-best": 2.2}
    v = {e["setting"]: e["verdict"] for e in verdicts(settings, quality, speed, "q")}
    assert v["p-slow"].startswith("safe-core faster")
    assert v["p-fast"].startswith("peer wins: faster")
    assert v["p-best"].startswith("peer wins: better quality")


def test_default_settings_cover_the_issue():
    s = default_settings()
    names = [x.name for x in s]
    assert len(set(names)) == len(names)
    assert {"dense", "dense-fp", "safe-core", "safe-sw", "no-fast-path", "no-srsu", "no-car", "uniform-partition",
            "random-partition", "safe-sw flat-map"} <= set(names)
    assert {x.peer.method for x in s if x.peer} == {"first-block-cache", "taylorseer", "faster-cache", "mag-cache",
                                                   "pab", "sea-cache", "text-kv-cache", "cache-dit"}
    assert sum(x.family == "steps" for x in s) == 3 and sum(x.is_safe_core for x in s) >= 5
    # same steps, guidance and dtype for everyone but step reduction
    assert all(x.steps(30) == 30 for x in s if x.family != "steps" and not x.name.endswith(" steps"))
    assert {"safe-core published", "no-context-forecast", "periodic-anchors"} <= set(names)
    assert {tuple(sorted(x.peer.params.items())) for x in s if x.peer and x.peer.method == "taylorseer"} >= {
        (("cache_interval", 2),), (("cache_interval", 5),), (("cache_interval", 3), ("max_order", 2))}


@pytest.fixture(scope="module")
def micro_dir(micro_model):
    return micro_model(2)


def test_pareto_cli_contract(micro_dir, tmp_path, capsys):
    js, png, abl = tmp_path / "p.json", tmp_path / "p.png", tmp_path / "a.png"
    code = main(["pareto", "--quick", "--model", str(micro_dir), "--no-progress", "--no-memory", "--threads", "1",
                 "--json", str(js), "--plot", str(png), "--ablation-plot", str(abl)])
    assert code == 0
    out = capsys.readouterr().out.strip().splitlines()
    result = json.loads(out[-1])
    assert json.loads(js.read_text()) == result and png.stat().st_size > 0 and abl.stat().st_size > 0
    q = result["quality"]
    assert "text-kv-cache" in q["unsupported"] and "NucleusMoE" in q["unsupported"]["text-kv-cache"]
    names = {s["name"] for s in result["settings"]}
    assert set(q["summary"]) | set(q["unsupported"]) == names  # nothing silently dropped
    assert q["summary"]["dense-fp"]["psnr_vs_dense_fp"] == 100.0
    assert q["summary"]["no-srsu"]["psnr_vs_dense_fp"] > 60  # every step dense: dense-fp's image
    assert q["summary"]["steps x0.50"]["token_fraction"] == 1.0
    rows = result["scaled"]["rows"]
    assert rows["dense"]["status"] == "ok" and rows["safe-core"]["token_fraction"] < 1
    assert all(k in result["analysis"] for k in ("embedded / psnr_vs_dense_fp", "64 tokens / accuracy",
                                                 "embedded / psnr_min"))
    core = q["summary"]["safe-core"]  # the per-prompt tails, in order
    assert core["psnr_min"] <= core["psnr_p10"] <= core["psnr_median"] <= 100.0
    assert " med " in out[0] and " p10 " in out[0] and " min " in out[0]  # the table's header shows them
    assert {"torch", "diffusers"} <= set(result["environment"])
    # the table and plots can be redrawn from the JSON alone
    png2 = tmp_path / "p2.png"
    assert main(["pareto", "--from-json", str(js), "--plot", str(png2)]) == 0
    assert png2.stat().st_size > 0 and json.loads(capsys.readouterr().out.strip().splitlines()[-1]) == result
    # after retraining, the random-weight timings can be reused: only the quality part runs again
    js3 = tmp_path / "p3.json"
    assert main(["pareto", "--quick", "--model", str(micro_dir), "--no-progress", "--no-memory", "--threads", "1",
                 "--scaled-from", str(js), "--json", str(js3)]) == 0
    again = json.loads(js3.read_text())
    assert again["scaled"]["rows"] == rows and again["scaled"]["reused_from"]["path"] == str(js)
    assert again["quality"]["summary"]["dense-fp"]["psnr_vs_dense_fp"] == 100.0
    other = dict(result, settings_common=dict(result["settings_common"], steps=7))
    (tmp_path / "other.json").write_text(json.dumps(other))
    assert main(["pareto", "--quick", "--model", str(micro_dir), "--no-progress", "--no-memory",
                 "--scaled-from", str(tmp_path / "other.json")]) == 2  # timed with other steps: refused
    assert "run the scaled part again" in capsys.readouterr().err


def test_threads_option_does_not_leak_into_the_process(monkeypatch):
    import torch

    from safe_dit.bench import pareto

    before = torch.get_num_threads()
    monkeypatch.setattr(pareto, "_run", lambda args: torch.get_num_threads())
    assert main(["pareto", "--quick", "--threads", "1", "--no-progress"]) == 1  # ran with 1 thread
    assert torch.get_num_threads() == before


def test_pareto_peers_filter_and_scaled_repeats(micro_dir, tmp_path, capsys):
    js = tmp_path / "p.json"
    assert main(["pareto", "--quick", "--model", str(micro_dir), "--no-progress", "--no-memory", "--threads", "1",
                 "--families", "safe-dit", "peer", "--peers", "sea-cache", "--scaled-repeats", "2",
                 "--json", str(js)]) == 0
    out = capsys.readouterr().out
    result = json.loads(js.read_text())
    peers = {s["peer"] for s in result["settings"] if s["family"] == "peer"}
    assert peers == {"sea-cache"}  # only the named hook, at every one of its settings
    assert len([s for s in result["settings"] if s["family"] == "peer"]) == len(
        [p for p in default_settings() if p.peer is not None and p.peer.method == "sea-cache"])
    scaled = result["scaled"]
    assert scaled["repeats"] == 2 and "median of 2 timed calls each" in out
    for row in scaled["rows"].values():
        if row["status"] == "ok":
            assert len(row["timings"]) == 2 and row["seconds"] == pytest.approx(sum(row["timings"]) / 2)
    assert main(["pareto", "--quick", "--scaled-repeats", "0", "--no-progress"]) == 2
    assert "--scaled-repeats must be >= 1" in capsys.readouterr().err
    with pytest.raises(SystemExit):  # an unknown hook name is refused by the parser, before anything runs
        main(["pareto", "--quick", "--peers", "no-such-cache"])
