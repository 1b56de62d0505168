"""The regressions diffusers' own tests found under safe-dit: IP-Adapter's processor rebuild, gradient
checkpointing, and processor swaps that silently un-patched the model."""

import pytest
import torch

from safe_dit import SafeConfig, SafeDitError, apply_safe_dit, is_safe_dit_applied, remove_safe_dit
from safe_dit.testing.kits import KITS, build_flux_pipeline, build_pixart

from helpers import forward, processors


def test_ip_adapter_rebuild_of_a_patched_flux_is_refused_clearly():
    """diffusers' FLUX IP-Adapter (un)loader rebuilds each processor with a bare ``processor.__class__()``."""
    pipe = build_flux_pipeline()
    apply_safe_dit(pipe, SafeConfig("dense-fp"))
    with pytest.raises(SafeDitError, match="remove_safe_dit"):
        pipe.unload_ip_adapter()
    for proc in processors(pipe.transformer).values():
        with pytest.raises(SafeDitError, match="IP-Adapter"):
            type(proc)()
    remove_safe_dit(pipe)
    pipe.unload_ip_adapter()  # the stock model takes it


def _grads(model, inputs) -> dict:
    model.zero_grad(set_to_none=True)
    out = model(**inputs)[0]
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


@pytest.mark.parametrize("swap", ["set_default_attn_processor", "fuse_qkv_projections"])
def test_a_processor_swap_is_seen_refused_at_the_next_call_and_repaired_by_apply(swap):
    model = build_pixart()
    from safe_dit.testing.kits import pixart_inputs

    inputs = pixart_inputs(model, 4, 4, batch=2, valid_lens=[3, 8])
    apply_safe_dit(model, SafeConfig("dense-fp"))
    expected = forward(model, inputs)
    getattr(model, swap)()
    assert not is_safe_dit_applied(model)  # the truth: safe-dit's attention is no longer there
    with pytest.raises(SafeDitError, match="apply_safe_dit"):
        forward(model, inputs)
    apply_safe_dit(model, SafeConfig("dense-fp"))  # the same config again re-patches instead of doing nothing
    assert is_safe_dit_applied(model)
    assert torch.allclose(forward(model, inputs), expected, atol=1e-5)
    remove_safe_dit(model)
    assert not is_safe_dit_applied(model)
