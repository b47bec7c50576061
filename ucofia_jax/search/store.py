"""The index on disk: a LanceDB database (an embedded, versioned columnar store).

Two tables in the index directory:

* ``videos``: one row per stored item: a whole file, or one window (moment) of a file longer
  than the model's window. ``video_id`` (the row key: 16 hex digits of SHA-1 of
  ``"{content_hash}:{start}"`` for a window, of ``content_hash`` for a whole file; identical
  files at two paths share it, and share their features), ``content_hash`` (BLAKE2b of the
  file's bytes), ``path`` (POSIX, relative to the indexed root), ``size`` / ``mtime_ns``
  (what the incremental run compares first), ``start`` / ``end`` (seconds when the row is a
  window, else null), ``duration`` (seconds of the whole file), ``vector`` (the per-video
  feature the shortlist ranks by), the per-video token features the full score needs
  (``frames`` 'f d', ``pixels`` '(f k) d', ``mask`` 'f'; flattened fixed-size lists), all
  float16, and ``thumbnail`` (a JPEG strip of the row's frames, made at index time). With
  ``clip_only`` only ``vector`` (the mean-pooled CLIP frame feature) is stored.
* ``meta``: one row of JSON: the model fingerprint and how to load the model, the feature
  shapes, the root, the window, created / updated times.

Every ``add`` / ``delete`` is one atomic LanceDB commit (a new table version), so a killed
indexer leaves the table at its last committed batch; readers open one version and see a
consistent table while a writer appends. Writers take the index's lease (`writer_lease`:
an ``flock`` on `LEASE_FILE` in the index directory), so two ``index`` runs never interleave.
Indexes written before ``content_hash`` / ``duration`` existed open as they are (the columns
read as null); `Store.migrate` adds them for ``index``, which then re-encodes those rows.
"""

from __future__ import annotations

import contextlib
import datetime
import fcntl
import hashlib
import json
import os
from pathlib import Path
from typing import Any, Dict, Iterable, Iterator, List, Optional, Sequence

import numpy as np
import pyarrow as pa

from ucofia_jax.errors import IndexingError, ModelMismatch, SearchIndexError
from ucofia_jax.search.lance_import import lancedb

VIDEOS = "videos"
META = "meta"
FEATURE_DTYPE = np.float16
TOKEN_COLUMNS = ("frames", "pixels", "mask")
DEFAULT_SHORTLIST = 100  # K of a new index (meta 'shortlist'); docs/search.md: the demo's recall


LEASE_FILE = "writer.lock"  # in the index directory; see writer_lease
# Columns an index written before moments lacks; they read as null (catalogue) until migrate.
ADDED_COLUMNS = {"content_hash": pa.string(), "duration": pa.float64()}


def video_id_for(key: str) -> str:
    """16 hex digits of SHA-1 of ``key`` (`row_id_for` builds the key of a stored row)."""
    return hashlib.sha1(key.encode("utf-8")).hexdigest()[:16]


def row_id_for(content_hash: str, start: Optional[float]) -> str:
    """The row key: from the content and the window's start (None: the whole file), never
    from the path, so identical files get identical keys (and selection noise)."""
    return video_id_for(content_hash if start is None else f"{content_hash}:{float(start)}")


def noise_seed_for(video_id: str) -> int:
    """uint32 seed of a video's selection noise (independent of batch and process)."""
    return int(video_id[:8], 16)


def now_iso() -> str:
    return datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds")


def _fixed(values: np.ndarray, width: int, dtype) -> pa.FixedSizeListArray:
    flat = np.ascontiguousarray(values, dtype=dtype).reshape(-1)
    return pa.FixedSizeListArray.from_arrays(pa.array(flat), width)


def videos_schema(shapes: Dict[str, List[int]], clip_only: bool) -> pa.Schema:
    """``shapes``: per-video feature shapes, e.g. {'vector': [d], 'frames': [f, d], ...}."""
    f16 = pa.float16()
    fields = [
        pa.field("video_id", pa.string()),
        pa.field("content_hash", ADDED_COLUMNS["content_hash"]),
        pa.field("path", pa.string()),
        pa.field("size", pa.int64()),
        pa.field("mtime_ns", pa.int64()),
        pa.field("start", pa.float64()),
        pa.field("end", pa.float64()),
        pa.field("duration", ADDED_COLUMNS["duration"]),
        pa.field("vector", pa.list_(f16, int(np.prod(shapes["vector"])))),
    ]
    if not clip_only:
        fields += [
            pa.field("frames", pa.list_(f16, int(np.prod(shapes["frames"])))),
            pa.field("pixels", pa.list_(f16, int(np.prod(shapes["pixels"])))),
            pa.field("mask", pa.list_(pa.int8(), int(np.prod(shapes["mask"])))),
        ]
    fields.append(pa.field("thumbnail", pa.binary()))
    return pa.schema(fields)


class Store:
    """The LanceDB database of one index (see the module doc)."""

    def __init__(self, path: str | os.PathLike, db, meta: Dict[str, Any]):
        self.path = Path(path)
        self.db = db
        self.meta = meta
        self._table = None

    # ------------------------------------------------------------------ open / create
    @staticmethod
    def exists(path: str | os.PathLike) -> bool:
        return (Path(path) / f"{META}.lance").is_dir() and (Path(path) / f"{VIDEOS}.lance").is_dir()

    @classmethod
    def open(cls, path: str | os.PathLike) -> Store:
        path = Path(path)
        if not path.exists():
            raise SearchIndexError(
                f"{path}: no such index (run `python -m ucofia_jax.search index`)"
            )
        if not cls.exists(path):
            raise SearchIndexError(
                f"{path}: not a ucofia search index (no {META}.lance / {VIDEOS}.lance tables)"
            )
        db = lancedb.connect(str(path))
        rows = db.open_table(META).to_arrow().column("json").to_pylist()
        if len(rows) != 1:
            raise SearchIndexError(f"{path}: the {META} table holds {len(rows)} rows, expected 1")
        return cls(path, db, json.loads(rows[0]))

    @classmethod
    def create(cls, path: str | os.PathLike, meta: Dict[str, Any]) -> Store:
        path = Path(path)
        cls.check_creatable(path)
        path.mkdir(parents=True, exist_ok=True)
        db = lancedb.connect(str(path))
        schema = videos_schema(meta["shapes"], meta["clip_only"])
        if VIDEOS not in db.list_tables().tables:
            db.create_table(VIDEOS, schema=schema)
        store = cls(path, db, meta)
        store.write_meta()  # last: an index is usable once its meta exists
        return store

    @classmethod
    def check_creatable(cls, path: Path) -> None:
        """Refuses a directory that holds anything but an index (or its lease file)."""
        if path.is_dir() and not cls.exists(path):
            if any(p.name != LEASE_FILE for p in path.iterdir()):
                raise SearchIndexError(
                    f"{path}: exists and is not a ucofia search index; not touching it"
                )
        elif path.exists() and not path.is_dir():
            raise SearchIndexError(f"{path}: exists and is not a directory (--index)")

    def check_fingerprint(self, fingerprint: str, source: Dict[str, Any]) -> None:
        """Raise :class:`ModelMismatch` unless the index was made by the model with
        ``fingerprint`` (``source``: how that model was loaded, for the message)."""
        fp = self.meta["fingerprint"]
        if fp != fingerprint:
            raise ModelMismatch(
                f"{self.path}: the index was made by another model (fingerprint {fp}, from "
                f"{_source_words(self.meta['source'])}); this model is {fingerprint} (from "
                f"{_source_words(source)}). Query with the index's model, or index into a new "
                "--index"
            )

    def write_meta(self) -> None:
        data = pa.table({"json": [json.dumps(self.meta, sort_keys=True)]})
        exists = META in self.db.list_tables().tables
        self.db.create_table(META, data, mode="overwrite" if exists else "create")

    @property
    def table(self):
        if self._table is None:
            self._table = self.db.open_table(VIDEOS)
        return self._table

    def refresh(self) -> None:
        self._table = None

    # ------------------------------------------------------------------ read
    CATALOGUE = ("video_id", "content_hash", "path", "size", "mtime_ns", "start", "end", "duration")

    def catalogue(self) -> pa.Table:
        """`CATALOGUE` of every row (no features); columns an old index lacks are null."""
        return self.read_columns(self.CATALOGUE)

    def missing_columns(self) -> List[str]:
        """Columns of this version that the index lacks (written by an older version)."""
        return [c for c in ADDED_COLUMNS if c not in self.table.schema.names]

    def migrate(self) -> None:
        """Adds the columns an older index lacks, as nulls (one commit); ``index`` then
        treats its rows as changed and re-encodes them."""
        missing = self.missing_columns()
        if missing:
            sql = {"string": "STRING", "double": "DOUBLE"}
            self.table.add_columns(
                {c: f"CAST(NULL AS {sql[str(ADDED_COLUMNS[c])]})" for c in missing}
            )
            self.refresh()

    def __len__(self) -> int:
        return self.table.count_rows()

    def read_columns(self, columns: Sequence[str]) -> pa.Table:
        """Whole columns, in table order, reading only those columns from disk; the
        `ADDED_COLUMNS` an old index lacks come back as nulls."""
        have = set(self.table.schema.names)
        present = [c for c in columns if c in have]
        n = self.table.count_rows()
        if n == 0:
            table = self.table.schema.empty_table().select(present)
        else:
            table = self.table.search().select(present).limit(n).to_arrow()
        for name in columns:
            if name not in have and name in ADDED_COLUMNS:
                kind = ADDED_COLUMNS[name]
                table = table.append_column(pa.field(name, kind), pa.nulls(len(table), kind))
        return table.select(list(columns))

    def take(self, offsets: Sequence[int], columns: Sequence[str]) -> pa.Table:
        """Rows at ``offsets`` (positions in the table version opened), in the order given."""
        offsets = np.asarray(offsets, np.int64)
        order = np.argsort(offsets, kind="stable")
        got = self.table.take_offsets([int(i) for i in offsets[order]]).select(list(columns))
        got = got.to_arrow()
        back = np.empty_like(order)
        back[order] = np.arange(len(order))
        return got.take(pa.array(back))

    # ------------------------------------------------------------------ write
    def delete_paths(self, paths: Iterable[str]) -> int:
        """Deletes every row of these files (all their windows); returns how many files."""
        paths = sorted(set(paths))
        for lo in range(0, len(paths), 500):  # bounded predicate size
            self.table.delete(f"path IN ({', '.join(_sql_str(p) for p in paths[lo : lo + 500])})")
        return len(paths)

    def update_stat(self, path: str, size: int, mtime_ns: int) -> None:
        """New size / mtime for a file whose content did not change (no re-encode)."""
        self.table.update(
            where=f"path = {_sql_str(path)}", values={"size": int(size), "mtime_ns": int(mtime_ns)}
        )

    def add_rows(self, rows: List[Dict[str, Any]]) -> None:
        """One atomic commit of stored rows: dicts with content_hash, path, size, mtime_ns,
        start, end, duration, thumbnail and the feature arrays (float32/float16 numpy, cast
        to float16 here); the row key comes from content_hash and start."""
        if not rows:
            return
        schema = self.table.schema
        cols: Dict[str, Any] = {
            "video_id": [row_id_for(r["content_hash"], r.get("start")) for r in rows],
            "content_hash": [r["content_hash"] for r in rows],
            "path": [r["path"] for r in rows],
            "size": [int(r["size"]) for r in rows],
            "mtime_ns": [int(r["mtime_ns"]) for r in rows],
            "start": [r.get("start") for r in rows],
            "end": [r.get("end") for r in rows],
            "duration": [r.get("duration") for r in rows],
        }
        for name in ("vector",) + (() if self.meta["clip_only"] else TOKEN_COLUMNS):
            width = schema.field(name).type.list_size
            dtype = np.int8 if name == "mask" else FEATURE_DTYPE
            cols[name] = _fixed(np.stack([r[name] for r in rows]), width, dtype)
        cols["thumbnail"] = [r.get("thumbnail") for r in rows]
        self.table.add(pa.table(cols, schema=schema))

    # ================================================================== vector index (ANN)
    # Owned by the query side (search/index.py); `index` calls maybe_build_vector_index at
    # its end. From VECTOR_INDEX_MIN_ROWS rows the shortlist runs on a LanceDB vector index
    # over `vector` with the dot product (the coarse score is a query vector's dot product
    # with it) and a query host holds no vectors in memory; below, the exact matmul is fast
    # and small enough (2 KB per row as float32). Type, threshold and query settings are
    # measured choices (benchmarks/search_ann.py; docs/search.md, "Past one machine's
    # memory: the vector index", has the tables): at 50k rows IVF_SQ built 7x faster than
    # IVF_PQ on the float16 column and kept more of the exact shortlist; IVF_HNSW_SQ kept
    # as much but built 2x slower (1.4x at 1M), its graphs adding nothing within lists of
    # a few hundred to a thousand rows.
    VECTOR_INDEX_TYPES = ("IVF_PQ", "IVF_SQ", "IVF_HNSW_SQ")
    VECTOR_INDEX_TYPE = "IVF_SQ"
    # At 1M rows the index kept 99.0-99.9% of the exact top-100 (demo-calibrated queries,
    # two builds), and an Index opened in 2 s instead of reading 2 GB of vectors for 13 s;
    # below that the exact matmul is cheap and each host's vectors affordable.
    VECTOR_INDEX_MIN_ROWS = 1_000_000
    VECTOR_INDEX_NAME = "vector_idx"
    VECTOR_INDEX_NPROBES = 50  # IVF lists searched per query (of sqrt(rows): 1,000 at 1M)
    VECTOR_INDEX_REFINE = 10  # 10 K quantised candidates re-scored: +0.02 recall at 1M
    VECTOR_INDEX_EF = 100  # HNSW candidates per list (IVF_HNSW_SQ only; 300: same recall)

    def has_vector_index(self) -> bool:
        """Whether the `vector` column has a LanceDB vector index."""
        return any("vector" in cfg.columns for cfg in self.table.list_indices())

    def maybe_build_vector_index(self, min_rows: Optional[int] = None) -> bool:
        """Build the vector index when the table has at least ``min_rows`` rows and none
        yet, or rebuild it when more than a tenth of the rows are not in it (LanceDB scans
        unindexed rows exactly, which grows with them). Returns whether it (re)built."""
        n = self.table.count_rows()
        if n < (self.VECTOR_INDEX_MIN_ROWS if min_rows is None else min_rows):
            return False
        if self.has_vector_index():
            stats = self.table.index_stats(self.VECTOR_INDEX_NAME)
            if stats is None or stats.num_unindexed_rows * 10 <= n:
                return False
        self.build_vector_index()
        return True

    def build_vector_index(
        self,
        *,
        index_type: Optional[str] = None,
        partitions: Optional[int] = None,
        sub_vectors: Optional[int] = None,
    ) -> None:
        """A vector index of ``index_type`` (default `VECTOR_INDEX_TYPE`) over `vector` by
        the dot product, with ``partitions`` IVF lists (default sqrt(rows)). IVF_PQ codes
        each vector as ``sub_vectors`` (default d / 16) 8-bit codes; IVF_SQ as one 8-bit
        value per dimension; IVF_HNSW_SQ adds an HNSW graph within each list."""
        index_type = self.VECTOR_INDEX_TYPE if index_type is None else index_type
        if index_type not in self.VECTOR_INDEX_TYPES:
            raise ValueError(
                f"vector index type {index_type!r}: not one of {', '.join(self.VECTOR_INDEX_TYPES)}"
            )
        n = self.table.count_rows()
        d = self.table.schema.field("vector").type.list_size
        lists = int(partitions or max(1, round(n**0.5)))
        if index_type == "IVF_PQ":
            config = lancedb.index.IvfPq(
                distance_type="dot",
                num_partitions=lists,
                num_sub_vectors=int(sub_vectors or max(1, d // 16)),
            )
        elif index_type == "IVF_SQ":
            config = lancedb.index.IvfSq(distance_type="dot", num_partitions=lists)
        else:
            config = lancedb.index.IvfHnswSq(distance_type="dot", num_partitions=lists)
        self.table.create_index("vector", config=config, replace=True, name=self.VECTOR_INDEX_NAME)
        self.refresh()

    def nearest(
        self,
        query: np.ndarray,
        k: int,
        *,
        nprobes: Optional[int] = None,
        refine_factor: Optional[int] = None,
        ef: Optional[int] = None,
    ) -> List[str]:
        """video_id of the ``k`` rows with the largest ``query . vector``, best first, by
        the vector index (approximate: ``nprobes`` IVF lists are searched, within each an
        HNSW search keeps ``ef`` candidates (at least those asked for) where the index has
        graphs, then the best ``refine_factor * k`` quantised candidates are re-scored with
        their stored vectors; refine_factor 0 skips that; defaults: the class's settings);
        an exact scan when there is no index."""
        nprobes = self.VECTOR_INDEX_NPROBES if nprobes is None else nprobes
        refine_factor = self.VECTOR_INDEX_REFINE if refine_factor is None else refine_factor
        ef = self.VECTOR_INDEX_EF if ef is None else ef
        q = np.asarray(query, np.float32).reshape(-1)
        search = self.table.search(q, vector_column_name="vector").distance_type("dot")
        if self.has_vector_index():
            # LanceDB asks the index for refine_factor x k candidates, and HNSW refuses an
            # ef below the count it is asked for.
            asked = int(k) * max(1, int(refine_factor))
            search = search.nprobes(int(nprobes)).ef(max(int(ef), asked))
            if refine_factor:
                search = search.refine_factor(int(refine_factor))
        # _distance selected explicitly: lance warns on every query where it is implied.
        got = search.select(["video_id", "_distance"]).limit(int(k)).to_arrow()
        return got.column("video_id").to_pylist()


def _sql_str(text: str) -> str:
    """A SQL string literal of ``text`` for a LanceDB predicate."""
    return "'" + text.replace("'", "''") + "'"


@contextlib.contextmanager
def writer_lease(path: str | os.PathLike) -> Iterator[None]:
    """Holds the index's writer lease (an exclusive ``flock`` on `LEASE_FILE`, released when
    the process ends, however it ends) or raises `IndexingError` naming the index."""
    path = Path(path)
    Store.check_creatable(path)
    path.mkdir(parents=True, exist_ok=True)
    fd = os.open(path / LEASE_FILE, os.O_RDWR | os.O_CREAT, 0o644)
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            raise IndexingError(
                f"{path}: another `index` is writing to this index ({LEASE_FILE} is held); "
                "wait for it to finish or use another --index"
            ) from None
        yield
    finally:
        os.close(fd)  # closing the descriptor releases the lock


def _source_words(src: Dict) -> str:
    parts = [f"{k}={v}" for k, v in src.items() if v and k != "config"]
    return ", ".join(parts) or "?"


def features_from_arrow(table: pa.Table, shapes: Dict[str, List[int]]) -> Dict[str, np.ndarray]:
    """The fixed-size-list feature columns of ``table`` as float32 (int32 mask) arrays
    shaped [rows, *shapes[name]]."""
    out = {}
    for name in table.column_names:
        if name not in shapes:
            continue
        col = table.column(name).combine_chunks()
        flat = np.asarray(col.flatten().to_numpy(zero_copy_only=False))
        dtype = np.int32 if name == "mask" else np.float32
        out[name] = flat.astype(dtype).reshape((len(table), *shapes[name]))
    return out
