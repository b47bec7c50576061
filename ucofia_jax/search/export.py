"""``export``: the stored features with their metadata, for other tools.

``OUT/shard-00000.safetensors`` ... (at most ``rows_per_shard`` videos each; tensors
``vector`` [n, d] and, unless clip_only, ``frames`` [n, f, d], ``pixels`` [n, f*k, d],
``mask`` [n, f], float16 as stored (mask int8)) and ``OUT/manifest.json``: the index's model
fingerprint, source, shapes, and per shard its file name, row count and the rows' ``video_id``,
``path``, ``start``, ``end`` in tensor order.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any, Dict

import numpy as np
from safetensors.numpy import save_file

from ucofia_jax.search.store import TOKEN_COLUMNS, Store

DEFAULT_ROWS_PER_SHARD = 4096


def export(store: Store, out_dir: str | os.PathLike, rows_per_shard: int = DEFAULT_ROWS_PER_SHARD):
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    meta = store.meta
    names = ["vector"] + ([] if meta["clip_only"] else list(TOKEN_COLUMNS))
    table = store.read_columns(["video_id", "path", "start", "end", *names])
    shards = []
    for s, lo in enumerate(range(0, max(table.num_rows, 1), rows_per_shard)):
        part = table.slice(lo, rows_per_shard)
        if part.num_rows == 0 and table.num_rows:
            break
        tensors: Dict[str, np.ndarray] = {}
        for name in names:
            col = part.column(name).combine_chunks()
            flat = np.asarray(col.flatten().to_numpy(zero_copy_only=False))
            tensors[name] = np.ascontiguousarray(
                flat.reshape((part.num_rows, *meta["shapes"][name]))
            )
        file = f"shard-{s:05d}.safetensors"
        save_file(tensors, str(out / file), metadata={"fingerprint": meta["fingerprint"]})
        shards.append(
            {
                "file": file,
                "rows": part.num_rows,
                "video_id": part.column("video_id").to_pylist(),
                "path": part.column("path").to_pylist(),
                "start": part.column("start").to_pylist(),
                "end": part.column("end").to_pylist(),
            }
        )
    manifest: Dict[str, Any] = {
        "format": "ucofia-search-export/1",
        "root": meta["root"],
        "fingerprint": meta["fingerprint"],
        "source": meta["source"],
        "description": meta["description"],
        "clip_only": meta["clip_only"],
        "shapes": {n: meta["shapes"][n] for n in names},
        "dtype": {n: ("int8" if n == "mask" else "float16") for n in names},
        "count": table.num_rows,
        "shards": shards,
    }
    with open(out / "manifest.json", "w", encoding="utf-8") as f:
        json.dump(manifest, f, indent=1)
    return manifest
