"""Search your own videos by text (docs/search.md).

  python -m ucofia_jax.search index --videos DIR --index DIR.ucofia --workdir RUN
  python -m ucofia_jax.search query --index DIR.ucofia "a dog catches a frisbee" --top 10
  python -m ucofia_jax.search serve --index DIR.ucofia --port 8080
  python -m ucofia_jax.search export --index DIR.ucofia --out feats/

Python API: ``Index.open(path)``, ``index.search(texts, top)`` -> lists of ``Hit``,
``encode_videos(paths, model)`` with ``load_model(ModelSource(...))``.

The names are loaded on first use (PEP 562), so that the decode workers, which import
``ucofia_jax.search.decoding``, do not import jax.
"""

from __future__ import annotations

import importlib

_EXPORTS = {
    "Index": "ucofia_jax.search.index",
    "Hit": "ucofia_jax.search.index",
    "encode_videos": "ucofia_jax.search.index",
    "DEFAULT_TOP": "ucofia_jax.search.index",
    "DEFAULT_PER_FILE": "ucofia_jax.search.index",
    "no_good_match": "ucofia_jax.search.index",
    "DEFAULT_SHORTLIST": "ucofia_jax.search.store",
    "IndexingError": "ucofia_jax.errors",
    "ModelMismatch": "ucofia_jax.errors",
    "SearchIndexError": "ucofia_jax.errors",
    "SourceError": "ucofia_jax.errors",
    "build_index": "ucofia_jax.search.indexer",
    "ModelSource": "ucofia_jax.search.source",
    "SearchModel": "ucofia_jax.search.source",
    "load_model": "ucofia_jax.search.source",
}

__all__ = sorted(_EXPORTS)


def __getattr__(name):
    if name in _EXPORTS:
        return getattr(importlib.import_module(_EXPORTS[name]), name)
    raise AttributeError(f"module 'ucofia_jax.search' has no attribute {name!r}")
