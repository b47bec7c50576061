"""``lancedb``, imported without loading its REST client up front.

lancedb imports ``lance_namespace``, which imports the models of
``lance_namespace_urllib3_client``; that package's ``__init__`` also imports the client's nine
API modules, whose pydantic-validated methods take ~0.9 s to build (half of lancedb's import
time, a third of a ``query`` command's; docs/search.md, "Speed"). A local index never talks
to a namespace server. So the package is registered without running its ``__init__``: its
submodules (the models lancedb needs) import as usual, and the first use of a name the
``__init__`` defines (``ApiClient``, ...) runs it then, so nothing is lost, only deferred.
"""

from __future__ import annotations

import importlib.util
import sys

REST_CLIENT = "lance_namespace_urllib3_client"


def _defer_package_init(name: str) -> None:
    """Registers package ``name`` with its ``__path__`` (so that its submodules import) but
    runs its ``__init__`` only when one of the names it defines is first looked up."""
    if name in sys.modules:
        return
    spec = importlib.util.find_spec(name)
    if spec is None or spec.submodule_search_locations is None:
        return  # not installed, or not a package: lancedb's own import then says so
    module = importlib.util.module_from_spec(spec)

    def load_on_first_use(attr: str):
        del module.__getattr__
        spec.loader.exec_module(module)
        return getattr(module, attr)

    module.__getattr__ = load_on_first_use
    sys.modules[name] = module


_defer_package_init(REST_CLIENT)

import lancedb  # noqa: E402 -- after the deferral above, which is this module's job

__all__ = ["lancedb"]
