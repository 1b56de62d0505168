"""cache-dit as a peer of ``safe-dit pareto``: it attaches to the tiny Lumina-Next pipeline on dense-fp,
really skips work, is repeatable, undoes exactly; without the ``peers`` extra the family is skipped with
one line saying so and the run still completes."""

from __future__ import annotations

import importlib.metadata
import json

import pytest
import torch

from safe_dit import SafeConfig, apply_safe_dit, remove_safe_dit
from safe_dit.bench import cache_dit_peer
from safe_dit.bench.pareto import default_settings
from safe_dit.bench.peers import PeerSetting, PeerUnsupported, apply_peer, peer_family
from safe_dit.cli import main
from safe_dit.testing.kits import build_lumina_pipeline

STEPS = 12  # cache-dit computes every step of its first 8 (max_warmup_steps), so a run needs more


def _run(pipe, seed=0):
    g = torch.Generator().manual_seed(7)
    embeds = [torch.randn(1, 8, 32, generator=g) for _ in range(2)]
    return pipe(prompt_embeds=embeds[0], prompt_attention_mask=torch.tensor([[1] * 6 + [0] * 2]),
                negative_prompt_embeds=embeds[1], negative_prompt_attention_mask=torch.tensor([[1] * 2 + [0] * 6]),
                height=32, width=32, num_inference_steps=STEPS, guidance_scale=4.0, output_type="latent",
                generator=torch.Generator().manual_seed(seed)).images


def _installed() -> bool:
    return cache_dit_peer.missing_reason() is None


@pytest.mark.skipif(not _installed(), reason="the peers extra (cache-dit 1.5.3) is not installed: "
                                              "pip install 'safe-dit[peers]'")
@pytest.mark.parametrize("params", [
    {"Fn": 1, "Bn": 0, "rdt": 10.0},
    {"Fn": 1, "Bn": 0, "rdt": 10.0, "calibrator": "taylorseer", "order": 2},
    {"Fn": 1, "Bn": 0, "rdt": 10.0, "calibrator": "foca"},
], ids=cache_dit_peer.label)
def test_cache_dit_skips_work_is_repeatable_and_undoes_exactly(params):
    pipe = build_lumina_pipeline()
    pipe.set_progress_bar_config(disable=True)
    apply_safe_dit(pipe, SafeConfig("dense-fp"))
    try:
        ref = _run(pipe)
        undo = apply_peer(pipe, PeerSetting("cache-dit", params), STEPS)
        try:
            a = _run(pipe)
            skipped = cache_dit_peer.cached_steps(pipe)
            b = _run(pipe)
        finally:
            undo()
        assert skipped, "a threshold of 10 must let cache-dit skip steps after its warm-up"
        assert min(skipped) >= 8 and max(skipped) < STEPS
        assert torch.equal(a, b) and torch.isfinite(a).all()  # its state is reset between pipeline calls
        assert not torch.allclose(a, ref, atol=1e-6)  # it really reused work
        assert torch.equal(_run(pipe), ref)  # disable_cache restored the model exactly
    finally:
        remove_safe_dit(pipe)


def test_cache_dit_settings_are_in_the_sweep():
    rows = [s for s in default_settings() if s.peer is not None and s.peer.method == "cache-dit"]
    calibrators = {s.peer.params.get("calibrator") for s in rows}
    assert len(rows) >= 4 and calibrators == {None, "taylorseer", "foca"}
    assert {s.peer.params.get("order") for s in rows if s.peer.params.get("calibrator") == "taylorseer"} == {1, 2}
    assert peer_family("cache-dit").adaptive  # decides from activations: replayed at scale


@pytest.fixture
def without_cache_dit(monkeypatch):
    real = importlib.metadata.version

    def version(name):
        if name == "cache-dit":
            raise importlib.metadata.PackageNotFoundError(name)
        return real(name)

    monkeypatch.setattr(importlib.metadata, "version", version)


def test_missing_extra_is_refused_by_apply_with_the_install_hint(without_cache_dit):
    pipe = build_lumina_pipeline()
    with pytest.raises(PeerUnsupported, match=r"safe-dit\[peers\]"):
        apply_peer(pipe, PeerSetting("cache-dit", {"Fn": 1, "Bn": 0, "rdt": 0.1}), STEPS)


def test_pareto_without_the_extra_runs_and_says_cache_dit_was_skipped(without_cache_dit, micro_model, tmp_path,
                                                                      capsys):
    js = tmp_path / "p.json"
    assert main(["pareto", "--quick", "--model", str(micro_model(2)), "--no-progress", "--no-memory", "--threads",
                 "1", "--families", "safe-dit", "peer", "--peers", "cache-dit", "sea-cache", "--scaled-tokens", "0",
                 "--json", str(js)]) == 0
    err = capsys.readouterr().err
    lines = [ln for ln in err.splitlines() if "cache-dit skipped" in ln]
    assert len(lines) == 1 and "pip install 'safe-dit[peers]'" in lines[0]
    result = json.loads(js.read_text())
    assert "cache-dit" in result["settings_common"]["peers_skipped"]
    assert {s["peer"] for s in result["settings"] if s["family"] == "peer"} == {"sea-cache"}
