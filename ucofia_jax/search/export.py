"""``export``: the stored features with their metadata, for other tools.

``OUT/shard-00000.safetensors`` ... (at most ``rows_per_shard`` rows each -- a row is a
whole file or one window of a long one; tensors
``vector`` [n, d] and, unless clip_only, ``frames`` [n, f, d], ``pixels`` [n, f*k, d],
``mask`` [n, f], float16 as stored (mask int8)) and ``OUT/manifest.json``: the index's model
fingerprint, source, shapes, window, and per shard its file name, row count and the rows'
``video_id``, ``content_hash``, ``path``, ``start``, ``end``, ``duration`` in tensor order
(``content_hash`` / ``duration`` null for rows of an index made before they existed). Files
are written with the usual permissions (0644 under umask 022).
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any, Dict

import numpy as np
from safetensors.numpy import save

from ucofia_jax.search.store import TOKEN_COLUMNS, Store

DEFAULT_ROWS_PER_SHARD = 4096
LISTED = ("video_id", "content_hash", "path", "start", "end", "duration")  # per row, manifest


def plural(count: int, word: str) -> str:
    """'1 shard', '2 shards'."""
    return f"{count} {word}{'' if count == 1 else 's'}"


def summary_line(manifest: Dict[str, Any], out_dir: str | os.PathLike) -> str:
    """What ``export`` prints: rows, files and shards written, and where."""
    files = len({p for shard in manifest["shards"] for p in shard["path"]})
    return (
        f"wrote {plural(manifest['count'], 'row')} ({plural(files, 'video')}) in "
        f"{plural(len(manifest['shards']), 'shard')} to {out_dir}"
    )


def export(store: Store, out_dir: str | os.PathLike, rows_per_shard: int = DEFAULT_ROWS_PER_SHARD):
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    meta = store.meta
    names = ["vector"] + ([] if meta["clip_only"] else list(TOKEN_COLUMNS))
    table = store.read_columns([*LISTED, *names])  # nulls for columns an old index lacks
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
        # safetensors' save_file writes mode 0600; plain open() follows the umask.
        with open(out / file, "wb") as f:
            f.write(save(tensors, metadata={"fingerprint": meta["fingerprint"]}))
        shard: Dict[str, Any] = {"file": file, "rows": part.num_rows}
        shard.update({name: part.column(name).to_pylist() for name in LISTED})
        shards.append(shard)
    manifest: Dict[str, Any] = {
        "format": "ucofia-search-export/1",
        "root": meta["root"],
        "fingerprint": meta["fingerprint"],
        "source": meta["source"],
        "description": meta["description"],
        "clip_only": meta["clip_only"],
        "shapes": {n: meta["shapes"][n] for n in names},
        "dtype": {n: ("int8" if n == "mask" else "float16") for n in names},
        "window": meta.get("window"),
        "count": table.num_rows,
        "shards": shards,
    }
    with open(out / "manifest.json", "w", encoding="utf-8") as f:
        json.dump(manifest, f, indent=1)
    return manifest
