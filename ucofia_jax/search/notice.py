"""The warning a person should read before trusting hits, from what the index remembers.

Its own module, with nothing but the standard library: the query command prints it without
loading the model's code (docs/search.md, "Speed").
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any, Dict, Optional

SYNTHETIC_NOTICE = (
    "this model was trained on the synthetic demo set (coloured shapes moving on a plain "
    "background); it knows nothing else, so its hits on real footage mean nothing"
)


def training_notice(source: Dict[str, Any]) -> Optional[str]:
    """SYNTHETIC_NOTICE for a model trained on the synthetic demo set, else None.

    The rule: the source is a training run (``workdir``) whose saved config says
    ``data.synthetic.enabled`` (configs/demo.py sets it; every real dataset leaves it off).
    Released checkpoints and CLIP weights are never the demo's. A run whose config can no
    longer be read says nothing (the index still searches)."""
    workdir = source.get("workdir") or ""
    if not workdir:
        return None
    try:
        with open(Path(workdir) / "config.json", encoding="utf-8") as f:
            synthetic = json.load(f)["data"]["synthetic"]["enabled"]
    except (OSError, ValueError, KeyError, TypeError):
        return None
    return SYNTHETIC_NOTICE if synthetic is True else None
