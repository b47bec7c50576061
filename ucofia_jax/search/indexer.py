"""``index``: walk a folder, decode in worker processes, encode in batches, commit per file.

* **Moments.** A file longer than the model's window (``max_frames / feature_framerate``
  seconds, or ``window``) is stored as overlapping windows (``stride`` apart, default half a
  window), one row each with ``start`` / ``end``; a shorter file is one row. Each file is
  decoded once, streaming (``decoding.decode_file``).
* **Incremental, by content.** Files are compared with the stored rows by (size, mtime);
  where those differ the content hash decides: the same content only gets its size / mtime
  updated (``touch`` re-encodes nothing), other content is re-encoded. New files are added,
  deleted ones dropped. Rows left by an older version (no content hash) and duplicate rows
  (one path and start twice, from concurrent runs before the writer lease) are re-encoded.
  Stale rows are deleted first, in one commit, so a changed file is afterwards simply "not
  indexed yet".
* **Kill-safe.** All rows of a file are one atomic LanceDB commit (with the other files that
  complete in the same batch); a killed run loses only files in flight, and a rerun (which
  plans from what is committed) adds each missing file exactly once.
* **One writer.** ``index`` holds the index's writer lease (``store.writer_lease``) for its
  whole run; a second ``index`` on the same index stops with one line.
* **Parallel.** ``workers`` spawned processes decode ahead of the encoder
  (``decoding.DecodePool``; they die with this process), the main process encodes full
  batches (padded to one shape: one compile) and writes them.
* **Multi-process.** Under ``jax.distributed`` (launch.sh), process 0 holds the lease, deletes
  the stale rows and updates the touched ones, every process then takes every
  ``process_count``-th file of the same sorted plan, and all append to the same table
  (LanceDB appends of several writers commit without conflict).
* **Symlinks.** A link whose target lies outside the indexed folder is skipped with a reason
  unless ``follow_symlinks`` (the server then may read files outside the folder).
* Bad files are skipped with the decoder's reason (``data_pipeline.video``); ``strict``
  raises ``IndexingError`` naming the first one instead.
"""

from __future__ import annotations

import collections
import contextlib
import dataclasses
import os
import time
from pathlib import Path
from typing import Callable, Dict, Iterator, List, Optional

import numpy as np
from tqdm import tqdm

from data_pipeline.records import SkipReport
from ucofia_jax.errors import IndexingError
from ucofia_jax.runtime import distributed
from ucofia_jax.search import decoding, query_model
from ucofia_jax.search.source import SearchModel
from ucofia_jax.search.store import (
    DEFAULT_SHORTLIST,
    Store,
    noise_seed_for,
    now_iso,
    row_id_for,
    writer_lease,
)

DEFAULT_BATCH = 16
SUMMARY_NAMES = 5  # files named per category in the summary
OUTSIDE_LINK = "symlink to outside the indexed folder"


@dataclasses.dataclass(frozen=True)
class FileInfo:
    rel: str  # POSIX path relative to the root
    path: str  # absolute
    size: int
    mtime_ns: int


@dataclasses.dataclass
class Plan:
    new: List[FileInfo]
    changed: List[FileInfo]  # other content, or rows to rewrite (old format, duplicates)
    deleted: List[str]
    unchanged: int  # touched ones included
    touched: List[FileInfo] = dataclasses.field(default_factory=list)  # same content, new stat
    hashes: Dict[str, str] = dataclasses.field(default_factory=dict)  # rel -> hashed here

    @property
    def to_encode(self) -> List[FileInfo]:
        return sorted(self.new + self.changed, key=lambda f: f.rel)


def _names(files: List[str]) -> str:
    shown = ", ".join(files[:SUMMARY_NAMES])
    more = len(files) - SUMMARY_NAMES
    return shown + (f" (+{more} more)" if more > 0 else "")


@dataclasses.dataclass
class Summary:
    indexed: int = 0
    unchanged: int = 0
    removed: int = 0
    changed: int = 0
    skipped: SkipReport = dataclasses.field(default_factory=SkipReport)
    total: int = 0  # files in the index
    rows: int = 0  # stored rows (whole files + windows)
    seconds: float = 0.0
    added_files: List[str] = dataclasses.field(default_factory=list)
    changed_files: List[str] = dataclasses.field(default_factory=list)
    removed_files: List[str] = dataclasses.field(default_factory=list)
    touched_files: List[str] = dataclasses.field(default_factory=list)

    def lines(self) -> List[str]:
        rate = self.indexed / self.seconds if self.seconds > 0 else 0.0
        out = [
            f"indexed {self.indexed} ({self.changed} changed), unchanged {self.unchanged}, "
            f"removed {self.removed}, skipped {len(self.skipped)}; {self.total} videos in the "
            f"index ({self.rows} rows); {self.seconds:.1f} s ({rate:.2f} videos/s)"
        ]
        for label, files in (
            ("added", self.added_files),
            ("changed", self.changed_files),
            ("removed", self.removed_files),
            ("same content, new time stamp", self.touched_files),
        ):
            if files:
                out.append(f"  {label}: {_names(files)}")
        entries = list(self.skipped)
        for e in entries[: 2 * SUMMARY_NAMES]:
            detail = f" ({e['detail']})" if e["detail"] else ""
            out.append(f"  skipped {e['file']}: {e['reason']}{detail}")
        if len(entries) > 2 * SUMMARY_NAMES:
            out.append(f"  ... and {len(entries) - 2 * SUMMARY_NAMES} more skipped")
        return out


def _inside(target: Path, root: Path) -> bool:
    return target == root or root in target.parents


def scan(
    root: str | os.PathLike,
    exclude: Optional[Path] = None,
    *,
    follow_symlinks: bool = False,
    skipped: Optional[SkipReport] = None,
) -> List[FileInfo]:
    """Video files under ``root`` (recursive, by suffix, case-insensitive), sorted by path.
    Hidden directories and ``exclude`` (the index itself, when it lies inside) are skipped.
    Symlinks are resolved: one whose target lies outside ``root`` is left out (and listed in
    ``skipped``) unless ``follow_symlinks``; a link to a folder inside ``root`` is not walked
    (its files are found where they are); a broken link is listed in ``skipped``."""
    root = Path(root).resolve()
    if not root.is_dir():
        raise IndexingError(f"{root}: not a directory (--videos)")
    skipped = SkipReport() if skipped is None else skipped
    out = []
    walked = set()  # real folders walked: a link cycle under follow_symlinks ends here
    for dirpath, dirnames, filenames in os.walk(root, followlinks=follow_symlinks):
        here = Path(dirpath)
        walked.add(here.resolve())
        keep = []
        for d in sorted(dirnames):
            sub = here / d
            if d.startswith(".") or (exclude is not None and sub == exclude):
                continue
            if sub.is_symlink():
                target = sub.resolve()
                rel = sub.relative_to(root).as_posix() + "/"
                if not _inside(target, root) and not follow_symlinks:
                    skipped.add(rel, OUTSIDE_LINK, f"-> {target}; --follow_symlinks")
                    continue
                if target in walked or (exclude is not None and target == exclude):
                    continue
            keep.append(d)
        dirnames[:] = keep
        for name in filenames:
            if name.startswith(".") or not name.lower().endswith(decoding.VIDEO_SUFFIXES):
                continue
            p = here / name
            rel = p.relative_to(root).as_posix()
            if p.is_symlink():
                target = p.resolve()
                if not target.exists():
                    skipped.add(rel, "broken symlink", f"-> {target}")
                    continue
                if not _inside(target, root) and not follow_symlinks:
                    skipped.add(rel, OUTSIDE_LINK, f"-> {target}; --follow_symlinks")
                    continue
            try:
                st = p.stat()
            except OSError:
                continue
            out.append(FileInfo(rel, str(p), st.st_size, st.st_mtime_ns))
    return sorted(out, key=lambda f: f.rel)


def make_plan(
    store: Store, files: List[FileInfo], hash_file: Callable[[str], str] = decoding.content_hash
) -> Plan:
    """What to do with each file: see the module doc (``hash_file`` is called only for files
    whose size or mtime differs from their stored rows')."""
    cat = store.catalogue().to_pydict()
    stored = collections.defaultdict(list)  # path -> [(size, mtime_ns, content_hash, start)]
    for p, size, mtime, digest, start in zip(
        cat["path"], cat["size"], cat["mtime_ns"], cat["content_hash"], cat["start"]
    ):
        stored[p].append((size, mtime, digest, start))
    plan = Plan([], [], [], 0)
    for f in files:
        rows = stored.get(f.rel)
        if rows is None:
            plan.new.append(f)
            continue
        digests = {r[2] for r in rows}
        starts = [r[3] for r in rows]
        rewrite = (
            None in digests
            or len(digests) > 1
            or len(set(starts)) != len(starts)  # duplicate rows
            or len({(r[0], r[1]) for r in rows}) > 1
        )
        if rewrite:
            plan.changed.append(f)
        elif (rows[0][0], rows[0][1]) == (f.size, f.mtime_ns):
            plan.unchanged += 1
        else:
            try:
                digest = hash_file(f.path)
            except OSError:  # unreadable now: re-encode, whose decoder names the problem
                plan.changed.append(f)
                continue
            plan.hashes[f.rel] = digest
            if digest == rows[0][2]:
                plan.touched.append(f)
                plan.unchanged += 1
            else:
                plan.changed.append(f)
    present = {f.rel for f in files}
    plan.deleted = sorted(p for p in stored if p not in present)
    return plan


@contextlib.contextmanager
def run_lease(index_path: Path) -> Iterator[None]:
    """The writer lease for this run: held by process 0 (the only process of a standalone
    run); under launch.sh every process learns whether process 0 got it, so all stop with
    the same one-line error, or all go on."""
    if distributed.process_count() == 1:
        with writer_lease(index_path):
            yield
        return
    distributed.sync("search_lease")
    with contextlib.ExitStack() as stack:
        failure: Optional[IndexingError] = None
        if distributed.is_main_process():
            try:
                stack.enter_context(writer_lease(index_path))
            except IndexingError as e:
                failure = e
        refused = distributed.process_allgather(np.asarray([failure is not None], np.int32))
        if failure is not None:
            raise failure
        if int(np.max(refused)):
            raise IndexingError(
                f"{index_path}: another `index` is writing to this index (process 0 could "
                "not take its lease); wait for it to finish or use another --index"
            )
        yield


def open_or_create(
    index_path: str | os.PathLike,
    root: Path,
    model: SearchModel,
    shortlist: int,
    window: Optional[float] = None,
    stride: Optional[float] = None,
) -> Store:
    """The index at ``index_path``, created for ``model`` and ``root`` if absent; an existing
    one must have been made by the same model, for the same folder and (where ``window`` /
    ``stride`` are given) with the same windows. ``meta['window']`` holds the windows used."""
    # Every process answers "does it exist?" before process 0 may create it (barriers on
    # both sides), so all take the same branch.
    distributed.sync("search_index_check")
    exists = Store.exists(index_path)
    distributed.sync("search_index_checked")
    seconds, step = decoding.window_of(model.sampling, window, stride)
    if exists:
        store = Store.open(index_path)
        store.check_fingerprint(model.fingerprint, model.source.to_dict())
        if Path(store.meta["root"]) != root:
            raise IndexingError(
                f"{index_path}: indexes {store.meta['root']}, not {root}; use another --index"
            )
        stored = store.meta.get("window")
        if stored is None:  # made before moments: every row is re-encoded, with these
            store.meta["window"] = {"seconds": seconds, "stride": step}
        elif (window is not None or stride is not None) and (
            (stored["seconds"], stored["stride"]) != (seconds, step)
        ):
            raise IndexingError(
                f"{index_path}: its moments are cut with --window {stored['seconds']:g} "
                f"--stride {stored['stride']:g}, not --window {seconds:g} --stride {step:g}; "
                "use those or another --index"
            )
        return store
    meta = {
        "format": 1,
        "root": str(root),
        "fingerprint": model.fingerprint,
        "source": model.source.absolute().to_dict(),
        "description": model.description,
        "step": model.step,
        "clip_only": model.clip_only,
        "shapes": model.feature_shapes(),
        "shortlist": int(shortlist),
        "window": {"seconds": seconds, "stride": step},
        "created": now_iso(),
        "updated": now_iso(),
    }
    if distributed.is_main_process():
        Store.create(index_path, meta)
    distributed.sync("search_index_created")
    return Store.open(index_path)


def build_index(
    videos: str | os.PathLike,
    index_path: str | os.PathLike,
    model: SearchModel,
    *,
    workers: int = 2,
    batch_size: int = DEFAULT_BATCH,
    strict: bool = False,
    progress: bool = True,
    shortlist: int = DEFAULT_SHORTLIST,
    window: Optional[float] = None,
    stride: Optional[float] = None,
    follow_symlinks: bool = False,
    log: Callable[[str], None] = print,
) -> Summary:
    """Indexes (incrementally) the video files under ``videos`` into ``index_path``.
    ``window`` / ``stride``: seconds of the moments of long files (None: the model's window
    ``max_frames / feature_framerate``, stride half of it; an existing index keeps its own)."""
    t0 = time.time()
    root = Path(videos).resolve()
    index_path = Path(index_path).resolve()
    summary = Summary()
    files = scan(root, exclude=index_path, follow_symlinks=follow_symlinks, skipped=summary.skipped)
    with run_lease(index_path):
        store = open_or_create(index_path, root, model, shortlist, window, stride)
        if distributed.is_main_process() and store.missing_columns():
            store.migrate()
        distributed.sync("search_index_migrated")
        store.refresh()
        plan = make_plan(store, files)
        distributed.sync("search_planned")  # all plan from the same version
        summary.unchanged, summary.changed = plan.unchanged, len(plan.changed)
        summary.removed, summary.removed_files = len(plan.deleted), plan.deleted
        summary.touched_files = [f.rel for f in plan.touched]
        if distributed.is_main_process():
            if plan.deleted or plan.changed:
                store.delete_paths(plan.deleted + [f.rel for f in plan.changed])
            for f in plan.touched:
                store.update_stat(f.rel, f.size, f.mtime_ns)
        distributed.sync("search_stale_rows_deleted")
        store.refresh()
        changed = {f.rel for f in plan.changed}
        _encode_files(store, model, plan, summary, changed, workers, batch_size, strict, progress)
        distributed.sync("search_index_written")
        store.refresh()
        if distributed.is_main_process():
            store.meta["updated"] = now_iso()
            store.write_meta()
            if query_model.fingerprint_of_file(index_path) != model.fingerprint:
                query_model.save(model, index_path, store.meta["shapes"])  # what `query` loads
            build_vector_index = getattr(store, "maybe_build_vector_index", None)
            if build_vector_index is not None:  # the ANN index, where the store offers one
                build_vector_index()
        distributed.sync("search_index_finished")
    catalogue = store.catalogue()
    summary.rows = catalogue.num_rows
    summary.total = len(set(catalogue.column("path").to_pylist()))
    summary.seconds = time.time() - t0
    return summary


def _encode_files(store, model, plan, summary, changed, workers, batch_size, strict, progress):
    """Decodes this process's share of the plan's files and commits their rows."""
    pid, count = distributed.process_index(), distributed.process_count()
    mine = plan.to_encode[pid::count]
    seconds, step = store.meta["window"]["seconds"], store.meta["window"]["stride"]
    jobs = [
        dict(
            model.decode_job(f.path, f.rel),
            window=seconds,
            stride=step,
            content_hash=plan.hashes.get(f.rel),
        )
        for f in mine
    ]
    by_rel = {f.rel: f for f in mine}
    bar = tqdm(
        total=len(jobs),
        unit="video",
        disable=not progress,
        desc=f"indexing{f' (process {pid})' if count > 1 else ''}",
        dynamic_ncols=True,
    )

    def committed(rels: List[str]) -> None:
        for rel in rels:
            summary.indexed += 1
            (summary.changed_files if rel in changed else summary.added_files).append(rel)

    writer = _RowWriter(store, model, by_rel, batch_size, committed)
    try:
        with decoding.DecodePool(workers) as pool:
            for message in pool.messages(jobs):
                kind, rel = message["kind"], message["rel"]
                if kind == "moment":
                    writer.add(message)
                elif kind == "done":
                    writer.finish(rel, message["duration"])
                    bar.update(1)
                else:  # skip
                    writer.drop(rel)
                    if strict:
                        raise IndexingError(
                            f"{by_rel[rel].path}: {message['reason']}"
                            + (f" ({message['detail']})" if message["detail"] else "")
                            + " (--strict)"
                        )
                    summary.skipped.add(rel, message["reason"], message["detail"])
                    bar.update(1)
        writer.close()
    finally:
        bar.close()


class _RowWriter:
    """Encodes moments in batches of ``batch_size`` (padded: one shape, one compile) and
    commits a file's rows, all in one commit, once its decode is done and all its moments
    are encoded; ``committed`` hears the files of each commit."""

    def __init__(self, store, model, by_rel, batch_size: int, committed):
        self.store, self.model, self.by_rel = store, model, by_rel
        self.batch_size, self.committed = batch_size, committed
        self.batch: List[dict] = []  # moments not encoded yet
        self.encoded: Dict[str, List[dict]] = collections.defaultdict(list)  # rel -> rows
        self.durations: Dict[str, Optional[float]] = {}  # files whose decode is done

    def add(self, moment: dict) -> None:
        self.batch.append(moment)
        if len(self.batch) >= self.batch_size:
            self._encode()

    def finish(self, rel: str, duration: Optional[float]) -> None:
        self.durations[rel] = duration
        self._commit_ready()

    def drop(self, rel: str) -> None:
        self.batch = [m for m in self.batch if m["rel"] != rel]
        self.encoded.pop(rel, None)
        self.durations.pop(rel, None)

    def close(self) -> None:
        self._encode()

    def _encode(self) -> None:
        if self.batch:
            feats = _encode_moments(self.model, self.batch, self.batch_size)
            for i, m in enumerate(self.batch):
                f = self.by_rel[m["rel"]]
                row = {
                    "content_hash": m["content_hash"],
                    "path": f.rel,
                    "size": f.size,
                    "mtime_ns": f.mtime_ns,
                    "start": m["start"],
                    "end": m["end"],
                    "thumbnail": m["thumbnail"],
                }
                row.update({k: v[i] for k, v in feats.items()})
                self.encoded[m["rel"]].append(row)
            self.batch = []
        self._commit_ready()

    def _commit_ready(self) -> None:
        waiting = {m["rel"] for m in self.batch}
        ready = [rel for rel in self.durations if rel not in waiting]
        if not ready:
            return
        rows = []
        for rel in ready:
            duration = self.durations.pop(rel)
            for row in self.encoded.pop(rel, []):
                rows.append(dict(row, duration=duration))
        self.store.add_rows(rows)
        self.committed(ready)


def _encode_moments(model: SearchModel, batch: List[dict], batch_size: int) -> Dict:
    """Features of the moments of ``batch``, each with its own selection noise keyed by its
    row key (content + start)."""
    n = len(batch)
    frames = np.stack([m["frames"] for m in batch])
    mask = np.stack([m["mask"] for m in batch]).astype(np.int32)
    seeds = np.asarray(
        [noise_seed_for(row_id_for(m["content_hash"], m["start"])) for m in batch], np.uint32
    )
    if n < batch_size:  # one shape, one compile: pad with copies of the first moment
        pad = batch_size - n
        frames = np.concatenate([frames, np.repeat(frames[:1], pad, 0)])
        mask = np.concatenate([mask, np.repeat(mask[:1], pad, 0)])
        seeds = np.concatenate([seeds, np.repeat(seeds[:1], pad, 0)])
    feats = model.encode_frames(frames, mask, seeds)
    return {k: v[:n] for k, v in feats.items()}
