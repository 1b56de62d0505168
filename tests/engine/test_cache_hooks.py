"""diffusers' step caches (FirstBlockCache, FasterCache, TaylorSeer, MagCache, PyramidAttentionBroadcast) on a model
patched by safe-dit: under dense-fp they compose, equal to the same cache on the stock model; under safe-core/safe-sw
they are refused with a one-line SafeDitError, whether enabled before apply_safe_dit or after it, on every adapter.

Without the refusal, a cache on a safe-core model fails inside diffusers on the row count of a selective step
(``The size of tensor a (15) must match the size of tensor b (96)``: 15 sensitive rows against the 96 a dense step
cached) or, MagCache, drops the blocks' residual with only a log warning."""

from __future__ import annotations

import pytest
import torch
from diffusers.hooks import (
    FasterCacheConfig,
    FirstBlockCacheConfig,
    HookRegistry,
    MagCacheConfig,
    PyramidAttentionBroadcastConfig,
    TaylorSeerCacheConfig,
    apply_faster_cache,
    apply_first_block_cache,
    apply_mag_cache,
    apply_pyramid_attention_broadcast,
    apply_taylorseer_cache,
)
from diffusers.hooks._helpers import TransformerBlockMetadata, TransformerBlockRegistry
from diffusers.hooks.hooks import CacheContext, _set_cache_context
from diffusers.models.transformers.lumina_nextdit2d import LuminaNextDiTBlock

from safe_dit import SafeConfig, SafeDitError, apply_safe_dit, is_safe_dit_applied, remove_safe_dit
from safe_dit.api import runtime_of
from safe_dit.engine.step_caches import step_caches
from safe_dit.testing.kits import KITS, kit_for

from helpers import RUNS

STEPS = 6
CACHES = ("first-block", "faster", "taylorseer", "mag", "pab")
# Lumina-Next names its blocks `layers` (self-attention attn1, cross-attention attn2); the caches' default
# identifiers name `transformer_blocks`/`blocks` only
LUMINA_ATTENTION = (r"^layers\.\d+\.attn1$",)


def _timestep(pipe):
    """The current timestep, from the scheduler (LuminaPipeline has no ``current_timestep``)."""
    def now():
        s = pipe.scheduler
        return float(s.timesteps[s.step_index or 0]) if getattr(s, "timesteps", None) is not None else 500.0
    return now


def cache_config(kind: str, pipe, lumina: bool = False):
    now = _timestep(pipe)
    if kind == "first-block":
        return FirstBlockCacheConfig(threshold=0.8)
    if kind == "faster":  # the first step (t = 1000) outside its ranges: it would skip there with nothing cached yet
        if lumina:  # its attention cache takes only `^blocks`/`^transformer_blocks` modules: here the CFG-branch
            # cache, which runs half the batch (its caption mask `encoder_mask` too) and forecasts the other half
            extra = dict(tensor_format="BCHW", unconditional_batch_skip_range=2,
                         unconditional_batch_timestep_skip_range=(-1, 901),
                         _unconditional_conditional_input_kwargs_identifiers=[
                             "hidden_states", "encoder_hidden_states", "timestep", "encoder_mask"])
        else:  # FLUX: guidance-distilled, the attention cache
            extra = dict(is_guidance_distilled=True)
        return FasterCacheConfig(spatial_attention_block_skip_range=2, spatial_attention_timestep_skip_range=(-1, 901),
                                 attention_weight_callback=lambda _: 0.5, current_timestep_callback=now, **extra)
    if kind == "taylorseer":
        extra = dict(cache_identifiers=list(LUMINA_ATTENTION)) if lumina else {}
        # float32 Taylor factors: bfloat16 ones (the default) round a 1e-6 difference of the inputs up to 1e-4
        return TaylorSeerCacheConfig(cache_interval=2, disable_cache_before_step=2, max_order=1,
                                     taylor_factors_dtype=torch.float32, **extra)
    if kind == "mag":
        return MagCacheConfig(threshold=0.5, max_skip_steps=2, retention_ratio=0.2, num_inference_steps=STEPS,
                              mag_ratios=torch.ones(STEPS))
    extra = dict(spatial_attention_block_identifiers=("layers",)) if lumina else {}
    return PyramidAttentionBroadcastConfig(spatial_attention_block_skip_range=2,
                                           spatial_attention_timestep_skip_range=(-1, 1001),
                                           current_timestep_callback=now, **extra)


APPLY = {"first-block": apply_first_block_cache, "faster": apply_faster_cache, "taylorseer": apply_taylorseer_cache,
         "mag": apply_mag_cache, "pab": apply_pyramid_attention_broadcast}


def enable(pipe, kind: str, lumina: bool = False) -> None:
    """The cache on ``pipe.transformer``: ``enable_cache`` where the model has it (FLUX), else diffusers' ``apply_*``
    (LuminaNextDiT2DModel is no CacheMixin), with the cache context its pipeline does not set itself."""
    config = cache_config(kind, pipe, lumina)
    if hasattr(pipe.transformer, "enable_cache"):
        pipe.transformer.enable_cache(config)
    else:
        APPLY[kind](pipe.transformer, config)
        _set_cache_context(pipe.transformer, CacheContext("cond"))
    assert step_caches(pipe.transformer), f"{kind}: no cache hook was registered"


@pytest.fixture
def lumina_blocks():
    """FirstBlockCache and MagCache need the block class in diffusers' block registry; LuminaNextDiTBlock (one
    tensor out) is not in it: registered for the test, removed after."""
    TransformerBlockRegistry.register(LuminaNextDiTBlock, TransformerBlockMetadata(return_hidden_states_index=0))
    yield
    TransformerBlockRegistry._registry.pop(LuminaNextDiTBlock, None)


def _cached_runs(name: str, kind: str, config: SafeConfig, lumina: bool):
    """(stock + cache, stock without it, safe-dit + cache enabled before apply, after apply, the attention verdicts
    of the last run)."""
    kit, run = kit_for(name), RUNS[name]
    pipe = kit.pipeline(seed=0)
    enable(pipe, kind, lumina)
    reference = run(pipe, steps=STEPS)
    plain = run(kit.pipeline(seed=0), steps=STEPS)
    outs, trace = [], []
    for before in (True, False):
        pipe = kit.pipeline(seed=0)
        if before:
            enable(pipe, kind, lumina)
        apply_safe_dit(pipe, config)
        if not before:
            enable(pipe, kind, lumina)
        runtime_of(pipe).trace = trace = []
        outs.append(run(pipe, steps=STEPS))
        assert is_safe_dit_applied(pipe)
    return reference, plain, outs, trace


@pytest.mark.parametrize("kind", CACHES)
def test_flux_dense_fp_composes_with_each_cache_exactly(kind):
    """FLUX has no mask to rewrite: dense-fp + cache is bit-identical to stock + cache, enabled before or after
    apply; the cache changed the output, and safe-dit's attention ran."""
    reference, plain, outs, trace = _cached_runs("flux", kind, SafeConfig("dense-fp"), lumina=False)
    assert not torch.equal(reference, plain)  # the cache skipped or forecast something
    for out in outs:
        assert torch.equal(out, reference)
    assert trace and {verdict for _, verdict in trace} == {"no mask"}


@pytest.mark.parametrize("kind", CACHES)
def test_lumina_next_dense_fp_composes_with_each_cache(kind, lumina_blocks):
    """Lumina-Next (padded captions, CFG batch): with its masks elided by provenance and the caption mask kept
    (rewrite_padding=False) dense-fp + cache is bit-identical to stock + cache; with the padding rewrite (the
    default) it equals it to float32 rounding, the rewrite's own difference from stock."""
    reference, plain, outs, trace = _cached_runs("lumina-next", kind, SafeConfig("dense-fp", rewrite_padding=False),
                                                 lumina=True)
    assert not torch.equal(reference, plain)
    for out in outs:
        assert torch.equal(out, reference)
    verdicts = {verdict for _, verdict in trace}
    assert any(v.startswith("elided: certified") for v in verdicts) and "kept: padding" in verdicts
    _, _, outs, trace = _cached_runs("lumina-next", kind, SafeConfig("dense-fp"), lumina=True)
    for out in outs:
        torch.testing.assert_close(out, reference, rtol=0, atol=1e-5)
    assert any("exact" in v for _, v in trace)  # the rewrite ran


def _refusal(exc: pytest.ExceptionInfo, mode: str) -> str:
    message = str(exc.value)
    assert "\n" not in message and mode in message
    assert "reuse_every" in message and "dense-fp" in message  # what works instead
    return message


@pytest.mark.parametrize("mode", ["safe-core", "safe-sw"])
@pytest.mark.parametrize("kind", CACHES)
def test_scheduled_modes_refuse_each_cache_on_flux_and_lumina_next(kind, mode, lumina_blocks):
    for name in ("flux", "lumina-next"):
        kit, lumina = kit_for(name), name == "lumina-next"
        if mode == "safe-sw" and kit.guidance_distilled:
            continue  # FLUX refuses safe-sw on its own (no CFG batch)
        pipe = kit.pipeline(seed=0)  # enabled before apply: refused before anything changes
        enable(pipe, kind, lumina)
        with pytest.raises(SafeDitError) as exc:
            apply_safe_dit(pipe, SafeConfig(mode))
        assert "on " in _refusal(exc, mode) and not is_safe_dit_applied(pipe)
        pipe = kit.pipeline(seed=0)  # enabled after apply: refused at the next forward, not inside diffusers
        apply_safe_dit(pipe, SafeConfig(mode))
        enable(pipe, kind, lumina)
        with pytest.raises(SafeDitError) as exc:
            RUNS[name](pipe, steps=STEPS)
        _refusal(exc, mode)


def _remove_caches(model) -> None:
    for module in model.modules():
        registry = module.__dict__.get("_diffusers_hook")
        for hook_name, hook in list(registry.hooks.items()) if registry is not None else ():
            if hook._is_stateful:
                registry.remove_hook(hook_name, recurse=False)
    vars(model).pop("_cache_config", None)


@pytest.mark.parametrize("name", list(KITS))
def test_every_adapter_refuses_a_cache_under_safe_core_and_recovers(name):
    """The guard is the engine's, not a backbone's: on every adapter a PyramidAttentionBroadcast cache (diffusers'
    attention classes, any block naming) is refused at apply and, added after apply, at the next forward; with the
    cache removed the same patched pipeline runs safe-core to the end."""
    kit = kit_for(name)
    pipe = kit.pipeline(seed=0)
    config = PyramidAttentionBroadcastConfig(spatial_attention_block_skip_range=2,
                                             spatial_attention_timestep_skip_range=(-1, 1001),
                                             spatial_attention_block_identifiers=(r".",),
                                             current_timestep_callback=lambda: 500)
    apply_pyramid_attention_broadcast(pipe.transformer, config)
    assert step_caches(pipe.transformer)
    with pytest.raises(SafeDitError) as exc:
        apply_safe_dit(pipe, SafeConfig("safe-core"))
    _refusal(exc, "safe-core")
    _remove_caches(pipe.transformer)
    apply_safe_dit(pipe, SafeConfig("safe-core"))
    assert step_caches(pipe.transformer) == []  # safe-dit's own step reuse hook is no cache
    apply_pyramid_attention_broadcast(pipe.transformer, config)
    with pytest.raises(SafeDitError) as exc:
        RUNS[name](pipe, steps=4)
    _refusal(exc, "safe-core")
    _remove_caches(pipe.transformer)
    out = RUNS[name](pipe, steps=4)
    assert torch.isfinite(out).all() and len(runtime_of(pipe).last_report["steps"]) == 4
    remove_safe_dit(pipe)
    assert HookRegistry.check_if_exists_or_initialize(pipe.transformer).hooks == {}


@pytest.mark.parametrize("name", list(KITS))
def test_every_adapter_composes_a_cache_with_dense_fp_exactly(name):
    """On every adapter a PyramidAttentionBroadcast cache, enabled before apply, gives under dense-fp (caption masks
    kept, so that dense-fp is the stock computation) the very output it gives on the stock model."""
    kit, run = kit_for(name), RUNS[name]

    def cached(config: SafeConfig | None):
        pipe = kit.pipeline(seed=0)
        apply_pyramid_attention_broadcast(pipe.transformer, PyramidAttentionBroadcastConfig(
            spatial_attention_block_skip_range=2, spatial_attention_timestep_skip_range=(-1, 1001),
            spatial_attention_block_identifiers=(r".",), current_timestep_callback=lambda: 500))
        if config is not None:
            apply_safe_dit(pipe, config)
        return run(pipe, steps=4)

    reference = cached(None)
    assert not torch.equal(reference, run(kit.pipeline(seed=0), steps=4))  # the cache reused attention outputs
    assert torch.equal(cached(SafeConfig("dense-fp", rewrite_padding=False)), reference)
