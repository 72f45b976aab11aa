"""``import deepmemory`` registers the ``deepmemory`` model type with Hugging Face's Auto classes.

Registering means importing the models (torch and transformers, seconds), which the command line
must not pay for (``deepmemory --help`` starts in a fraction of a second). So the registration is
made the moment it can first be needed: when ``transformers.models.auto`` (the package of
``AutoConfig`` and ``AutoModelForCausalLM``) has been imported, by this process or before
``deepmemory`` was. The means is Python's import system's public hook, a finder on
``sys.meta_path`` (PEP 451) that wraps the loader of that one module and removes itself once used;
nothing in transformers is patched.
"""

from __future__ import annotations

import importlib
import importlib.abc
import importlib.util
import sys

AUTO_MODULE = "transformers.models.auto"


def _register() -> None:
    importlib.import_module("deepmemory.models")  # registers with AutoConfig / AutoModel(ForCausalLM)


class _Loader(importlib.abc.Loader):
    """The module's own loader, then the registration."""

    def __init__(self, loader):
        self.loader = loader

    def create_module(self, spec):
        return self.loader.create_module(spec)

    def exec_module(self, module) -> None:
        self.loader.exec_module(module)
        _register()


class _Finder(importlib.abc.MetaPathFinder):
    """Finds ``transformers.models.auto`` with the other finders and wraps its loader."""

    def find_spec(self, name, path, target=None):
        if name != AUTO_MODULE:
            return None
        uninstall()
        spec = importlib.util.find_spec(name)
        if spec is not None and spec.loader is not None:
            spec.loader = _Loader(spec.loader)
        return spec


def uninstall() -> None:
    """Remove the finder (a no-op when it is not installed)."""
    sys.meta_path[:] = [f for f in sys.meta_path if not isinstance(f, _Finder)]


def install() -> None:
    """Register now if the Auto classes are loaded already, else when they load."""
    if AUTO_MODULE in sys.modules:
        _register()
    elif not any(isinstance(f, _Finder) for f in sys.meta_path):
        sys.meta_path.insert(0, _Finder())
