"""The Python API: ``Index.open(path)``, ``index.search(texts, top)``, ``no_good_match``,
``index.thumbnail``, ``index.describe``, and ``encode_videos(paths, model)``.

An ``Index`` reads one committed version of the store: the catalogue (ids, paths, times)
is loaded once, and so are the shortlist vectors (4 bytes x d per row as float32) unless
the store has a vector index (``Store.has_vector_index``): then the shortlist is LanceDB's
approximate search and no vectors are held. The token features of the K candidates are read
per query (``take`` by row position). The model is loaded on the first search, from the
model saved in the index (``search/query_model.py``), else from the source the index
remembers, unless one is passed in; a model with another fingerprint is refused.
"""

from __future__ import annotations

import dataclasses
import os
import threading
from pathlib import Path
from typing import TYPE_CHECKING, Any, Dict, List, Optional, Sequence

import jax
import numpy as np

from ucofia_jax.errors import IndexingError
from ucofia_jax.search import query_model, scoring
from ucofia_jax.search.store import (
    DEFAULT_SHORTLIST,
    TOKEN_COLUMNS,
    Store,
    features_from_arrow,
    noise_seed_for,
    video_id_for,
)

if TYPE_CHECKING:  # Flax comes with it: a query with the index's compiled model skips it
    from ucofia_jax.search.source import SearchModel

DEFAULT_TOP = 10
DEFAULT_PER_FILE = 1  # hits per file (moments of one long file) unless asked for more


@dataclasses.dataclass(frozen=True)
class Hit:
    """One result: ``rank`` 1-based, ``score`` the full UCoFiA score (the evaluation's
    similarity; the CLIP cosine with clip_only), ``confidence`` in [0, 1] (how far the score
    stands above the query's background, ``scoring.confidence``), ``path`` POSIX relative
    to ``Index.root``, ``start`` / ``end`` seconds when the row is a window of a longer file
    (else None), ``video_id`` the row key, ``duration`` the whole file's seconds if known."""

    rank: int
    score: float
    confidence: float
    path: str
    start: Optional[float]
    end: Optional[float]
    video_id: str
    duration: Optional[float] = None


def no_good_match(hits: Sequence[Hit]) -> bool:
    """True when a query found nothing that stands out from the collection's background:
    no hits, or the best hit's confidence is below one half (``scoring.is_no_good_match``)."""
    return scoring.is_no_good_match([h.confidence for h in hits])


@dataclasses.dataclass(frozen=True)
class Ranked:
    """One text's shortlist re-ranked: ``rows`` (positions) best first with their full
    ``scores``, their ``coarse`` scores, and ``z``: each coarse score in standard deviations
    above the query's coarse scores on the background sample (what ``confidence`` maps)."""

    rows: np.ndarray
    scores: np.ndarray
    coarse: np.ndarray
    z: np.ndarray


class Index:
    """A search index on disk (see the module doc)."""

    def __init__(self, store: Store, model: Optional[SearchModel] = None):
        self.store = store
        self.meta = store.meta
        self._model = model
        if model is not None:
            store.check_fingerprint(model.fingerprint, model.source.to_dict())
        self._lock = threading.Lock()  # the web page may search from several threads
        # Indexes written before moments have no duration column: every value is then None.
        has = set(store.table.schema.names)
        self._ann = store.has_vector_index()
        columns = ["video_id", "path", "start", "end"] + [c for c in ("duration",) if c in has]
        cat = store.read_columns(columns + ([] if self._ann else ["vector"]))
        self._ids: List[str] = cat.column("video_id").to_pylist()
        self._paths: List[str] = cat.column("path").to_pylist()
        self._starts = cat.column("start").to_pylist()
        self._ends = cat.column("end").to_pylist()
        self._durations = (
            cat.column("duration").to_pylist() if "duration" in has else [None] * len(self._ids)
        )
        self._row_of_id = {v: i for i, v in enumerate(self._ids)}
        self._path_set = set(self._paths)
        shapes = self.meta["shapes"]
        self._vectors = (
            None
            if self._ann
            else features_from_arrow(cat.select(["vector"]), shapes).get(
                "vector", np.zeros((0, *shapes["vector"]), np.float32)
            )
        )
        # The background of the confidence: a fixed sample of rows (every row of a smaller
        # collection), whose vectors stay in memory (8 MB at d 512 with a vector index).
        background = scoring.background_rows(len(self._ids))
        if self._vectors is not None:
            self._background_vectors = self._vectors[background]
        else:
            got = store.take(background, ["vector"])
            self._background_vectors = features_from_arrow(got, shapes)["vector"]

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
        """Relative paths of the stored rows, in row order (``search_rows``' indices); a long
        file's windows each have a row."""
        return list(self._paths)

    @property
    def shortlist_k(self) -> int:
        return int(self.meta.get("shortlist", DEFAULT_SHORTLIST))

    @property
    def approximate(self) -> bool:
        """Whether the shortlist runs on the store's vector index (no vectors in memory)."""
        return self._ann

    @property
    def model(self) -> SearchModel:
        """The model of the index: its saved query model (``query_model``), else the one
        the index remembers loaded from its source, whose query side is then saved (where
        the index can be written) for the next process."""
        with self._lock:
            if self._model is None:
                model = query_model.load(
                    self.store.path, self.meta["fingerprint"], self.meta["shapes"]
                )
                if model is None:
                    model = self._model_from_source()
                    try:
                        query_model.save(model, self.store.path, self.meta["shapes"])
                    except OSError:
                        pass  # a read-only index: every process loads the source instead
                self._model = model
            return self._model

    def _model_from_source(self) -> SearchModel:
        from ucofia_jax.search.source import ModelSource, load_model  # noqa: PLC0415 -- Flax

        model = load_model(ModelSource.from_dict(self.meta["source"]), overrides=None)
        self.store.check_fingerprint(model.fingerprint, model.source.to_dict())
        return model

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
            "approximate_shortlist": self._ann,
            "root": m["root"],
        }

    # ------------------------------------------------------------------ query
    def _fetch(self, rows: np.ndarray) -> Dict[str, np.ndarray]:
        columns = [] if self.meta["clip_only"] else list(TOKEN_COLUMNS)
        if self._ann:
            columns.append("vector")
        if not columns:
            return {"vector": self._vectors[rows]}
        got = self.store.take(rows, ["video_id", *columns])
        ids = got.column("video_id").to_pylist()
        if ids != [self._ids[r] for r in rows]:  # the table moved under us: a bug, not input
            raise RuntimeError(f"{self.store.path}: row lookup returned other videos")
        feats = features_from_arrow(got, self.meta["shapes"])
        if not self._ann:
            feats["vector"] = self._vectors[rows]
        return feats

    def _shortlists(self, queries: np.ndarray, k: int) -> List[np.ndarray]:
        """Per query vector: the row positions of its K best rows by the coarse score."""
        if not self._ann:
            return list(scoring.shortlist(queries, self._vectors, k))
        out = []
        for q in queries:
            ids = self.store.nearest(q, k)
            # A row committed after this index was opened is not in its catalogue: skipped.
            rows = [self._row_of_id[v] for v in ids if v in self._row_of_id]
            out.append(np.asarray(rows, np.int64))
        return out

    def rank(self, texts: Sequence[str], shortlist: Optional[int] = None) -> List[Ranked]:
        """Per text: its K-row shortlist (default K: the index's) re-ranked by the full score,
        best first, with each row's coarse score and its standard score against the
        query's coarse scores on the background sample."""
        if isinstance(texts, str):
            raise TypeError("Index.search takes a list of texts, got one str")
        if len(self) == 0 or not texts:
            empty = np.zeros((0,), np.int64)
            none = np.zeros((0,), np.float32)
            return [Ranked(empty, none, none, none) for _ in texts]
        model = self.model
        text = model.encode_texts(texts)
        k = self.shortlist_k if shortlist is None else int(shortlist)
        out = []
        with self._lock:  # one query at a time through the jitted scorer
            queries = model.shortlist_query(text)
            background = scoring.coarse_scores(queries, self._background_vectors)
            for i, rows in enumerate(self._shortlists(queries, max(k, 1))):
                if len(rows) == 0:
                    none = np.zeros((0,), np.float32)
                    out.append(Ranked(rows, none, none, none))
                    continue
                feats = self._fetch(rows)
                full = np.asarray(model.score(_text_row(text, i), feats))[0]
                coarse = scoring.coarse_scores(queries[i : i + 1], feats["vector"])[0]
                order = scoring.top_k(np.asarray(full, np.float64), len(rows))
                z = scoring.standard_scores(coarse[order], background[i])
                out.append(Ranked(rows[order], full[order], coarse[order], z))
        return out

    def search_rows(
        self, texts: Sequence[str], top: int = DEFAULT_TOP, shortlist: Optional[int] = None
    ) -> List[tuple]:
        """Per text (row indices, scores), best first, of the K-row shortlist (default the
        index's) re-ranked: the ``top`` best rows, windows of one file not merged."""
        k = None if shortlist is None else max(int(shortlist), int(top))
        return [(r.rows[:top], r.scores[:top]) for r in self.rank(texts, k)]

    def search(
        self,
        texts: Sequence[str],
        top: int = DEFAULT_TOP,
        shortlist: Optional[int] = None,
        per_file: int = DEFAULT_PER_FILE,
    ) -> List[List[Hit]]:
        """One list of ``Hit`` per text, best first: overlapping windows of one file merged
        (non-maximum suppression), at most ``per_file`` hits per file, at most ``top``."""
        k = None if shortlist is None else max(int(shortlist), int(top))
        out = []
        for r in self.rank(texts, k):
            rows = r.rows.tolist()
            keep = scoring.select_hits(
                r.scores,
                [self._paths[j] for j in rows],
                [self._starts[j] for j in rows],
                [self._ends[j] for j in rows],
                top=int(top),
                per_file=int(per_file),
            )
            conf = scoring.confidence(r.z[keep]) if len(keep) else np.zeros((0,))
            out.append(
                [
                    Hit(
                        rank=n + 1,
                        score=float(r.scores[j]),
                        confidence=float(c),
                        path=self._paths[rows[j]],
                        start=self._starts[rows[j]],
                        end=self._ends[rows[j]],
                        video_id=self._ids[rows[j]],
                        duration=self._durations[rows[j]],
                    )
                    for n, (j, c) in enumerate(zip(keep.tolist(), conf.tolist()))
                ]
            )
        return out

    def contains_path(self, path: object) -> bool:
        """Whether ``path`` (relative, as in ``Hit.path``) is a stored file."""
        return path in self._path_set

    def __contains__(self, path: object) -> bool:
        """``contains_path`` (the older spelling, kept for callers written before moments)."""
        return self.contains_path(path)

    def thumbnail(self, video_id: str) -> Optional[bytes]:
        """The JPEG stored for the row ``video_id`` (``Hit.video_id``); None if unknown."""
        row = self._row_of_id.get(video_id)
        if row is None:
            return None
        got = self.store.take([row], ["video_id", "thumbnail"])
        if got.column("video_id")[0].as_py() != video_id:
            return None
        return got.column("thumbnail")[0].as_py()


def _text_row(text, i: int):
    """Text ``i`` of a batch of text features, kept as a batch of one."""
    return jax.tree.map(lambda x: x[i : i + 1], text)


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
    # The video decoder (PyAV, PIL) loads here: a query never decodes, and their import is
    # ~0.07 s of its start (docs/search.md, "Speed").
    from data_pipeline.video import VideoDecodeError  # noqa: PLC0415
    from ucofia_jax.search.decoding import content_hash, decode_one  # noqa: PLC0415

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
