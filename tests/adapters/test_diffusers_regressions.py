"""The regressions diffusers' own tests found under safe-dit: IP-Adapter's processor rebuild, gradient
checkpointing, and processor swaps that silently un-patched the model."""

import pytest
import torch

from safe_dit import SafeConfig, SafeDitError, apply_safe_dit, is_safe_dit_applied, remove_safe_dit
from safe_dit.testing.kits import KITS, build_flux_pipeline

from helpers import forward, processors


def test_ip_adapter_on_flux_runs_under_dense_fp_and_is_refused_by_safe_core():
    """diffusers' FLUX IP-Adapter (un)loaders rebuild each processor with a bare ``processor.__class__()``."""
    from diffusers.models.transformers.transformer_flux import FluxAttnProcessor, FluxIPAdapterAttnProcessor

    from safe_dit.testing.kits import flux_inputs

    pipe = build_flux_pipeline()
    model = pipe.transformer
    apply_safe_dit(pipe, SafeConfig("dense-fp"))
    for proc in processors(model).values():
        assert type(type(proc)()) is FluxAttnProcessor  # a bare rebuild is the stock processor, not a TypeError
    pipe.unload_ip_adapter()  # rebuilds every processor: the model is stock again, and says so
    assert not is_safe_dit_applied(pipe)
    inputs = flux_inputs(model, 4, 4)
    with pytest.raises(SafeDitError, match="apply_safe_dit"):
        forward(model, inputs)
    remove_safe_dit(pipe)
    cfg = model.config
    ip = {n: FluxIPAdapterAttnProcessor(cfg.num_attention_heads * cfg.attention_head_dim, cfg.joint_attention_dim)
          for n in processors(model) if n.startswith("transformer_blocks")}  # as load_ip_adapter sets them
    model.set_attn_processor({f"{n}.processor": ip.get(n, FluxAttnProcessor()) for n in processors(model)})
    image = torch.randn(1, 4, cfg.joint_attention_dim, generator=torch.Generator().manual_seed(3))

    def with_image():  # the image prompt's projected tokens, as FluxTransformer2DModel hands them to the blocks
        return {**inputs, "joint_attention_kwargs": {"ip_hidden_states": [image]}}

    stock = forward(model, with_image())
    apply_safe_dit(pipe, SafeConfig("dense-fp"))  # IP-Adapter first, then safe-dit: its processors stay
    assert is_safe_dit_applied(pipe) and all(processors(model)[n] is p for n, p in ip.items())
    assert torch.equal(forward(model, with_image()), stock)
    with pytest.raises(SafeDitError, match="IP-Adapter under safe-core"):
        apply_safe_dit(pipe, SafeConfig("safe-core"))


def _grads(model, inputs) -> dict:
    model.zero_grad(set_to_none=True)
    out = model(**inputs)[0]
    out = torch.stack(out) if isinstance(out, list) else out  # Z-Image returns one tensor per sample
    out.square().mean().backward()
    return {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}


@pytest.mark.parametrize("name", list(KITS))
def test_gradient_checkpointing_gives_the_stock_gradients(name):
    kit = KITS[name]
    model = kit.build()
    if model._supports_gradient_checkpointing:  # Lumina-Next's diffusers model has none: plain backward there
        model.enable_gradient_checkpointing()
    model.train()
    inputs = kit.inputs(model, 4, 4, batch=2)
    stock = _grads(model, inputs)
    apply_safe_dit(model, SafeConfig("dense-fp"))
    patched = _grads(model, inputs)
    remove_safe_dit(model)
    assert stock and stock.keys() == patched.keys()
    for n in stock:
        assert torch.allclose(patched[n], stock[n], atol=1e-6, rtol=1e-5), n


@pytest.mark.parametrize("swap", ["set_default_attn_processor", "fuse_qkv_projections", "fuse_then_unfuse"])
@pytest.mark.parametrize("name", ["pixart", "sd3"])
def test_a_processor_swap_is_seen_refused_at_the_next_call_and_repaired_by_apply(swap, name):
    kit = KITS[name]
    model = kit.build()
    if not hasattr(model, swap) and swap != "fuse_then_unfuse":
        pytest.skip(f"{type(model).__name__} has no {swap}")
    inputs = kit.inputs(model, 4, 4, batch=2)
    apply_safe_dit(model, SafeConfig("dense-fp"))
    expected = forward(model, inputs)
    if swap == "fuse_then_unfuse":  # unfuse puts back the processors saved at fuse time
        model.fuse_qkv_projections()
        apply_safe_dit(model, SafeConfig("dense-fp"))  # a repaired patch over the fused processors
        model.unfuse_qkv_projections()  # brings back the first patch's processors: stale now
    else:
        getattr(model, swap)()
    assert not is_safe_dit_applied(model)  # the truth: safe-dit's attention is no longer there
    with pytest.raises(SafeDitError, match="apply_safe_dit"):
        forward(model, inputs)
    apply_safe_dit(model, SafeConfig("dense-fp"))  # the same config again re-patches instead of doing nothing
    assert is_safe_dit_applied(model)
    assert torch.allclose(forward(model, inputs), expected, atol=1e-5)
    remove_safe_dit(model)
    assert not is_safe_dit_applied(model)
