"""Search at scale on synthetic stored features (no decoding): for each collection size and
shortlist K, the top-10 overlap of the two-stage result with exhaustive full scoring, the
query latency (p50 / p95) and the bytes per video on disk.

The collection is written to a real index store (ucofia_jax/search/store.py: LanceDB,
float16), and queries run the search's own code path: ``scoring.two_stage`` with the
candidates read from the store (``Store.take``) and scored by the evaluation's scorer
(``evaluator.retrieval_fns``: blockwise three levels, the level-3 kernel of
``eval.level3_kernel``), SK-norm off. Exhaustive = the same scorer over every video (the
same float16-rounded features, regenerated chunk by chunk from their seeds).

Sizes: ViT-B/32 MSR-VTT shapes by default (d 512, 12 frames, 4 kept tokens per frame
-> 48 pixel tokens, 32 words); the head is randomly initialised (only it is built, CLIP lends
nothing but its logit scale) except its video-sentence projections, which are set to
``I + 3 N(0,1)/sqrt(d)`` (two independent draws for Wg and Wg1) so that the shortlist's
coarse score (``Model.coarse_query``) is not the plain cosine, as with a trained head.
Synthetic features: videos fall in clusters of varied sizes (Dirichlet weights over
videos / 20 centres; latent = centre + noise), frame / token / video features are noisy
views of the latent and a query is a noisy view of one video's own latent, so that a
collection has near neighbours as real ones do and no K matches a fixed cluster size. The
overlap numbers hold for this synthetic model; benchmarks/search_recall.py measures the
trained demo.

    python benchmarks/search.py [--sizes 10000,100000] [--ks 50,100,200,500] [--queries 10]
        [--dir /tmp/ucofia_search_bench] [--json OUT]

``--float16 INDEX --texts FILE``: instead, the effect of the float16 store on a real index:
every indexed video is decoded and encoded again in float32 (``encode_videos``, the same
per-video noise) and the full scores of the texts (one per line) against all of them are
compared with those from the stored float16 features (max / mean |difference|, and whether
each text's ranking is the same).
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import time
from pathlib import Path

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import Mesh
from ml_collections import ConfigDict

from ucofia_jax.evaluation import evaluator
from ucofia_jax.models import clip as clip_lib
from ucofia_jax.models.features import TextFeatures, VideoFeatures
from ucofia_jax.models.head import UCoFiAHead
from ucofia_jax.models.model import Model
from ucofia_jax.search import scoring
from ucofia_jax.search.index import Index, encode_videos
from ucofia_jax.search.source import ModelSource, load_model
from ucofia_jax.search.store import Store, features_from_arrow, now_iso

D, F, K_TOK, NW = 512, 12, 4, 32
CHUNK = 2000
VIDEOS_PER_CLUSTER = 20


def _unit(x):
    return (x / np.linalg.norm(x, axis=-1, keepdims=True)).astype(np.float32)


def _noise(rng, shape, norm: float) -> np.ndarray:
    """Gaussian noise whose vectors (last axis) have about this norm (features are unit)."""
    return norm * rng.standard_normal(size=shape, dtype=np.float32) / np.sqrt(D)


def _centres(n_videos: int, seed: int) -> tuple:
    """Cluster centres and their weights (varied sizes: no K matches a cluster)."""
    n = max(n_videos // VIDEOS_PER_CLUSTER, 1)
    rng = np.random.default_rng([seed, 0])
    return _unit(rng.normal(size=(n, D))), rng.dirichlet(np.full(n, 0.5))


def _latents(lo: int, hi: int, centres: tuple, seed: int) -> np.ndarray:
    """Latents of videos [lo, hi); ``lo`` a multiple of CHUNK (one draw per chunk)."""
    rng = np.random.default_rng([seed, 1, lo])
    means, weights = centres
    idx = rng.choice(len(means), hi - lo, p=weights)
    return _unit(means[idx] + _noise(rng, (hi - lo, D), 0.6))


def _videos(lo: int, hi: int, centres: tuple, seed: int) -> dict:
    """Stored features of videos [lo, hi), float16-rounded (as the store keeps them)."""
    z = _latents(lo, hi, centres, seed)
    rng = np.random.default_rng([seed, 2, lo])
    n = hi - lo
    frames = _unit(z[:, None] + _noise(rng, (n, F, D), 0.8))
    pixels = _unit(np.repeat(frames, K_TOK, axis=1) + _noise(rng, (n, F * K_TOK, D), 1.0))
    vector = _unit(frames.mean(1) + _noise(rng, (n, D), 0.3))
    out = {
        "vector": vector,
        "frames": frames,
        "pixels": pixels,
        "mask": np.ones((n, F), np.int32),
    }
    return {
        k: (v.astype(np.float16).astype(np.float32) if k != "mask" else v) for k, v in out.items()
    }


def _texts(n_videos: int, n: int, centres, seed: int) -> TextFeatures:
    rng = np.random.default_rng([seed, 3])
    targets = rng.choice(n_videos, n, replace=False)
    z = np.stack(  # each target's own latent, from its chunk
        [
            _latents(t - t % CHUNK, min(t - t % CHUNK + CHUNK, n_videos), centres, seed)[t % CHUNK]
            for t in targets.tolist()
        ]
    )
    sentence = _unit(z + _noise(rng, z.shape, 1.0))
    words = _unit(z[:, None] + _noise(rng, (n, NW, D), 1.5))
    return TextFeatures(sentence=sentence, words=words, mask=np.ones((n, NW), np.int32))


def _model_and_scorer():
    clip_cfg = clip_lib.CLIPConfig()
    head = UCoFiAHead(embed_dim=D, max_frames=F, max_words=NW)
    model = Model(clip_config=clip_cfg, clip=clip_lib.CLIP(clip_cfg), head=head)
    z = lambda *s: jnp.zeros(s, jnp.float32)  # noqa: E731
    n_tok = 1 + clip_cfg.grid_size**2
    key = jax.random.PRNGKey(0)
    head_params = jax.jit(  # plain arrays: the head declares logical axes on its params
        lambda k: nn.unbox(
            head.init(
                k,
                z(1, D),
                z(1, NW, D),
                z(1, F, D),
                z(1, F * n_tok, D),
                jnp.ones((1, F)),
                0.0,
                rng=k,
            )["params"]
        )
    )(key)
    rng = np.random.default_rng(1)
    head_params = dict(head_params)
    for name in ("global_mat_weight", "global_mat_weight_1"):  # a trained head's are not I
        head_params[name] = jnp.asarray(
            np.eye(D) + 3.0 * rng.standard_normal((D, D)) / np.sqrt(D), jnp.float32
        )
    params = {"clip": {"logit_scale": jnp.log(100.0)}, "head": head_params}
    eval_cfg = ConfigDict(dict(text_block=16, video_block=64, level3_kernel="auto"))
    mesh = Mesh(np.asarray(jax.local_devices()[:1]), ("data",))
    fns = evaluator.retrieval_fns(model, mesh, eval_cfg)

    def score(text, video: dict) -> np.ndarray:
        vf = VideoFeatures(
            video=video["vector"],
            frames=video["frames"],
            pixels=video["pixels"],
            mask=video["mask"],
        )
        return fns.score(params, text, vf).mean(axis=0)

    def coarse_query(sentence: np.ndarray) -> np.ndarray:
        return np.asarray(model.coarse_query(params, jnp.asarray(sentence)), np.float32)

    return score, coarse_query


def _build_store(path: Path, n: int, centres, seed: int) -> tuple[Store, float]:
    if path.exists():
        shutil.rmtree(path)
    shapes = {"vector": [D], "frames": [F, D], "pixels": [F * K_TOK, D], "mask": [F]}
    meta = {
        "root": "/synthetic",
        "fingerprint": "benchmark",
        "source": {},
        "description": {},
        "clip_only": False,
        "shapes": shapes,
        "shortlist": 0,
        "created": now_iso(),
        "updated": now_iso(),
    }
    store = Store.create(path, meta)
    t0 = time.time()
    for lo in range(0, n, CHUNK):
        hi = min(lo + CHUNK, n)
        v = _videos(lo, hi, centres, seed)
        rows = [
            {
                "path": f"v{i:07d}.mp4",
                "size": 0,
                "mtime_ns": 0,
                "thumbnail": None,
                **{k: v[k][i - lo] for k in v},
            }
            for i in range(lo, hi)
        ]
        store.add_rows(rows)
    store.refresh()
    return store, time.time() - t0


def _dir_bytes(path: Path) -> int:
    return sum(p.stat().st_size for p in path.rglob("*") if p.is_file())


def run(n: int, ks, n_queries: int, work: Path, score, coarse_query, seed: int = 0) -> list:
    centres = _centres(n, seed)
    store, write_s = _build_store(work / f"n{n}", n, centres, seed)
    shapes = store.meta["shapes"]
    bytes_per_video = _dir_bytes(work / f"n{n}" / "videos.lance") / n
    texts = _texts(n, n_queries, centres, seed)
    queries = coarse_query(texts.sentence)  # the shortlist's query vectors

    # Exhaustive: every video, chunk by chunk (regenerated: the same float16 values).
    t0 = time.time()
    full = np.concatenate(
        [score(texts, _videos(lo, min(lo + CHUNK, n), centres, seed)) for lo in range(0, n, CHUNK)],
        axis=1,
    )
    exhaustive_s = (time.time() - t0) / n_queries
    best = [scoring.top_k(full[i], 10) for i in range(n_queries)]

    vectors = features_from_arrow(store.read_columns(["vector"]), shapes)["vector"]

    def fetch(rows):
        return features_from_arrow(store.take(rows, ["frames", "pixels", "mask"]), shapes) | {
            "vector": vectors[rows]
        }

    def text_row(t, i):
        return jax.tree.map(lambda x: x[i : i + 1], t)

    def one(i: int, k: int):
        return scoring.two_stage(
            text_row(texts, i),
            queries[i : i + 1],
            vectors,
            k=k,
            top=10,
            fetch=fetch,
            score=score,
            text_row=lambda t, _j: t,
        )[0]

    out = []
    for k in ks:
        one(0, k)  # compile for this K
        lat, overlaps = [], []
        for i in range(n_queries):
            t0 = time.perf_counter()
            rows, _ = one(i, k)
            lat.append(time.perf_counter() - t0)
            overlaps.append(scoring.overlap_at(rows, best[i], 10))
        out.append(
            {
                "videos": n,
                "K": k,
                "top10_overlap": float(np.mean(overlaps)),
                "min_overlap": float(np.min(overlaps)),
                "p50_ms": 1000 * float(np.percentile(lat, 50)),
                "p95_ms": 1000 * float(np.percentile(lat, 95)),
                "exhaustive_ms": 1000 * exhaustive_s,
                "bytes_per_video": bytes_per_video,
                "write_s": write_s,
            }
        )
        print(_row(out[-1]), flush=True)
    return out


HEADER = (
    "| videos | K | top-10 overlap (mean / min) | p50 ms | p95 ms | exhaustive ms/query "
    "| bytes/video |\n|---|---|---|---|---|---|---|"
)


def _row(r: dict) -> str:
    return (
        f"| {r['videos']} | {r['K']} | {r['top10_overlap']:.3f} / {r['min_overlap']:.1f} "
        f"| {r['p50_ms']:.0f} | {r['p95_ms']:.0f} | {r['exhaustive_ms']:.0f} "
        f"| {r['bytes_per_video']:.0f} |"
    )


def float16_effect(index_path: str, texts_file: str) -> dict:
    index = Index.open(index_path)
    # The model from its source: the index's own query model has no vision tower.
    model = load_model(ModelSource.from_dict(index.meta["source"]))
    texts = [t.strip() for t in Path(texts_file).read_text().splitlines() if t.strip()]
    n = len(index)
    rows = [index.search_rows([t], top=n, shortlist=n)[0] for t in texts]
    names = index.paths
    f32 = encode_videos([index.root / p for p in names], model)  # noise keyed by content
    exact = model.score(model.encode_texts(texts), f32)
    diffs, same, same1, same10, overlap = [], 0, 0, 0, []
    for t, (r, s) in enumerate(rows):
        diffs.append(np.abs(np.asarray(s) - exact[t, r]))
        ref = scoring.top_k(exact[t], n)
        same += int(np.array_equal(r, ref))
        same1 += int(r[0] == ref[0])
        same10 += int(np.array_equal(r[:10], ref[:10]))
        overlap.append(scoring.overlap_at(r, ref, 10))
    d = np.concatenate(diffs)
    out = {
        "texts": len(texts),
        "videos": n,
        "max_abs_diff": float(d.max()),
        "mean_abs_diff": float(d.mean()),
        "score_range": float(np.ptp(exact)),
        "same_full_ranking": same,
        "same_top1": same1,
        "same_top10_in_order": same10,
        "mean_top10_overlap": float(np.mean(overlap)),
    }
    print(json.dumps(out, indent=1))
    return out


def main():
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--float16", default="", help="an index: measure the float16 effect")
    p.add_argument("--texts", default="", help="with --float16: query texts, one per line")
    p.add_argument("--sizes", default="10000,100000")
    p.add_argument("--ks", default="50,100,200,500")
    p.add_argument("--queries", type=int, default=10)
    p.add_argument("--dir", default="/tmp/ucofia_search_bench")
    p.add_argument("--keep", action="store_true", help="keep the stores")
    p.add_argument("--json", default="")
    a = p.parse_args()
    if a.float16:
        float16_effect(a.float16, a.texts)
        return
    work = Path(a.dir)
    work.mkdir(parents=True, exist_ok=True)
    score, coarse_query = _model_and_scorer()
    print(
        f"features: d {D}, {F} frames, {F * K_TOK} pixel tokens, {NW} words; float16 store; "
        f"{a.queries} queries per size; {os.cpu_count()} CPUs"
    )
    print(HEADER, flush=True)
    rows = []
    for n in [int(s) for s in a.sizes.split(",")]:
        rows += run(n, [int(k) for k in a.ks.split(",")], a.queries, work, score, coarse_query)
        if not a.keep:
            shutil.rmtree(work / f"n{n}", ignore_errors=True)
    print("\n" + HEADER)
    for r in rows:
        print(_row(r))
    if a.json:
        Path(a.json).write_text(json.dumps(rows, indent=1))


if __name__ == "__main__":
    main()
