"""Check a built site documents every public name of kldiv, kldiv.losses and kldiv.metrics.

``python docs/check_api.py docs/_build/html``: reads the site's ``objects.inv``. A name in a
module's ``__all__`` is documented when that dotted name is in the inventory, or when the very
same object is documented under ``kldiv`` (``kldiv.losses.kld`` is ``kldiv.kl_divergence``).
Submodules and dunder names are not checked. Exits 1 listing what is missing.
"""

from __future__ import annotations

import importlib
import sys
import types
from pathlib import Path

from sphinx.util.inventory import InventoryFile

MODULES = ("kldiv", "kldiv.losses", "kldiv.metrics")


def documented_names(site: Path) -> set[str]:
    with open(site / "objects.inv", "rb") as f:
        inventory = InventoryFile.load(f, "", lambda base, uri: uri)
    names: set[str] = set()
    for role, entries in inventory.items():
        if role.startswith("py:"):
            names.update(entries)
    return names


def missing(names: set[str]) -> list[str]:
    kldiv = importlib.import_module("kldiv")
    by_object = {id(getattr(kldiv, n)): n for n in kldiv.__all__ if f"kldiv.{n}" in names}
    out = []
    for module_name in MODULES:
        module = importlib.import_module(module_name)
        for name in module.__all__:
            obj = getattr(module, name)
            if name.startswith("__") or isinstance(obj, types.ModuleType):
                continue
            if f"{module_name}.{name}" not in names and id(obj) not in by_object:
                out.append(f"{module_name}.{name}")
    return out


def main(argv: list[str]) -> int:
    gaps = missing(documented_names(Path(argv[0])))
    for name in gaps:
        print(f"docs/api.md does not document {name}", file=sys.stderr)
    return 1 if gaps else 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
