"""Makes `import jpaged` work from a bare checkout, for the benchmark scripts.

pyproject.toml maps three packages to folders of other names (`jpaged.models` <- models/, `jpaged.kernels` <-
pallas_kernels/, `jpaged.server` <- server/). An install (editable or not) carries that mapping; `PYTHONPATH=<repo>`
alone does not, so `import jpaged` finds jpaged/ but fails on `jpaged.models`. `ensure_jpaged()` puts the repo root on
sys.path and, only when jpaged resolves to this checkout and nothing else maps those names, adds a meta-path finder
that does what the install would. It never imports jpaged itself.
"""

from __future__ import annotations

import importlib.abc
import importlib.machinery
import importlib.util
import sys
from collections.abc import Sequence
from pathlib import Path
from types import ModuleType

REPO = Path(__file__).resolve().parent.parent
MAPPED = {"jpaged.models": REPO / "models", "jpaged.kernels": REPO / "pallas_kernels", "jpaged.server": REPO / "server"}


class _MappedPackages(importlib.abc.MetaPathFinder):
    """Finds `jpaged.models` and friends in their folders; their submodules then load through their `__path__`."""

    def find_spec(
        self, fullname: str, path: Sequence[str] | None = None, target: ModuleType | None = None
    ) -> importlib.machinery.ModuleSpec | None:
        folder = MAPPED.get(fullname)
        if folder is None or not (folder / "__init__.py").is_file():
            return None
        return importlib.util.spec_from_file_location(
            fullname, folder / "__init__.py", submodule_search_locations=[str(folder)]
        )


def _someone_maps(name: str, parent_dir: Path) -> bool:
    """Whether a finder already on sys.meta_path (an editable install's) resolves `name` under jpaged/."""
    for finder in sys.meta_path:
        if isinstance(finder, _MappedPackages) or finder is importlib.machinery.PathFinder:
            continue  # PathFinder would look in jpaged/<name>, which does not exist in a checkout
        find_spec = getattr(finder, "find_spec", None)
        if find_spec is not None and find_spec(name, [str(parent_dir)]) is not None:
            return True
    return False


def ensure_jpaged() -> str:
    """Returns how jpaged is found: 'installed', 'editable' or 'checkout' (the finder added here)."""
    if str(REPO) not in sys.path:
        sys.path.insert(0, str(REPO))
    if any(isinstance(f, _MappedPackages) for f in sys.meta_path):
        return "checkout"
    spec = importlib.util.find_spec("jpaged") if "jpaged" not in sys.modules else sys.modules["jpaged"].__spec__
    if spec is None or spec.origin is None:
        raise ModuleNotFoundError(f"jpaged is neither installed nor in {REPO}")
    package_dir = Path(spec.origin).resolve().parent
    if package_dir != REPO / "jpaged" or (package_dir / "models").is_dir():
        return "installed"  # a wheel or a copy that holds its subpackages: leave it alone
    if _someone_maps("jpaged.models", package_dir):
        return "editable"
    sys.meta_path.insert(0, _MappedPackages())
    return "checkout"


HOW_FOUND = ensure_jpaged()
