"""pytest plugin (``-p safe_dit_conformance``, with ``scripts`` on PYTHONPATH): runs diffusers' own tests with
safe-dit applied to every Lumina-Next / PixArt / SD3 / FLUX transformer they build.

The mode is ``$SAFE_DIT_CONFORMANCE_MODE`` (default ``dense-fp``), with the other ``SafeConfig`` fields in
``$SAFE_DIT_CONFORMANCE_CONFIG`` (JSON, e.g. ``{"warmup_steps": 1}``; default none):

* ``dense-fp``: ``__init__`` of the four transformer classes is wrapped: each constructed model (directly,
  ``from_config`` or ``from_pretrained``) gets ``apply_safe_dit(model, SafeConfig("dense-fp"))`` at the end of its
  outermost ``__init__``.
* ``safe-core`` / ``safe-sw`` (they follow a pipeline's scheduler, so they are applied to pipelines):
  ``__call__`` of the pipelines in ``PIPELINES`` is wrapped: each call first runs ``apply_safe_dit(pipe,
  SafeConfig(mode))`` when the pipeline's transformer is one of the four (a no-op when it is applied to this
  pipeline and intact). Models used outside a pipeline stay stock.
* Kept applied: a test that swaps processors (``set_attn_processor``, ``set_default_attn_processor``,
  ``fuse_qkv_projections``, IP-Adapter loading) sees its own processors until the model is next called; then,
  as a user would after safe-dit's refusal of a swapped patch, ``apply_safe_dit`` is called again (it repairs
  the patch; what it cannot run it refuses with SafeDitError, and that test then fails: a real finding).
* Counted per test: patched models built, re-applications, safe-dit attention calls (each one safe-dit decided,
  through the runtime's ``trace``), and under the scheduled modes the selective steps that ran. Written as JSON
  lines to ``$SAFE_DIT_CONFORMANCE_LOG`` (if set).
Also loads the offline hub stand-ins (``offline_hub``), which the stock run loads on its own.
"""

from __future__ import annotations

import functools
import json
import os
import threading

import pytest

TARGETS = ("LuminaNextDiT2DModel", "PixArtTransformer2DModel", "SD3Transformer2DModel", "FluxTransformer2DModel")
PIPELINES = ("LuminaPipeline", "PixArtSigmaPipeline", "PixArtAlphaPipeline", "StableDiffusion3Pipeline",
             "FluxPipeline")
MARK = "_conformance_safe_dit"
MODE = os.environ.get("SAFE_DIT_CONFORMANCE_MODE", "dense-fp")
SETTINGS = json.loads(os.environ.get("SAFE_DIT_CONFORMANCE_CONFIG") or "{}")  # more SafeConfig fields, as JSON

_local = threading.local()
_counts = {"models": 0, "reapplied": 0, "attention_calls": 0, "apply_errors": 0, "selective_steps": 0}
_by_class: dict[str, int] = {}


def _config():
    from safe_dit import SafeConfig

    return SafeConfig(MODE, **SETTINGS)


class _Calls(list):
    """A runtime's ``trace``: counts the attention calls safe-dit decided (every backbone records each one), keeps
    none of them."""

    def append(self, _item) -> None:
        _counts["attention_calls"] += 1


def _apply(model) -> None:
    from safe_dit import apply_safe_dit
    from safe_dit.api import runtime_of

    _local.busy = getattr(_local, "busy", 0) + 1
    try:
        apply_safe_dit(model, _config())
        runtime = runtime_of(model)
        if runtime is not None and not isinstance(runtime.trace, _Calls):
            runtime.trace = _Calls()
    except Exception:
        _counts["apply_errors"] += 1
        raise
    finally:
        _local.busy -= 1


def _wrap_init(cls) -> None:
    original = cls.__init__

    @functools.wraps(original)
    def __init__(self, *args, **kwargs):
        _local.depth = getattr(_local, "depth", 0) + 1
        try:
            original(self, *args, **kwargs)
        finally:
            _local.depth -= 1
        if _local.depth == 0:
            _counts["models"] += 1
            name = type(self).__name__
            _by_class[name] = _by_class.get(name, 0) + 1
            object.__setattr__(self, MARK, True)
            _apply(self)

    cls.__init__ = __init__


def _wrap_call(cls) -> None:
    original = cls.__call__

    @functools.wraps(original)
    def __call__(self, *args, **kwargs):
        from safe_dit import is_safe_dit_applied

        if getattr(self, MARK, False) and not getattr(_local, "busy", 0) and not is_safe_dit_applied(self):
            _counts["reapplied"] += 1
            _apply(self)
        return original(self, *args, **kwargs)

    cls.__call__ = __call__


def _wrap_pipeline_call(cls) -> None:
    original = cls.__call__
    targets = tuple(getattr(__import__("diffusers"), name) for name in TARGETS)

    @functools.wraps(original)
    def __call__(self, *args, **kwargs):
        from safe_dit.api import runtime_of

        model = getattr(self, "transformer", None)
        if isinstance(model, targets) and not getattr(_local, "busy", 0):
            runtime = runtime_of(model)
            if runtime is None or runtime.pipe is not self:
                _counts["models"] += 1  # a pipeline's transformer patched (again) for this pipeline
                _by_class[type(model).__name__] = _by_class.get(type(model).__name__, 0) + 1
            elif not runtime.intact():
                _counts["reapplied"] += 1
            _apply(self)  # idempotent on an intact patch of this pipeline
            output = original(self, *args, **kwargs)
            report = runtime_of(model).last_report if runtime_of(model) is not None else None
            if report is not None:  # the steps that ran only the sensitive rows: safe-core did schedule
                _counts["selective_steps"] += report["steps"].count("selective")
                runtime_of(model).last_report = None
            return output
        return original(self, *args, **kwargs)

    cls.__call__ = __call__


def pytest_configure(config):
    import diffusers
    import offline_hub

    from safe_dit import SafeConfig

    offline_hub.install()
    if SafeConfig(MODE).scheduled:
        for name in PIPELINES:
            _wrap_pipeline_call(getattr(diffusers, name))
    else:
        for name in TARGETS:
            cls = getattr(diffusers, name)
            _wrap_init(cls)
            _wrap_call(cls)
    config.addinivalue_line("markers", "safe_dit_conformance: run under safe-dit")


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_protocol(item, nextitem):
    for key in _counts:
        _counts[key] = 0
    _by_class.clear()
    yield
    path = os.environ.get("SAFE_DIT_CONFORMANCE_LOG")
    if path:
        record = {"nodeid": item.nodeid, **_counts, "classes": dict(_by_class)}
        with open(path, "a") as fh:
            fh.write(json.dumps(record) + "\n")


def pytest_report_header(config):
    from safe_dit import SafeConfig

    if SafeConfig(MODE).scheduled:
        calls = ", ".join(PIPELINES)
        return f"safe-dit conformance: apply_safe_dit(pipe, {_config()!r}) on every call of {calls}"
    return f"safe-dit conformance: apply_safe_dit({_config()!r}) on " + ", ".join(TARGETS)
