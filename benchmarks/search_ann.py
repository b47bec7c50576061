"""Recall of the ANN shortlist (a LanceDB vector index over the stored ``vector`` column,
``Store.build_vector_index`` / ``Store.nearest``) against the exact shortlist (the matmul
over every vector, ``scoring.shortlist``), on synthetic vectors written to a real store.

Vectors: d 512, float16 as the store keeps them, unit norm, drawn around 1,000 centres
whose sizes vary (Dirichlet weights: no fixed cluster size). Queries, two modes (each
query's target is one stored row):

* ``calibrated``: ``unit(cos_t target + sin_t u)`` with ``u`` a random unit vector
  orthogonal to the target and the angle ``t`` normal, its median and 90th percentile set
  so that ``cos_t`` has the median / 10th percentile measured on the trained demo model
  between a caption's coarse query and its video's stored vector (0.686 / 0.542).
* ``projected``: what ``SearchModel.shortlist_query`` would give through a random head: a
  noisy view of the target's latent times ``(I + 3 N(0,1)/sqrt(d))`` (far less aligned
  with its target than the trained model's queries: a pessimistic case).

Recall@K = |ANN top-K & exact top-K| / K, per query; the table gives mean and min over the
queries, the fraction of queries whose target row is in the exact / the ANN top-K, and the
median latency of one ANN query, for each query-time setting the index type has (nprobes
and refine_factor; ef for IVF_HNSW_SQ). ``--exact_in_memory`` also times the exact path as
``Index`` runs it without a vector index (every vector read into memory, then a matmul).

    python benchmarks/search_ann.py [--rows 1000000] [--index_type IVF_SQ]
        [--queries 50] [--k 100] [--queries_mode calibrated,projected] [--partitions P]
        [--nprobes 10,20,50] [--refine 0,10] [--ef 100,200] [--dir /tmp/ucofia_ann_bench]
        [--keep] [--reuse [--rebuild]] [--exact_in_memory]

``--reuse`` queries a store left by an earlier ``--keep`` run (same rows and seed) instead
of writing and indexing it again (the index it has: ``--index_type`` / ``--partitions``
then only label the table); ``--reuse --rebuild`` builds ``--index_type`` on it first.
"""

from __future__ import annotations

import argparse
import os
import shutil
import sys
import time
from pathlib import Path

import numpy as np

from ucofia_jax.errors import UserError
from ucofia_jax.search import scoring
from ucofia_jax.search.index import Index
from ucofia_jax.search.store import Store, features_from_arrow, now_iso

D = 512
CENTRES = 1000
CHUNK = 50_000
# Trained demo model (100 test captions, 500 videos): cosine between a caption's coarse
# query and its target video's stored vector, median and 10th percentile (docs/search.md).
DEMO_COS_MEDIAN, DEMO_COS_P10 = 0.686, 0.542
Z_P90 = 1.2815515655446004  # standard normal 90th percentile
QUERY_MODES = ("calibrated", "projected")


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


def _targets(rows: int, n: int, seed: int) -> np.ndarray:
    return np.random.default_rng([seed, 2]).choice(rows, n, replace=False)


def _by_chunk(rows: int, targets: np.ndarray, make) -> np.ndarray:
    """``make(lo, hi)[t - lo]`` for each target t, each chunk made once."""
    by_chunk: dict = {}
    for j, t in enumerate(targets.tolist()):
        by_chunk.setdefault(t - t % CHUNK, []).append((j, t))
    out = [None] * len(targets)
    for lo, jts in sorted(by_chunk.items()):
        made = make(lo, min(lo + CHUNK, rows))
        for j, t in jts:
            out[j] = made[t - lo]
    return np.stack(out)


def calibrated_angles(n: int, rng: np.random.Generator) -> np.ndarray:
    """Angles t (radians) between query and target, normal with the median acos(0.686)
    and the 90th percentile acos(0.542), so that cos t has the demo's median and 10th
    percentile (cos is decreasing on [0, pi/2]: quantiles map through it); clipped to
    [0, pi/2]."""
    mid, p90 = np.arccos(DEMO_COS_MEDIAN), np.arccos(DEMO_COS_P10)
    return np.clip(mid + (p90 - mid) / Z_P90 * rng.standard_normal(n), 0.0, np.pi / 2)


def _queries_calibrated(rows: int, n: int, centres, weights, seed: int) -> np.ndarray:
    rng = np.random.default_rng([seed, 3])
    targets = _unit(
        _by_chunk(
            rows, _targets(rows, n, seed), lambda lo, hi: _vectors(lo, hi, centres, weights, seed)
        )
    )
    u = rng.standard_normal(targets.shape).astype(np.float32)
    u = _unit(u - np.sum(u * targets, axis=1, keepdims=True) * targets)
    t = calibrated_angles(n, rng)[:, None]
    return _unit(np.cos(t) * targets + np.sin(t) * u)


def _queries_projected(rows: int, n: int, centres, weights, seed: int) -> np.ndarray:
    rng = np.random.default_rng([seed, 2, 1])
    z = _by_chunk(
        rows, _targets(rows, n, seed), lambda lo, hi: _latents(lo, hi, centres, weights, seed)
    )
    text = _unit(z + rng.standard_normal(z.shape).astype(np.float32) / np.sqrt(D))
    projection = np.eye(D) + 3.0 * rng.standard_normal((D, D)) / np.sqrt(D)
    return (text @ projection).astype(np.float32)


def _queries(mode: str, rows: int, n: int, centres, weights, seed: int) -> np.ndarray:
    make = _queries_calibrated if mode == "calibrated" else _queries_projected
    return make(rows, n, centres, weights, seed)


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


def _ints(text: str) -> list:
    return [int(x) for x in text.split(",")]


def _settings(index_type: str, a) -> list:
    """(nprobes, ef, refine_factor) rows of the table; ef only where the type has graphs."""
    efs = _ints(a.ef) if index_type == "IVF_HNSW_SQ" else [None]
    return [
        (nprobes, ef, refine)
        for nprobes in _ints(a.nprobes)
        for ef in efs
        for refine in _ints(a.refine)
    ]


def _time_exact_in_memory(store: Store, queries: dict, k: int) -> None:
    """What an Index without a vector index does: read every vector, then per query the
    matmul shortlist over all of them; and how long an Index over this store (which has a
    vector index) takes to open: catalogue and background sample, no vectors."""
    t0 = time.time()
    Index(store)
    open_s = time.time() - t0
    t0 = time.time()
    vectors = features_from_arrow(store.read_columns(["vector"]), store.meta["shapes"])["vector"]
    load_s = time.time() - t0
    lat = []
    for q in np.concatenate(list(queries.values())):
        t0 = time.perf_counter()
        scoring.shortlist(q[None], vectors, k)
        lat.append(time.perf_counter() - t0)
    print(
        f"exact path in memory: read every vector {load_s:.1f} s "
        f"({vectors.nbytes / 2**20:.0f} MiB as {vectors.dtype}); shortlist p50 "
        f"{1000 * np.median(lat):.0f} ms/query; an Index with the vector index opens in "
        f"{open_s:.1f} s",
        flush=True,
    )


def main():
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--rows", type=int, default=1_000_000)
    p.add_argument(
        "--index_type", default=Store.VECTOR_INDEX_TYPE, choices=Store.VECTOR_INDEX_TYPES
    )
    p.add_argument("--queries", type=int, default=50, help="per query mode")
    p.add_argument(
        "--queries_mode",
        default=",".join(QUERY_MODES),
        help="comma list of: " + ", ".join(QUERY_MODES),
    )
    p.add_argument("--k", type=int, default=100)
    p.add_argument("--partitions", type=int, default=0, help="IVF lists (0: sqrt(rows))")
    p.add_argument("--nprobes", default="10,20,50")
    p.add_argument("--refine", default="0,10", help="refine_factor (0: no re-scoring)")
    p.add_argument("--ef", default="100,200", help="HNSW candidates (IVF_HNSW_SQ only)")
    p.add_argument(
        "--exact_in_memory",
        action="store_true",
        help="also time the exact path as Index runs it: every vector read into memory "
        "(2 KB per row as float32), then the matmul shortlist per query",
    )
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--dir", default="/tmp/ucofia_ann_bench")
    p.add_argument("--keep", action="store_true", help="keep the store")
    p.add_argument("--reuse", action="store_true", help="query the store of an earlier --keep")
    p.add_argument(
        "--rebuild", action="store_true", help="with --reuse: build --index_type on it first"
    )
    a = p.parse_args()
    modes = a.queries_mode.split(",")
    for mode in modes:
        if mode not in QUERY_MODES:
            p.error(f"--queries_mode {mode!r}: not one of {', '.join(QUERY_MODES)}")
    path = Path(a.dir) / f"n{a.rows}"
    centres, weights = _centres(a.seed)
    write_s = build_s = float("nan")
    if a.reuse:
        store = Store.open(path)
    else:
        t0 = time.time()
        store = _write(path, a.rows, centres, weights, a.seed)
        write_s = time.time() - t0
    if a.rebuild or not a.reuse:
        print(f"  building {a.index_type}", flush=True)
        t0 = time.time()
        store.build_vector_index(index_type=a.index_type, partitions=a.partitions or None)
        build_s = time.time() - t0
        print(f"  built in {build_s:.0f} s", flush=True)
    queries = {m: _queries(m, a.rows, a.queries, centres, weights, a.seed) for m in modes}
    t0 = time.time()
    exact_all = _exact_top(
        np.concatenate(list(queries.values())), a.rows, a.k, centres, weights, a.seed
    )
    exact_s = (time.time() - t0) / (a.queries * len(modes))
    exact = dict(zip(modes, np.split(exact_all, len(modes))))
    targets = _targets(a.rows, a.queries, a.seed)  # the same rows in every mode
    ids = store.read_columns(["video_id"]).column("video_id").to_pylist()
    position = {v: i for i, v in enumerate(ids)}
    mb = sum(f.stat().st_size for f in path.rglob("*") if f.is_file()) / 2**20
    lists = a.partitions or max(1, round(a.rows**0.5))
    print(
        f"{a.rows} rows x d {D} float16 ({mb:.0f} MiB on disk); {a.index_type}, "
        f"{lists} IVF lists; write {write_s:.0f} s, index build {build_s:.0f} s; exact "
        f"shortlist {1000 * exact_s:.0f} ms/query (chunked from regenerated vectors); "
        f"{a.queries} queries per mode, K = {a.k}; {os.cpu_count()} CPUs"
    )
    print(
        "| queries | nprobes | ef | refine_factor | recall@K (mean / min) "
        "| target in top-K (exact / ANN) | p50 ms |\n|---|---|---|---|---|---|---|"
    )
    for mode in modes:
        for nprobes, ef, refine in _settings(a.index_type, a):
            knobs = dict(nprobes=nprobes, refine_factor=refine, ef=ef)
            recalls, found, lat = [], [], []
            store.nearest(queries[mode][0], a.k, **knobs)  # warm
            for i, q in enumerate(queries[mode]):
                t0 = time.perf_counter()
                got = store.nearest(q, a.k, **knobs)
                lat.append(time.perf_counter() - t0)
                rows = np.asarray([position[v] for v in got])
                recalls.append(len(set(rows.tolist()) & set(exact[mode][i].tolist())) / a.k)
                found.append(targets[i] in rows)
            exact_found = np.mean([t in e for t, e in zip(targets, exact[mode])])
            print(
                f"| {mode} | {nprobes} | {'-' if ef is None else ef} | {refine} "
                f"| {np.mean(recalls):.3f} / {np.min(recalls):.2f} "
                f"| {exact_found:.2f} / {np.mean(found):.2f} "
                f"| {1000 * np.median(lat):.0f} |",
                flush=True,
            )
    if a.exact_in_memory:
        _time_exact_in_memory(store, queries, a.k)
    if not a.keep:
        shutil.rmtree(path, ignore_errors=True)


if __name__ == "__main__":
    try:
        main()
    except UserError as e:  # e.g. --reuse of a store no earlier --keep left
        print(f"error: {e}", file=sys.stderr)
        sys.exit(2)
