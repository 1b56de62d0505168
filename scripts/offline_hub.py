"""pytest plugin (``-p offline_hub``, with ``scripts`` on PYTHONPATH): offline stand-ins for the hub's tiny
test models, for running diffusers' own test files without network. Loaded in BOTH conformance runs (stock
and safe-dit), so whatever it builds or skips is the same on both sides.

* ``from_pretrained("hf-internal-testing/<id>")`` of transformers' ``AutoConfig``, ``AutoTokenizer`` and any
  tokenizer class (``CLIPTokenizer``, ...) returns a small config / word-level tokenizer built in code
  (``safe_dit.testing.tiny.word_tokenizer``) for the ids below; other ids and local paths go to the original.
* A test that still needs the hub (a diffusers ``from_pretrained("hf-internal-testing/tiny-flux-pipe")``,
  ``hf_hub_download``, ...) fails with an offline error (``HF_HUB_OFFLINE=1``); such a failure is reported as
  *skipped* ("offline hub: ..."), the same way in both runs, so it never counts as a regression.
"""

from __future__ import annotations

import functools
import os

import pytest

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")

PREFIX = "hf-internal-testing/"
SKIP_PREFIX = "offline hub: "


class HubStandInMissing(OSError):
    """A hub id under hf-internal-testing/ with no offline stand-in."""


def _t5_config():
    # hf-internal-testing/tiny-random-t5: d_model 32 is what the tests' transformers expect (caption_channels,
    # joint_attention_dim = 32)
    from transformers import T5Config

    return T5Config(vocab_size=1103, d_model=32, d_kv=8, d_ff=37, num_layers=5, num_decoder_layers=5, num_heads=4,
                    relative_attention_num_buckets=8, dropout_rate=0.1, is_encoder_decoder=True,
                    pad_token_id=0, eos_token_id=1, decoder_start_token_id=0)


def _tokenizer(repo: str):
    from safe_dit.testing.tiny import word_tokenizer

    name = repo[len(PREFIX):]
    if "clip" in name:
        return word_tokenizer("<bos> $A <eos>", max_length=77)
    if "t5" in name:
        return word_tokenizer("$A <eos>", max_length=512)
    if "gemma" in name:
        tok = word_tokenizer("<bos> $A", max_length=2048)
        tok.padding_side = "left"  # GemmaTokenizer's class default
        return tok
    raise HubStandInMissing(f"no offline stand-in tokenizer for {repo!r}")


def _config(repo: str):
    name = repo[len(PREFIX):]
    if "t5" in name:
        return _t5_config()
    raise HubStandInMissing(f"no offline stand-in config for {repo!r}")


def _is_hub_test_id(arg) -> bool:
    return isinstance(arg, str) and arg.startswith(PREFIX) and not os.path.isdir(arg)


def _patch_classmethod(cls, name: str, make):
    original = cls.__dict__[name].__func__

    @functools.wraps(original)
    def wrapper(klass, pretrained_model_name_or_path=None, *args, **kwargs):
        if _is_hub_test_id(pretrained_model_name_or_path):
            return make(pretrained_model_name_or_path)
        return original(klass, pretrained_model_name_or_path, *args, **kwargs)

    wrapper.__offline_hub_original__ = original
    setattr(cls, name, classmethod(wrapper))


_INSTALLED = False


def install() -> None:
    """Patch transformers' config/tokenizer loaders (idempotent)."""
    global _INSTALLED
    if _INSTALLED:
        return
    _INSTALLED = True
    from transformers import AutoConfig, AutoTokenizer
    from transformers.tokenization_utils_base import PreTrainedTokenizerBase

    _patch_classmethod(AutoConfig, "from_pretrained", _config)
    _patch_classmethod(AutoTokenizer, "from_pretrained", _tokenizer)
    _patch_classmethod(PreTrainedTokenizerBase, "from_pretrained", _tokenizer)


def _offline_cause(exc: BaseException | None) -> str | None:
    """A one-line reason when ``exc`` (or its cause chain) is 'the hub is not reachable'."""
    try:
        from huggingface_hub.errors import LocalEntryNotFoundError, OfflineModeIsEnabled
    except Exception:  # pragma: no cover
        LocalEntryNotFoundError = OfflineModeIsEnabled = ()  # noqa: N806
    seen = set()
    while exc is not None and id(exc) not in seen:
        seen.add(id(exc))
        text = str(exc)
        if isinstance(exc, (HubStandInMissing, LocalEntryNotFoundError, OfflineModeIsEnabled)):
            return f"{type(exc).__name__}: {text.splitlines()[0] if text else ''}"
        if isinstance(exc, (OSError, ValueError)) and any(s in text for s in (
                "offline mode", "HF_HUB_OFFLINE", "outgoing traffic has been disabled",
                "We couldn't connect", "couldn't connect to", "Cannot find the requested files in the",
                "not cached locally", "is not the path to a directory containing")):
            return f"{type(exc).__name__}: {text.splitlines()[0] if text else ''}"
        exc = exc.__cause__ or exc.__context__
    return None


def pytest_configure(config):
    install()


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_makereport(item, call):
    outcome = yield
    report = outcome.get_result()
    if call.excinfo is None or report.outcome != "failed":
        return
    if call.excinfo.errisinstance((pytest.skip.Exception, KeyboardInterrupt)):
        return
    reason = _offline_cause(call.excinfo.value)
    if reason is None:
        return
    path, lineno, _ = item.location
    report.outcome = "skipped"
    report.longrepr = (str(path), (lineno or 0) + 1, "Skipped: " + SKIP_PREFIX + reason[:300])
    if hasattr(report, "wasxfail"):
        del report.wasxfail
