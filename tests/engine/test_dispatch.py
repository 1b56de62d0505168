"""safe-dit's attention goes through diffusers' dispatcher: the user's backend is honoured, GQA stays grouped."""

import pytest
import torch
import torch.nn.functional as F
from diffusers.models.attention_dispatch import AttentionBackendName, _AttentionBackendRegistry, attention_backend
from torch.overrides import TorchFunctionMode

from safe_dit import SafeConfig, SafeDitError, apply_safe_dit, remove_safe_dit
from safe_dit.testing.kits import build_flux, build_lumina_next, flux_inputs, lumina_inputs


class DispatchSpy(TorchFunctionMode):
    """Counts the backend's calls and every SDPA call, noting whether the SDPA call ran inside the backend."""

    def __init__(self, monkeypatch, backend: AttentionBackendName):
        super().__init__()
        self.backend_calls, self.sdpa_inside, self.sdpa_outside, self.kv_heads = 0, 0, 0, []
        self._depth = 0
        original = _AttentionBackendRegistry._backends[backend]

        def spy(**kwargs):
            self.backend_calls += 1
            self.kv_heads.append((kwargs["query"].shape[2], kwargs["key"].shape[2]))
            self._depth += 1
            try:
                return original(**kwargs)
            finally:
                self._depth -= 1

        monkeypatch.setitem(_AttentionBackendRegistry._backends, backend, spy)

    def __torch_function__(self, func, types, args=(), kwargs=None):
        if func is F.scaled_dot_product_attention:
            if self._depth:
                self.sdpa_inside += 1
            else:
                self.sdpa_outside += 1
        return func(*args, **(kwargs or {}))


CASES = {
    "lumina-next": (lambda: build_lumina_next(), lambda m: lumina_inputs(m, 4, 6, batch=2, valid_lens=[5, 8])),
    "flux": (lambda: build_flux(), lambda m: flux_inputs(m, 4, 6, batch=2)),
}


@pytest.mark.parametrize("name", list(CASES))
def test_every_attention_call_goes_through_the_dispatcher(name, monkeypatch):
    build, inputs = CASES[name]
    model = build()
    x = inputs(model)
    with torch.no_grad():
        stock = model(**x)[0]
    apply_safe_dit(model, SafeConfig("dense-fp"))
    with attention_backend("native"), DispatchSpy(monkeypatch, AttentionBackendName.NATIVE) as spy, torch.no_grad():
        out = model(**x)[0]
    remove_safe_dit(model)
    assert spy.backend_calls > 0 and spy.sdpa_outside == 0
    assert spy.sdpa_inside >= spy.backend_calls  # a split-batch rewrite makes one dispatcher call per group
    assert torch.allclose(out, stock, atol=1e-5, rtol=1e-5)


def test_a_backend_chosen_on_the_model_is_honoured_before_and_after_apply(monkeypatch):
    model = build_lumina_next()
    x = lumina_inputs(model, 4, 4, batch=1)
    model.set_attention_backend("_native_math")
    apply_safe_dit(model, SafeConfig("dense-fp"))  # carried over from the stock processors
    with DispatchSpy(monkeypatch, AttentionBackendName._NATIVE_MATH) as spy, torch.no_grad():
        model(**x)
    assert spy.backend_calls == 2 * len(model.layers)  # self- and cross-attention of every block
    remove_safe_dit(model)
    apply_safe_dit(model, SafeConfig("dense-fp"))
    model.set_attention_backend("native")  # and set on the patched model
    with DispatchSpy(monkeypatch, AttentionBackendName.NATIVE) as spy, torch.no_grad():
        model(**x)
    assert spy.backend_calls == 2 * len(model.layers)


def test_gqa_is_grouped_by_the_kernel_not_repeated(monkeypatch):
    model = build_lumina_next(num_kv_heads=1)  # all 4 query heads share one K/V head
    x = lumina_inputs(model, 4, 4, batch=1)
    apply_safe_dit(model, SafeConfig("dense-fp"))
    with DispatchSpy(monkeypatch, AttentionBackendName.NATIVE) as spy, torch.no_grad():
        out = model(**x)[0]
    remove_safe_dit(model)
    with torch.no_grad():
        stock = model(**x)[0]
    assert spy.kv_heads and all(kv == 1 and q == model.config.num_attention_heads for q, kv in spy.kv_heads)
    assert torch.equal(out, stock)


def test_context_parallel_processors_are_refused_not_run_per_shard():
    model = build_flux()
    for module in model.modules():
        if hasattr(module, "processor"):
            module.processor._parallel_config = object()  # what enable_parallelism leaves on each processor
    with pytest.raises(SafeDitError, match="context parallelism"):
        apply_safe_dit(model, SafeConfig("dense-fp"))
    for module in model.modules():
        if hasattr(module, "processor"):
            module.processor._parallel_config = None
    apply_safe_dit(model, SafeConfig("dense-fp"))
    for module in model.modules():  # enabled after apply: refused at the first call
        if hasattr(module, "processor"):
            module.processor._parallel_config = object()
    with pytest.raises(SafeDitError, match="context parallelism"), torch.no_grad():
        model(**flux_inputs(model, 4, 4))
