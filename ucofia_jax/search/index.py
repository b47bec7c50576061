"""The Python API: ``Index.open(path)``, ``index.search(texts, top)``, ``index.thumbnail``,
``index.describe``, and ``encode_videos(paths, model)``.

An ``Index`` reads one committed version of the store: the catalogue and the shortlist
vectors are loaded once (4 bytes x d per video as float32), the token features of the K
candidates are read per query (``take`` by row position). The model is loaded on the first
search, from the source the index remembers, unless one is passed in; a model with another
fingerprint is refused.
"""

from __future__ import annotations

import dataclasses
import os
import threading
from pathlib import Path
from typing import Any, Dict, List, Optional, Sequence

import jax
import numpy as np

from data_pipeline.video import VideoDecodeError
from ucofia_jax.errors import IndexingError
from ucofia_jax.search import scoring
from ucofia_jax.search.decoding import content_hash, decode_one
from ucofia_jax.search.source import ModelSource, SearchModel, load_model
from ucofia_jax.search.store import (
    DEFAULT_SHORTLIST,
    TOKEN_COLUMNS,
    Store,
    features_from_arrow,
    noise_seed_for,
    video_id_for,
)

DEFAULT_TOP = 10


@dataclasses.dataclass(frozen=True)
class Hit:
    """One result: ``rank`` 1-based, ``score`` the full UCoFiA score (the evaluation's
    similarity; the CLIP cosine with clip_only), ``path`` POSIX relative to ``Index.root``,
    ``start`` / ``end`` seconds when the stored item is a segment (else None)."""

    rank: int
    score: float
    path: str
    start: Optional[float]
    end: Optional[float]
    video_id: str


class Index:
    """A search index on disk (see the module doc)."""

    def __init__(self, store: Store, model: Optional[SearchModel] = None):
        self.store = store
        self.meta = store.meta
        self._model = model
        if model is not None:
            store.check_fingerprint(model.fingerprint, model.source.to_dict())
        self._lock = threading.Lock()  # the web page may search from several threads
        cat = store.read_columns(["video_id", "path", "start", "end", "vector"])
        self._ids: List[str] = cat.column("video_id").to_pylist()
        self._paths: List[str] = cat.column("path").to_pylist()
        self._starts = cat.column("start").to_pylist()
        self._ends = cat.column("end").to_pylist()
        self._row_of_path = {p: i for i, p in enumerate(self._paths)}
        shapes = self.meta["shapes"]
        self._vectors = features_from_arrow(cat.select(["vector"]), shapes).get(
            "vector", np.zeros((0, *shapes["vector"]), np.float32)
        )

    # ------------------------------------------------------------------ open
    @classmethod
    def open(cls, path, model: Optional[SearchModel] = None) -> Index:
        """The index at ``path`` (raises ``IndexingError`` naming the path if it is none)."""
        try:
            store = Store.open(path)
        except Exception as e:  # lancedb / JSON errors of a broken directory
            raise IndexingError(str(e) if str(path) in str(e) else f"{path}: {e}") from e
        return cls(store, model)

    @property
    def root(self) -> Path:
        return Path(self.meta["root"])

    def __len__(self) -> int:
        return len(self._paths)

    @property
    def paths(self) -> List[str]:
        """Relative paths of the stored videos, in row order (``search_rows``' indices)."""
        return list(self._paths)

    @property
    def shortlist_k(self) -> int:
        return int(self.meta.get("shortlist", DEFAULT_SHORTLIST))

    @property
    def model(self) -> SearchModel:
        with self._lock:
            if self._model is None:
                model = load_model(ModelSource.from_dict(self.meta["source"]), overrides=None)
                self.store.check_fingerprint(model.fingerprint, model.source.to_dict())
                self._model = model
            return self._model

    def describe(self) -> Dict[str, Any]:
        m = self.meta
        return {
            "fingerprint": m["fingerprint"],
            "source": m["source"],
            "step": m.get("step"),
            "count": len(self),
            "created": m["created"],
            "updated": m["updated"],
            "clip_only": bool(m["clip_only"]),
            "shortlist": self.shortlist_k,
            "root": m["root"],
        }

    # ------------------------------------------------------------------ query
    def _fetch(self, rows: np.ndarray) -> Dict[str, np.ndarray]:
        if self.meta["clip_only"]:
            return {"vector": self._vectors[rows]}
        got = self.store.take(rows, ["video_id", *TOKEN_COLUMNS])
        ids = got.column("video_id").to_pylist()
        if ids != [self._ids[r] for r in rows]:  # the table moved under us: a bug, not input
            raise RuntimeError(f"{self.store.path}: row lookup returned other videos")
        feats = features_from_arrow(got, self.meta["shapes"])
        feats["vector"] = self._vectors[rows]
        return feats

    def search_rows(
        self, texts: Sequence[str], top: int = DEFAULT_TOP, shortlist: Optional[int] = None
    ) -> List[tuple]:
        """Per text (row indices, scores), best first; ``shortlist`` K (default the index's)."""
        if isinstance(texts, str):
            raise TypeError("Index.search takes a list of texts, got one str")
        if len(self) == 0 or not texts:
            return [(np.zeros((0,), int), np.zeros((0,), np.float32)) for _ in texts]
        model = self.model
        text = model.encode_texts(texts)
        k = self.shortlist_k if shortlist is None else int(shortlist)
        with self._lock:  # one query at a time through the jitted scorer
            return scoring.two_stage(
                text,
                text.sentence,
                self._vectors,
                k=k,
                top=int(top),
                fetch=self._fetch,
                score=model.score,
                text_row=lambda t, i: jax.tree.map(lambda x: x[i : i + 1], t),
            )

    def search(
        self, texts: Sequence[str], top: int = DEFAULT_TOP, shortlist: Optional[int] = None
    ) -> List[List[Hit]]:
        """One list of ``Hit`` per text, best first."""
        out = []
        for rows, scores in self.search_rows(texts, top, shortlist):
            out.append(
                [
                    Hit(
                        rank=j + 1,
                        score=float(s),
                        path=self._paths[r],
                        start=self._starts[r],
                        end=self._ends[r],
                        video_id=self._ids[r],
                    )
                    for j, (r, s) in enumerate(zip(rows.tolist(), scores.tolist()))
                ]
            )
        return out

    def __contains__(self, path: object) -> bool:
        """Whether ``path`` (relative, as in ``Hit.path``) is a stored video."""
        return path in self._row_of_path

    def thumbnail(self, path: str) -> Optional[bytes]:
        """The JPEG stored for ``path`` (relative, as in ``Hit.path``); None if unknown."""
        row = self._row_of_path.get(path)
        if row is None:
            return None
        got = self.store.take([row], ["video_id", "thumbnail"])
        if got.column("video_id")[0].as_py() != self._ids[row]:
            return None
        return got.column("thumbnail")[0].as_py()


def encode_videos(
    paths: Sequence[str],
    model: SearchModel,
    *,
    batch_size: int = 16,
    noise_keys: Optional[Sequence[str]] = None,
) -> Dict:
    """Features of video files without an index: {'vector', 'frames', 'pixels', 'mask'}
    float32 [len(paths), ...] (only 'vector' with clip_only), each file decoded whole with the
    training sampling. Each video's selection noise is keyed by ``noise_keys[i]`` (default:
    the file's content hash, as an index keys a whole-file row, so the features equal the
    indexed ones and identical files get identical features). Raises
    ``data_pipeline.video.VideoDecodeError`` for a bad file."""
    parts: List[Dict[str, np.ndarray]] = []
    paths = [str(p) for p in paths]
    if noise_keys is None:  # an unreadable file keeps its path: its decode names the problem
        keys = [content_hash(p) if os.path.isfile(p) else p for p in paths]
    else:
        keys = [str(k) for k in noise_keys]
    if len(keys) != len(paths):
        raise ValueError(f"encode_videos: {len(paths)} paths but {len(keys)} noise_keys")
    for lo in range(0, len(paths), batch_size):
        chunk = paths[lo : lo + batch_size]
        decoded = [decode_one(model.decode_job(p, p)) for p in chunk]
        for d in decoded:
            if "reason" in d:
                raise VideoDecodeError(d["rel"], d["reason"], d["detail"])
        frames = np.stack([d["frames"] for d in decoded])
        mask = np.stack([d["mask"] for d in decoded])
        seeds = np.asarray(
            [
                noise_seed_for(video_id_for(k)) for k in keys[lo : lo + batch_size]
            ]  # = row_id_for(k, None), np.uint32
        )
        parts.append(model.encode_frames(frames, mask, seeds))
    if not parts:
        raise ValueError("encode_videos: no paths")
    return {k: np.concatenate([p[k] for p in parts]) for k in parts[0]}
