"""Recall of the ANN shortlist (LanceDB's IVF-PQ index over the stored ``vector`` column,
``Store.build_vector_index`` / ``Store.nearest``) against the exact shortlist (the matmul
over every vector, ``scoring.shortlist``), on synthetic vectors written to a real store.

Vectors: d 512, float16 as the store keeps them, unit norm, drawn around 1,000 centres
whose sizes vary (Dirichlet weights: no fixed cluster size). A query is what
``SearchModel.shortlist_query`` gives: a noisy view of one stored vector's latent times a
non-identity projection ``(I + 3 N(0,1)/sqrt(d))``, the shape of ``Wg Wg1^T``. Recall@K =
|ANN top-K & exact top-K| / K, per query; the table gives mean and min over the queries and
the median latency of one ANN query, for each (nprobes, refine_factor).

    python benchmarks/search_ann.py [--rows 1000000] [--queries 50] [--k 100]
        [--partitions P] [--dir /tmp/ucofia_ann_bench] [--keep] [--reuse]

``--reuse`` queries a store left by an earlier ``--keep`` run (same rows and seed) instead
of writing and indexing it again.
"""

from __future__ import annotations

import argparse
import os
import shutil
import time
from pathlib import Path

import numpy as np

from ucofia_jax.search import scoring
from ucofia_jax.search.store import Store, now_iso

D = 512
CENTRES = 1000
CHUNK = 50_000


def _unit(x: np.ndarray) -> np.ndarray:
    return (x / np.linalg.norm(x, axis=-1, keepdims=True)).astype(np.float32)


def _centres(seed: int):
    rng = np.random.default_rng([seed, 0])
    centres = _unit(rng.normal(size=(CENTRES, D)))
    weights = rng.dirichlet(np.full(CENTRES, 0.5))
    return centres, weights


def _latents(lo: int, hi: int, centres, weights, seed: int) -> np.ndarray:
    rng = np.random.default_rng([seed, 1, lo])
    idx = rng.choice(CENTRES, hi - lo, p=weights)
    noise = rng.standard_normal((hi - lo, D), dtype=np.float32) * (0.8 / np.sqrt(D))
    return _unit(centres[idx] + noise)


def _vectors(lo: int, hi: int, centres, weights, seed: int) -> np.ndarray:
    """Stored vectors of rows [lo, hi), float16-rounded as the store keeps them."""
    return _latents(lo, hi, centres, weights, seed).astype(np.float16).astype(np.float32)


def _queries(rows: int, n: int, centres, weights, seed: int) -> np.ndarray:
    rng = np.random.default_rng([seed, 2])
    targets = rng.choice(rows, n, replace=False)
    # The targets' latents, regenerated one chunk at a time.
    by_chunk: dict = {}
    for t in targets.tolist():
        by_chunk.setdefault(t - t % CHUNK, []).append(t)
    picked = []
    for lo, ts in sorted(by_chunk.items()):
        lat = _latents(lo, min(lo + CHUNK, rows), centres, weights, seed)
        picked += [lat[t - lo] for t in ts]
    z = np.stack(picked)
    text = _unit(z + rng.standard_normal(z.shape).astype(np.float32) / np.sqrt(D))
    projection = np.eye(D) + 3.0 * rng.standard_normal((D, D)) / np.sqrt(D)
    return (text @ projection).astype(np.float32)


def _write(path: Path, rows: int, centres, weights, seed: int) -> Store:
    if path.exists():
        shutil.rmtree(path)
    meta = {
        "root": "/synthetic",
        "fingerprint": "benchmark",
        "source": {},
        "description": {},
        "clip_only": True,  # the vector column only: what the shortlist reads
        "shapes": {"vector": [D]},
        "shortlist": 0,
        "created": now_iso(),
        "updated": now_iso(),
    }
    store = Store.create(path, meta)
    for lo in range(0, rows, CHUNK):
        hi = min(lo + CHUNK, rows)
        v = _vectors(lo, hi, centres, weights, seed)
        store.add_rows(
            [
                {
                    "path": f"v{i:08d}.mp4",
                    "content_hash": f"{i:032x}",
                    "size": 0,
                    "mtime_ns": 0,
                    "vector": v[i - lo],
                }
                for i in range(lo, hi)
            ]
        )
        print(f"  wrote {hi} rows", flush=True)
    store.refresh()
    return store


def _exact_top(queries: np.ndarray, rows: int, k: int, centres, weights, seed: int):
    """Exact top-k row positions per query, merged chunk by chunk (no 2 GB matrix)."""
    best_rows = np.zeros((len(queries), 0), np.int64)
    best_scores = np.zeros((len(queries), 0), np.float32)
    for lo in range(0, rows, CHUNK):
        v = _vectors(lo, min(lo + CHUNK, rows), centres, weights, seed)
        s = scoring.coarse_scores(queries, v)
        all_scores = np.concatenate([best_scores, s], axis=1)
        all_rows = np.concatenate(
            [best_rows, np.broadcast_to(np.arange(lo, lo + v.shape[0]), s.shape)], axis=1
        )
        keep = np.stack([scoring.top_k(r, k) for r in all_scores])
        best_scores = np.take_along_axis(all_scores, keep, axis=1)
        best_rows = np.take_along_axis(all_rows, keep, axis=1)
    return best_rows


def main():
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--rows", type=int, default=1_000_000)
    p.add_argument("--queries", type=int, default=50)
    p.add_argument("--k", type=int, default=100)
    p.add_argument("--partitions", type=int, default=0, help="IVF lists (0: sqrt(rows))")
    p.add_argument("--nprobes", default="10,20,50")
    p.add_argument("--refine", default="1,10")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--dir", default="/tmp/ucofia_ann_bench")
    p.add_argument("--keep", action="store_true", help="keep the store")
    p.add_argument("--reuse", action="store_true", help="query the store of an earlier --keep")
    a = p.parse_args()
    path = Path(a.dir) / f"n{a.rows}"
    centres, weights = _centres(a.seed)
    if a.reuse:
        store = Store.open(path)
        write_s = build_s = float("nan")
    else:
        t0 = time.time()
        store = _write(path, a.rows, centres, weights, a.seed)
        write_s = time.time() - t0
        t0 = time.time()
        store.build_vector_index(partitions=a.partitions or None)
        build_s = time.time() - t0
    queries = _queries(a.rows, a.queries, centres, weights, a.seed)
    t0 = time.time()
    exact = _exact_top(queries, a.rows, a.k, centres, weights, a.seed)
    exact_s = (time.time() - t0) / a.queries
    ids = store.read_columns(["video_id"]).column("video_id").to_pylist()
    position = {v: i for i, v in enumerate(ids)}
    mb = sum(f.stat().st_size for f in path.rglob("*") if f.is_file()) / 2**20
    print(
        f"{a.rows} rows x d {D} float16 ({mb:.0f} MiB on disk); IVF-PQ: "
        f"{a.partitions or max(1, round(a.rows**0.5))} partitions, {D // 16} sub-vectors x 8 bits; "
        f"write {write_s:.0f} s, index build {build_s:.0f} s; exact shortlist "
        f"{1000 * exact_s:.0f} ms/query (chunked from regenerated vectors); "
        f"{a.queries} queries, K = {a.k}; {os.cpu_count()} CPUs"
    )
    print("| nprobes | refine_factor | recall@K (mean / min) | p50 ms |\n|---|---|---|---|")
    for nprobes in [int(x) for x in a.nprobes.split(",")]:
        for refine in [int(x) for x in a.refine.split(",")]:
            recalls, lat = [], []
            store.nearest(queries[0], a.k, nprobes=nprobes, refine_factor=refine)  # warm
            for i, q in enumerate(queries):
                t0 = time.perf_counter()
                got = store.nearest(q, a.k, nprobes=nprobes, refine_factor=refine)
                lat.append(time.perf_counter() - t0)
                rows = np.asarray([position[v] for v in got])
                recalls.append(len(set(rows.tolist()) & set(exact[i].tolist())) / a.k)
            print(
                f"| {nprobes} | {refine} | {np.mean(recalls):.3f} / {np.min(recalls):.2f} "
                f"| {1000 * np.median(lat):.0f} |",
                flush=True,
            )
    if not a.keep:
        shutil.rmtree(path, ignore_errors=True)


if __name__ == "__main__":
    main()
