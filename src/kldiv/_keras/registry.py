"""kldiv's losses and metrics in Keras' registry of serializable classes.

A model saved with kldiv's loss or metrics loads without ``custom_objects``, as one with
``keras_hub``'s or ``keras_cv``'s classes does: each class is registered
(``register_keras_serializable``) in every loaded Keras (Keras 3 and tf-keras each have a
registry) under a name of its own, never one of Keras':

- a loss class as ``"kldiv>ClassName"`` (``"kldiv>KLDivergence"``, ``"kldiv>KLEstimator"``, ...);
- a metric class as ``"kldiv.metrics>ClassName"``: kldiv's loss and metric classes share their
  class names, and one registered name can only stand for one class.

``keras.losses.KLDivergence`` keeps its own name: Keras' classes are saved without a registered
name, and their configs never reach kldiv's.

kldiv never imports Keras. Registration happens when both are loaded, in either order:

- Keras loaded first: when :mod:`kldiv._keras` is imported (kldiv's classes do not exist yet, so
  each name is given a stand-in whose ``from_config`` finds the class when Keras loads a model;
  the class itself replaces it once it exists);
- kldiv loaded first: right after Keras' package is imported, through a post-import hook on
  ``sys.meta_path`` (:class:`_AfterKerasImport`) that only watches Keras' top-level packages;
- and each Keras-aware class (the class of an instance Keras saves) is registered when it is
  made (:func:`register_class`).
"""

from __future__ import annotations

import contextlib
import importlib
import importlib.abc
import importlib.machinery
import sys
import threading
from types import ModuleType
from typing import Any

__all__ = ["KERAS_PACKAGES", "LOSS_PACKAGE", "METRIC_PACKAGE", "PUBLIC_CLASSES", "install",
           "register_all", "register_class", "registered_name"]

LOSS_PACKAGE = "kldiv"
METRIC_PACKAGE = "kldiv.metrics"

PUBLIC_CLASSES: dict[str, tuple[tuple[str, ...], tuple[str, ...]]] = {
    # package: (the modules that export its classes, the class names)
    LOSS_PACKAGE: (("kldiv.losses", "kldiv"),
                   ("KLDivergence", "ReverseKLDivergence", "JensenShannonDivergence", "KLEstimator")),
    METRIC_PACKAGE: (("kldiv.metrics",),
                     ("KLDivergence", "ReverseKLDivergence", "JensenShannonDivergence")),
}
"""Every Keras-facing class kldiv registers, by package (a test checks that it lists every
Keras-aware loss and metric class kldiv exports; ``kldiv.metrics.KLEstimator`` is not one)."""

KERAS_PACKAGES = ("keras", "tf_keras")

# each Keras' registry module: Keras 3 (and Keras 2.13+ as ``keras``), tf-keras
_REGISTRIES = ("keras.src.saving.object_registration", "keras.saving.object_registration",
               "tf_keras.src.saving.object_registration")

_LOCK = threading.RLock()


def registered_name(package: str, name: str) -> str:
    """``"package>name"``, Keras' form of a registered name."""
    return f"{package}>{name}"


def _registries() -> list[ModuleType]:
    found = []
    for module_name in _REGISTRIES:
        module = sys.modules.get(module_name)
        if callable(getattr(module, "register_keras_serializable", None)) and module not in found:
            assert module is not None
            found.append(module)
    return found


def _public_class(package: str, name: str) -> type | None:
    """kldiv's class registered as ``package>name``, where its module is loaded (never imports)."""
    modules, _ = PUBLIC_CLASSES[package]
    for module_name in modules:
        cls = getattr(sys.modules.get(module_name), name, None)
        if isinstance(cls, type) and callable(getattr(cls, "from_config", None)):
            return cls
    return None


def _stand_in(package: str, name: str) -> type:
    """What Keras finds under ``package>name`` before kldiv's class exists (Keras imported before
    kldiv's import finished): its ``from_config`` is the class' own, looked up when called."""

    def from_config(cls: type, config: Any) -> Any:
        modules, _ = PUBLIC_CLASSES[package]
        for module_name in modules:
            importlib.import_module(module_name)  # kldiv's own module: loaded by now
        real = _public_class(package, name)
        if real is None:  # pragma: no cover - a name in PUBLIC_CLASSES that kldiv does not export
            raise TypeError(f"kldiv exports no class {name!r} in {' or '.join(modules)}")
        return real.from_config(config)  # type: ignore[attr-defined]

    def get_config(self: Any) -> dict[str, Any]:  # pragma: no cover - never instantiated
        return {}

    return type(name, (), {
        "__module__": PUBLIC_CLASSES[package][0][0],
        "__qualname__": name,
        "__doc__": f"Stands for kldiv's {package}>{name} until that class exists.",
        "from_config": classmethod(from_config),
        "get_config": get_config,
        "_kldiv_stand_in": True,
    })


_STAND_INS: dict[tuple[str, str], type] = {}


def _register(registry: ModuleType, package: str, name: str, cls: type) -> None:
    registry.register_keras_serializable(package=package, name=name)(cls)


def register_all() -> None:
    """Register every class of :data:`PUBLIC_CLASSES` in every loaded Keras (the class where it
    exists, else its stand-in); a stand-in already there is replaced by the class. Idempotent."""
    registries = _registries()
    if not registries:
        return
    with _LOCK:
        for package, (_, names) in PUBLIC_CLASSES.items():
            for name in names:
                cls = _public_class(package, name)
                if cls is None:
                    key = (package, name)
                    cls = _STAND_INS.get(key)
                    if cls is None:
                        cls = _STAND_INS[key] = _stand_in(package, name)
                full = registered_name(package, name)
                for registry in registries:
                    current = registry.get_registered_object(full)
                    if current is cls or (current is not None and not _is_ours(current)):
                        continue  # registered already, or a user's own class under that name
                    _register(registry, package, name, cls)


def _is_ours(obj: Any) -> bool:
    return getattr(obj, "_kldiv_stand_in", False) or str(getattr(obj, "__module__", "")).startswith("kldiv")


def register_class(made: type, package: str) -> None:
    """Register ``made`` (a Keras-aware class, or the view of one) in every loaded Keras under
    the name of the class it was made of, so that Keras saves its instances under that name:

    - kldiv's public class: ``package>ClassName``; the name keeps pointing to the public class
      (which makes a Keras-aware instance);
    - a user's subclass that the user registered (``@keras.saving.register_keras_serializable``):
      the user's name (the instances are of the Keras-aware class made of it, which Keras would
      otherwise save under its bare class name and fail to load).
    """
    registries = _registries()
    if not registries:
        return
    plain = getattr(made, "_kldiv_class", made)
    name = plain.__name__
    public = name in PUBLIC_CLASSES[package][1] and _public_class(package, name) is plain
    if public:
        register_all()
    with _LOCK:
        for registry in registries:
            full = registered_name(package, name) if public else registry.get_registered_name(plain)
            if not isinstance(full, str) or ">" not in full or registry.get_registered_name(made) == full:
                continue  # not registered (a private base, an unregistered subclass), or done
            entry = registry.get_registered_object(full)
            owner, _, short = full.partition(">")
            _register(registry, owner, short, made)
            if entry is not None:
                _register(registry, owner, short, entry)  # the name still finds that class


# ---- registering when Keras is imported after kldiv ----------------------------------------


class _AfterImportLoader(importlib.abc.Loader):
    """Runs a Keras package's own loader, then :func:`register_all` (and puts the original
    loader back on the module, as ``wrapt``'s post-import hooks do)."""

    def __init__(self, loader: Any) -> None:
        self._loader = loader

    def __getattr__(self, name: str) -> Any:
        # the rest of the loader's API (get_filename, is_package, get_resource_reader, ...) for
        # code that inspects the spec importlib.util.find_spec("keras") returns without importing
        return getattr(self._loader, name)

    def create_module(self, spec: importlib.machinery.ModuleSpec) -> Any:
        return self._loader.create_module(spec)

    def exec_module(self, module: ModuleType) -> None:
        spec = module.__spec__
        if spec is not None:
            spec.loader = self._loader
        module.__loader__ = self._loader
        self._loader.exec_module(module)
        with contextlib.suppress(Exception):  # never break the user's import of Keras
            register_all()


class _AfterKerasImport(importlib.abc.MetaPathFinder):
    """A ``sys.meta_path`` finder that only watches Keras' top-level packages: it finds them
    with the other finders and wraps their loader in :class:`_AfterImportLoader`."""

    def __init__(self) -> None:
        self._busy: set[str] = set()

    def find_spec(self, fullname: str, path: Any, target: Any = None) -> Any:
        if fullname not in KERAS_PACKAGES or fullname in self._busy:
            return None
        self._busy.add(fullname)
        try:
            for finder in sys.meta_path:
                if finder is self or not hasattr(finder, "find_spec"):
                    continue
                spec = finder.find_spec(fullname, path, target)
                if spec is not None:
                    break
            else:
                return None
        finally:
            self._busy.discard(fullname)
        loader = spec.loader
        if loader is None or not callable(getattr(loader, "exec_module", None)):
            return spec
        spec.loader = _AfterImportLoader(loader)
        return spec


_FINDER = _AfterKerasImport()


def install() -> None:
    """Register now where a Keras is loaded, and when one is imported later (once per process)."""
    if not any(isinstance(f, _AfterKerasImport) for f in sys.meta_path):
        sys.meta_path.insert(0, _FINDER)
    register_all()
