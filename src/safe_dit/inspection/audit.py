"""Audit every SDPA call of one model forward, stock and with safe-dit, side by side (``safe-dit audit``).

For each call to torch.nn.functional.scaled_dot_product_attention: the attention module that
made it, the q/k/v shapes, the mask that reached SDPA (kind, shape, whether it is a broadcast
view), what safe-dit decided and why (elided by provenance, kept as semantic, rewritten
exactly), and the SDPA kernel that ran (from the PyTorch profiler). The report closes with the
adapter's note on where the backbone's masks come from.
"""

from __future__ import annotations

from contextlib import ExitStack

import torch
import torch.nn.functional as F
from torch.overrides import TorchFunctionMode
from torch.profiler import record_function

from safe_dit.api import apply_safe_dit, remove_safe_dit, runtime_of
from safe_dit.config import SafeConfig
from safe_dit.inspection.environment import quiet_profiler

_TAG = "safe_dit.sdpa#"
KERNEL_PREFIXES = ("aten::_scaled_dot_product", "aten::_flash_attention", "aten::_efficient_attention", "aten::_cudnn")


def describe_mask(mask) -> dict:
    if mask is None:
        return {"kind": "none", "shape": None, "broadcast_view": False}
    kind = "bool" if mask.dtype == torch.bool else f"additive {str(mask.dtype).replace('torch.', '')}"
    return {"kind": kind, "shape": list(mask.shape), "broadcast_view": 0 in mask.stride()}


class _SdpaRecorder(TorchFunctionMode):
    """Records each SDPA call with the attention module that issued it, and tags it for the profiler."""

    def __init__(self, model: torch.nn.Module, runtime=None):
        super().__init__()
        self.calls: list[dict] = []
        self._runtime = runtime
        self._stack: list[tuple[str, int]] = []
        self._hooks = []
        for name, module in model.named_modules():
            if hasattr(module, "processor"):  # diffusers Attention
                self._hooks.append(module.register_forward_pre_hook(self._enter(name)))
                self._hooks.append(module.register_forward_hook(self._leave, always_call=True))

    def _enter(self, name):
        def hook(_module, _args):
            self._stack.append((name, len(self.calls)))

        return hook

    def _leave(self, *_):
        """Label the SDPA calls this module invocation made with the decision safe-dit logged."""
        name, first = self._stack.pop()
        trace = self._runtime.trace if self._runtime is not None else None
        for call in self.calls[first:]:
            if trace is None:
                call["verdict"] = "stock: mask passed through" if call["mask"]["kind"] != "none" else "stock: no mask"
            elif trace and trace[-1][0] == name:
                call["verdict"] = trace[-1][1]
            else:
                call["verdict"] = "not seen by safe-dit"

    def remove(self):
        for h in self._hooks:
            h.remove()

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if func is not F.scaled_dot_product_attention:
            return func(*args, **kwargs)
        named = dict(zip(("query", "key", "value", "attn_mask"), args)) | kwargs  # diffusers' backends pass keywords
        q, k, v = named["query"], named["key"], named["value"]
        mask = named.get("attn_mask")
        idx = len(self.calls)
        self.calls.append(
            {
                "module": self._stack[-1][0] if self._stack else "<outside attention module>",
                "verdict": "outside an attention module",
                "q": list(q.shape),
                "k": list(k.shape),
                "v": list(v.shape),
                "mask": describe_mask(mask),
            }
        )
        with record_function(f"{_TAG}{idx}"):
            return func(*args, **kwargs)


def _kernels(prof) -> dict[int, tuple[list[str], list[str]]]:
    """Map call index -> (SDPA kernel ops that ran, other ops SDPA ran first, e.g. mask conversion)."""
    found: dict[int, tuple[list[str], list[str]]] = {}
    for ev in prof.events():
        if not ev.name.startswith(_TAG):
            continue
        kernels: list[str] = []
        prep: list[str] = []
        for top in ev.cpu_children:  # aten::scaled_dot_product_attention
            for child in top.cpu_children:
                if child.name.startswith(KERNEL_PREFIXES):
                    kernels.append(child.name)
                elif child.name not in ("aten::scalar_tensor",):
                    prep.append(child.name)
        found[int(ev.name[len(_TAG):])] = (kernels or ["math (decomposed)"], prep)
    return found


def trace_forward(model: torch.nn.Module, inputs: dict) -> list[dict]:
    """One forward under the recorder and the profiler; returns one dict per SDPA call."""
    runtime = runtime_of(model)
    if runtime is not None:
        runtime.trace = []
    recorder = _SdpaRecorder(model, runtime)
    try:
        with ExitStack() as stack:
            prof = stack.enter_context(quiet_profiler())
            stack.enter_context(torch.no_grad())
            stack.enter_context(recorder)
            model(**inputs)
    finally:
        recorder.remove()
        if runtime is not None:
            runtime.trace = None
    kernels = _kernels(prof)
    for i, call in enumerate(recorder.calls):
        call["kernels"], call["mask_ops"] = kernels.get(i, ([], []))
    return recorder.calls


def audit(model: torch.nn.Module, inputs: dict, config: SafeConfig | None = None) -> dict:
    """Trace the stock model, then the model with safe-dit applied (then removed again)."""
    config = config or SafeConfig("dense-fp")
    was = runtime_of(model)
    if was is not None:
        raise ValueError("audit expects a model without safe-dit applied (it applies and removes it itself)")
    stock = trace_forward(model, inputs)
    apply_safe_dit(model, config)
    try:
        safe = trace_forward(model, inputs)
    finally:
        remove_safe_dit(model)
    from safe_dit.adapters import adapter_for

    return {"model": type(model).__name__, "mode": config.mode, "notes": adapter_for(model).notes, "stock": stock,
            "safe": safe, "summary": summarize(stock, safe)}


def summarize(stock: list[dict], safe: list[dict]) -> dict:
    def masked(calls):
        return sum(c["mask"]["kind"] != "none" for c in calls)

    def kernels(calls):
        out: dict[str, int] = {}
        for c in calls:
            for k in c["kernels"]:
                out[k] = out.get(k, 0) + 1
        return out

    return {
        "stock_calls": len(stock),
        "stock_masked_calls": masked(stock),
        "safe_calls": len(safe),
        "safe_masked_calls": masked(safe),
        "stock_kernels": kernels(stock),
        "safe_kernels": kernels(safe),
    }


def format_table(report: dict) -> str:
    def mask_str(m):
        if m["kind"] == "none":
            return "-"
        return f"{m['kind']}{m['shape']}" + (" view" if m["broadcast_view"] else "")

    def short(call):
        names = ",".join(k.replace("aten::_scaled_dot_product_", "") for k in call["kernels"])
        prep = "".join(f" +{p.replace('aten::', '')}" for p in call["mask_ops"])
        return names + prep

    lines = []
    mw = max([18] + [len(c["module"]) for label in ("stock", "safe") for c in report[label]])  # module column
    for label in ("stock", "safe"):
        title = "stock (dense)" if label == "stock" else f"safe-dit ({report['mode']})"
        lines.append(f"== {title}: {report['model']} ==")
        lines.append(f"{'#':>3} {'module':<{mw}} {'q':<18} {'k':<18} {'mask to SDPA':<28} "
                     f"{'kernel (+mask ops)':<34} verdict")
        for i, c in enumerate(report[label]):
            lines.append(
                f"{i:>3} {c['module']:<{mw}} {str(c['q']):<18} {str(c['k']):<18} "
                f"{mask_str(c['mask']):<28} {short(c):<34} {c['verdict']}"
            )
        lines.append("")
    if report.get("notes"):
        lines.append(f"where the masks come from: {report['notes']}")
    s = report["summary"]
    lines.append(
        f"masked SDPA calls: stock {s['stock_masked_calls']}/{s['stock_calls']}  ->  "
        f"safe-dit {s['safe_masked_calls']}/{s['safe_calls']}"
    )
    return "\n".join(lines)
