"""A new backbone is two files, an adapter module and a kit module: a test-only dummy backbone, written as those
two files into folders added to the two packages' search paths for the test's duration, shows up in every list
built from the registry (the CLI's model choices and help, the audit's and bench e2e's --model, the census
recipes, the kits the backbone-wide tests are parametrised over) without any other file edited; afterwards
nothing of it is left."""

from __future__ import annotations

import argparse
import importlib
import pkgutil
import sys

import pytest

import safe_dit.adapters
import safe_dit.testing
from safe_dit.adapters import contract
from safe_dit.commands import build_parser
from safe_dit.testing import catalog, kits

ADAPTER = '''
import torch

from safe_dit.adapters.contract import Adapter, register


class DummyTransformer2DModel(torch.nn.Module):
    """A transformer class of the test's own."""


@register
class DummyAdapter(Adapter):
    name = "dummy-dit"
    model_classes = (DummyTransformer2DModel,)
    notes = "the dummy passes no mask"
'''

KIT = '''
from safe_dit.config import SafeDitError
from safe_dit.testing.kit import Kit, TinyRun


def build_dummy(preset="tiny", seed=0, **overrides):
    from safe_dit.adapters.dummy_dit import DummyTransformer2DModel

    return DummyTransformer2DModel()


def refuse(*args, **kwargs):
    raise SafeDitError("the dummy backbone has no pipeline")


KIT = Kit(rank=99, name="dummy-dit", label="Dummy-DiT", tiny_name="tiny-random-dummy-dit", build=build_dummy,
          inputs=refuse, pipeline=refuse, text_pipeline=refuse, prompt_kwargs=refuse, tiny_run=TinyRun(16, 16, (2, 2)),
          real_preset="dummy-real", bench_text_len=8, bench_overrides=lambda *a, **k: {})
'''

MODULES = ("safe_dit.adapters.dummy_dit", "safe_dit.testing.dummy_dit")


@pytest.fixture()
def dummy_backbone(tmp_path, monkeypatch):
    """The two files in their own folders, found as ``safe_dit.adapters.dummy_dit`` and ``safe_dit.testing.dummy_dit``;
    the registry, KITS and sys.modules are restored afterwards."""
    for package, source in ((safe_dit.adapters, ADAPTER), (safe_dit.testing, KIT)):
        folder = tmp_path / package.__name__.rsplit(".", 1)[1]
        folder.mkdir()
        (folder / "dummy_dit.py").write_text(source)
        monkeypatch.setattr(package, "__path__", [*package.__path__, str(folder)])
    monkeypatch.setattr(contract, "_REGISTRY", list(contract._REGISTRY))
    for info in pkgutil.iter_modules(safe_dit.adapters.__path__):  # what importing safe_dit.adapters does
        if info.name != "contract":
            importlib.import_module(f"safe_dit.adapters.{info.name}")
    monkeypatch.setattr(kits, "KITS", kits._discover())  # what importing safe_dit.testing.kits does
    yield
    for name in MODULES:
        sys.modules.pop(name, None)


def _sub(parser, *words):
    for word in words:
        parser = next(a for a in parser._actions if isinstance(a, argparse._SubParsersAction)).choices[word]
    return parser


def _choices(parser, option):
    return next(a for a in parser._actions if option in a.option_strings).choices


def test_a_dummy_backbone_is_in_every_list(dummy_backbone):
    assert "DummyTransformer2DModel" in contract.supported_classes()
    assert catalog.kit_names()[-1] == "dummy-dit" and "tiny-random-dummy-dit" in catalog.tiny_names()
    assert "dummy-dit" in kits.KITS and kits.kit_for("dummy-dit").label == "Dummy-DiT"  # the tests' parametrisation
    audit = _sub(build_parser(["audit"]), "audit")
    assert "dummy-dit" in _choices(audit, "--model") and "dummy-dit: dummy-real" in audit.format_help()
    assert "Dummy-DiT" in audit.description
    assert "dummy-dit" in _choices(_sub(build_parser(["bench", "e2e"]), "bench", "e2e"), "--model")
    generate = _sub(build_parser(["generate"]), "generate").format_help()
    assert "tiny-random-dummy-dit" in generate and "Dummy-DiT" in generate
    assert "Dummy-DiT" in build_parser([]).description
    from safe_dit.inspection.recipes import recipes

    recipe = next(r for r in recipes() if r.kit == "dummy-dit")
    assert recipe.cls == "DummyTransformer2DModel" and type(recipe.build(0)).__name__ == recipe.cls


def test_nothing_of_the_dummy_is_left():
    assert "dummy-dit" not in kits.KITS and "dummy-dit" not in catalog.kit_names()
    assert "DummyTransformer2DModel" not in contract.supported_classes()
    assert not any(name in sys.modules for name in MODULES)
    assert "dummy-dit" not in _choices(_sub(build_parser(["audit"]), "audit"), "--model")


def test_the_light_catalog_matches_the_imported_kits():
    """--help reads the kits' declarations without importing them; they are the kits KITS imports."""
    assert [(d.rank, d.name, d.label, d.tiny_name, d.real_preset) for d in catalog.declared_kits()] == \
        [(k.rank, k.name, k.label, k.tiny_name, k.real_preset) for k in kits.KITS.values()]


def test_a_declaration_that_is_not_literal_is_refused_by_the_static_reader():
    with pytest.raises(catalog.Unreadable, match="name is not a literal"):
        catalog.read_declaration("KIT = Kit(rank=1, name=make_name(), label='x', tiny_name='t', real_preset='r')", "m")
    constant = "NAME = 'n'\nKIT = Kit(rank=1, name=NAME, label='x', tiny_name='t', real_preset='r')"
    assert catalog.read_declaration(constant, "m").name == "n"
    assert catalog.read_declaration("x = 1", "m") is None
