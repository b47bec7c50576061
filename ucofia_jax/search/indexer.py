"""``index``: walk a folder, decode in worker processes, encode in batches, commit per batch.

* **Incremental.** Files are compared with the stored rows by (size, mtime): new files are
  added, changed ones re-encoded, deleted ones dropped, unchanged ones skipped. Stale rows
  (changed or deleted files) are deleted first, in one commit, so a changed file is
  afterwards simply "not indexed yet".
* **Kill-safe.** Each batch is one atomic LanceDB commit; a killed run loses only the batch in
  flight, and a rerun (which plans from what is committed) adds each missing file exactly once.
* **Parallel.** ``workers`` spawned processes run ``decoding.decode_one`` ahead of the encoder
  (a bounded window of jobs), the main process encodes full batches (padded to one shape: one
  compile) and writes them.
* **Multi-process.** Under ``jax.distributed`` (launch.sh), process 0 deletes the stale rows,
  every process then takes every ``process_count``-th file of the same sorted plan, and all
  append to the same table (LanceDB appends of several writers commit without conflict).
* Bad files are skipped with the decoder's reason (``data_pipeline.video``); ``strict``
  raises ``IndexingError`` naming the first one instead.
"""

from __future__ import annotations

import collections
import concurrent.futures as futures
import dataclasses
import multiprocessing
import os
import time
from pathlib import Path
from typing import Callable, Iterator, List, Optional

import numpy as np
from tqdm import tqdm

from data_pipeline.records import SkipReport
from ucofia_jax.errors import IndexingError
from ucofia_jax.runtime import distributed
from ucofia_jax.search import decoding
from ucofia_jax.search.source import SearchModel
from ucofia_jax.search.store import (
    DEFAULT_SHORTLIST,
    Store,
    noise_seed_for,
    now_iso,
    video_id_for,
)

DEFAULT_BATCH = 16


@dataclasses.dataclass(frozen=True)
class FileInfo:
    rel: str  # POSIX path relative to the root
    path: str  # absolute
    size: int
    mtime_ns: int


@dataclasses.dataclass
class Plan:
    new: List[FileInfo]
    changed: List[FileInfo]
    deleted: List[str]
    unchanged: int

    @property
    def to_encode(self) -> List[FileInfo]:
        return sorted(self.new + self.changed, key=lambda f: f.rel)


@dataclasses.dataclass
class Summary:
    indexed: int = 0
    unchanged: int = 0
    removed: int = 0
    changed: int = 0
    skipped: SkipReport = dataclasses.field(default_factory=SkipReport)
    total: int = 0
    seconds: float = 0.0

    def lines(self) -> List[str]:
        rate = self.indexed / self.seconds if self.seconds > 0 else 0.0
        out = [
            f"indexed {self.indexed} ({self.changed} changed), unchanged {self.unchanged}, "
            f"removed {self.removed}, skipped {len(self.skipped)}; {self.total} videos in the "
            f"index; {self.seconds:.1f} s ({rate:.2f} videos/s)"
        ]
        for e in self.skipped:
            detail = f" ({e['detail']})" if e["detail"] else ""
            out.append(f"  skipped {e['file']}: {e['reason']}{detail}")
        return out


def scan(root: str | os.PathLike, exclude: Optional[Path] = None) -> List[FileInfo]:
    """Video files under ``root`` (recursive, by suffix, case-insensitive), sorted by path.
    Hidden directories and ``exclude`` (the index itself, when it lies inside) are skipped."""
    root = Path(root).resolve()
    if not root.is_dir():
        raise IndexingError(f"{root}: not a directory (--videos)")
    out = []
    for dirpath, dirnames, filenames in os.walk(root):
        here = Path(dirpath)
        dirnames[:] = sorted(
            d
            for d in dirnames
            if not d.startswith(".") and (exclude is None or here / d != exclude)
        )
        for name in filenames:
            if name.startswith(".") or not name.lower().endswith(decoding.VIDEO_SUFFIXES):
                continue
            p = here / name
            try:
                st = p.stat()
            except OSError:
                continue
            out.append(FileInfo(p.relative_to(root).as_posix(), str(p), st.st_size, st.st_mtime_ns))
    return sorted(out, key=lambda f: f.rel)


def make_plan(store: Store, files: List[FileInfo]) -> Plan:
    cat = store.catalogue().to_pydict()
    stored = {p: (s, m) for p, s, m in zip(cat["path"], cat["size"], cat["mtime_ns"])}
    new, changed, unchanged = [], [], 0
    for f in files:
        if f.rel not in stored:
            new.append(f)
        elif stored[f.rel] != (f.size, f.mtime_ns):
            changed.append(f)
        else:
            unchanged += 1
    present = {f.rel for f in files}
    deleted = sorted(p for p in stored if p not in present)
    return Plan(new, changed, deleted, unchanged)


def _decoded(jobs: List[dict], workers: int) -> Iterator[dict]:
    """Decode results in job order; with workers, a bounded window runs ahead."""
    if workers <= 0:
        for job in jobs:
            yield decoding.decode_one(job)
        return
    window = max(4 * workers, 8)
    ctx = multiprocessing.get_context("spawn")  # no fork of a process that runs jax
    with futures.ProcessPoolExecutor(max_workers=workers, mp_context=ctx) as pool:
        pending = collections.deque()
        it = iter(jobs)
        for job in it:
            pending.append(pool.submit(decoding.decode_one, job))
            if len(pending) >= window:
                break
        while pending:
            result = pending.popleft().result()
            nxt = next(it, None)
            if nxt is not None:
                pending.append(pool.submit(decoding.decode_one, nxt))
            yield result


def open_or_create(
    index_path: str | os.PathLike, root: Path, model: SearchModel, shortlist: int
) -> Store:
    """The index at ``index_path``, created for ``model`` and ``root`` if absent; an existing
    one must have been made by the same model and for the same folder."""
    # Every process answers "does it exist?" before process 0 may create it (barriers on
    # both sides), so all take the same branch.
    distributed.sync("search_index_check")
    exists = Store.exists(index_path)
    distributed.sync("search_index_checked")
    if exists:
        store = Store.open(index_path)
        store.check_fingerprint(model.fingerprint, model.source.to_dict())
        if Path(store.meta["root"]) != root:
            raise IndexingError(
                f"{index_path}: indexes {store.meta['root']}, not {root}; use another --index"
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
    log: Callable[[str], None] = print,
) -> Summary:
    """Indexes (incrementally) the video files under ``videos`` into ``index_path``."""
    t0 = time.time()
    root = Path(videos).resolve()
    index_path = Path(index_path).resolve()
    files = scan(root, exclude=index_path)
    store = open_or_create(index_path, root, model, shortlist)
    summary = Summary()
    plan = make_plan(store, files)
    summary.unchanged, summary.changed = plan.unchanged, len(plan.changed)
    summary.removed = len(plan.deleted)
    if distributed.is_main_process() and (plan.deleted or plan.changed):
        store.delete_paths(plan.deleted + [f.rel for f in plan.changed])
    distributed.sync("search_stale_rows_deleted")
    store.refresh()
    todo = make_plan(store, files).to_encode  # after the deletions: changed files are new
    pid, count = distributed.process_index(), distributed.process_count()
    mine = todo[pid::count]
    jobs = [model.decode_job(f.path, f.rel) for f in mine]
    by_rel = {f.rel: f for f in mine}

    bar = tqdm(
        total=len(jobs),
        unit="video",
        disable=not progress,
        desc=f"indexing{f' (process {pid})' if count > 1 else ''}",
        dynamic_ncols=True,
    )
    batch: List[dict] = []

    def flush():
        if batch:
            _encode_and_commit(store, model, batch, by_rel, batch_size)
            summary.indexed += len(batch)
            bar.update(len(batch))
            batch.clear()

    try:
        for res in _decoded(jobs, workers):
            if "reason" in res:
                if strict:
                    raise IndexingError(
                        f"{by_rel[res['rel']].path}: {res['reason']}"
                        + (f" ({res['detail']})" if res["detail"] else "")
                        + " (--strict)"
                    )
                summary.skipped.add(res["rel"], res["reason"], res["detail"])
                bar.update(1)
                continue
            batch.append(res)
            if len(batch) >= batch_size:
                flush()
        flush()
    finally:
        bar.close()
    distributed.sync("search_index_written")
    store.refresh()
    if distributed.is_main_process():
        store.meta["updated"] = now_iso()
        store.write_meta()
    summary.total = len(store)
    summary.seconds = time.time() - t0
    return summary


def _encode_and_commit(store: Store, model: SearchModel, batch, by_rel, batch_size: int):
    n = len(batch)
    frames = np.stack([r["frames"] for r in batch])
    mask = np.stack([r["mask"] for r in batch]).astype(np.int32)
    seeds = np.asarray([noise_seed_for(video_id_for(r["rel"])) for r in batch], np.uint32)
    if n < batch_size:  # one shape, one compile: pad with copies of the first video
        pad = batch_size - n
        frames = np.concatenate([frames, np.repeat(frames[:1], pad, 0)])
        mask = np.concatenate([mask, np.repeat(mask[:1], pad, 0)])
        seeds = np.concatenate([seeds, np.repeat(seeds[:1], pad, 0)])
    feats = model.encode_frames(frames, mask, seeds)
    rows = []
    for i, r in enumerate(batch):
        f = by_rel[r["rel"]]
        row = {"path": f.rel, "size": f.size, "mtime_ns": f.mtime_ns, "start": None, "end": None}
        row.update({k: v[i] for k, v in feats.items()})
        row["thumbnail"] = r["thumbnail"]
        rows.append(row)
    store.add_rows(rows)
