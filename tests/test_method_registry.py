"""The method registry loads every listed method module, and says which one when one cannot load."""
from __future__ import annotations

import sys

import pytest

import deltatune.methods as methods


def test_every_listed_module_registers_its_method():
    assert set(methods.load_methods(methods._METHOD_MODULES)) == set(methods.REGISTRY)
    assert len(methods.REGISTRY) == len(methods._METHOD_MODULES)


@pytest.mark.parametrize("source, cause", [
    (None, "No module named 'deltatune.methods.missing_method'"),          # listed, never written
    ("import a_package_that_is_not_installed\n", "a_package_that_is_not_installed"),  # its dependency
])
def test_a_listed_module_that_fails_to_import_is_an_error_naming_it(tmp_path, monkeypatch, source, cause):
    name = "missing_method" if source is None else "broken_method"
    if source is not None:
        (tmp_path / f"{name}.py").write_text(source, encoding="utf-8")
    monkeypatch.setattr(methods, "__path__", [*methods.__path__, str(tmp_path)])
    monkeypatch.delitem(sys.modules, f"deltatune.methods.{name}", raising=False)
    with pytest.raises(ImportError) as info:
        methods.load_methods(["lora", name])
    message = str(info.value)
    assert message.startswith(f"deltatune.methods.{name}: the method module listed in "
                              "deltatune.methods._METHOD_MODULES failed to import")
    assert cause in message
