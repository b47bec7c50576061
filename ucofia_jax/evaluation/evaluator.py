"""Evaluation (SPEC §8, §10): encode every test text and video once, score all pairs block by
block, metrics with and without SK-norm, results.json + a markdown table.

The evaluator knows nothing of the model's insides: it receives ``RetrievalFns`` (encode a
batch of texts, encode a batch of videos, score every pair of two encoded sets), as
big_vision's retrieval evaluator receives a ``predict_fn``. :func:`retrieval_fns` builds
them from a ``Model`` and is the one place that chooses how level 3 runs (native CPU kernel
or XLA, ``config.eval.level3_kernel``).

* Texts and videos are encoded once each (jitted, batch sharded on the mesh), the video side
  with the selection noise of ``fold_in(rng, batch)`` (the original draws noise at
  inference; ``model.head.selection_noise_at_eval=False`` turns it off).
* The three similarity levels of every (text, video) pair are computed in fixed-size blocks
  of ``eval.text_block`` x ``eval.video_block`` (one compiled kernel; memory bounded by the
  block): exact, since every softmax of the head lives inside one pair.
* SK-norm: t2v -- the query bank is ``eval.sk_bank_size`` training-split texts x the test
  videos; v2t -- the test texts x ``eval.sk_v2t_bank_size`` training videos, transposed.
  Per level a Sinkhorn log-prior over the test items is added before averaging the levels.

``WORKDIR/results.json``: ``{"t2v": {R@1, R@5, R@10, MdR, MnR}, "v2t", "t2v_sk", "v2t_sk",
"num_texts", "num_videos", "step"}`` (recalls in percent); ``WORKDIR/results.md``: the table.
"""

from __future__ import annotations

import dataclasses
import json
import os
import time
from typing import Any, Callable, Dict, Iterable, Optional

import jax
import numpy as np

from ucofia_jax.kernels import native
from ucofia_jax.models.features import TextFeatures, VideoFeatures
from ucofia_jax.models.model import Blocks, Model
from ucofia_jax.ops import metrics as metrics_lib
from ucofia_jax.ops import sinkhorn
from ucofia_jax.runtime import distributed
from ucofia_jax.runtime import sharding as sharding_lib

Params = Any
Batch = Dict[str, np.ndarray]


@dataclasses.dataclass(frozen=True)
class RetrievalFns:
    """What evaluation (and search) needs from a model; all take ``params`` first.

    encode_text(params, input_ids 't w') -> TextFeatures
    encode_video(params, frames 'b f s s 3', frame_mask 'b f', rng) -> VideoFeatures
    score(params, TextFeatures [N], VideoFeatures [M]) -> float32 levels [3, N, M] (numpy)
    """

    encode_text: Callable[[Params, jax.Array], TextFeatures]
    encode_video: Callable[[Params, jax.Array, jax.Array, jax.Array], VideoFeatures]
    score: Callable[[Params, TextFeatures, VideoFeatures], np.ndarray]


def retrieval_fns(model: Model, mesh, eval_cfg) -> RetrievalFns:
    """Jitted encoders and the blockwise scorer of ``model`` on ``mesh`` (``config.eval``).

    Scoring splits text blocks over the mesh's 'data' devices when there is one process;
    with several, every process holds both encoded sets whole and scores them locally.
    """
    pair_fn = native.pair_levels_for(eval_cfg.level3_kernel, mask_padding=model.masks_padding)
    split = jax.process_count() == 1 and mesh.shape["data"] > 1
    blocks = Blocks(
        text=int(eval_cfg.text_block),
        video=int(eval_cfg.video_block),
        mesh=mesh if split else None,
        axis="data",
    )

    def score(params, text, video):
        levels = model.score(params, text, video, blockwise=blocks, pair_fn=pair_fn)
        return np.stack([np.asarray(x, np.float32) for x in levels])

    return RetrievalFns(
        encode_text=jax.jit(model.encode_text),
        encode_video=jax.jit(lambda p, fr, fm, r: model.encode_video(p, fr, fm, r, train=False)),
        score=score,
    )


# --------------------------------------------------------------------------- encoding


def encode_texts(fns: RetrievalFns, params, batches: Iterable[Batch], mesh) -> TextFeatures:
    """Every text of ``batches`` (this process's rows of global batches), on the host."""
    parts = []
    for b in batches:
        ids = sharding_lib.shard_batch({"input_ids": np.asarray(b["input_ids"], np.int32)}, mesh)
        feats = distributed.to_host(fns.encode_text(params, ids["input_ids"]))
        parts.append(_rows(feats, _global_valid(b, "input_ids", mesh)))
    return _concat(parts)


def encode_videos(
    fns: RetrievalFns, params, batches: Iterable[Batch], mesh, rng: jax.Array
) -> VideoFeatures:
    """Every video of ``batches``; batch i draws its selection noise from fold_in(rng, i)."""
    parts = []
    for i, b in enumerate(batches):
        x = sharding_lib.shard_batch(
            {"frames": b["frames"], "frame_mask": np.asarray(b["frame_mask"], np.int32)}, mesh
        )
        feats = fns.encode_video(params, x["frames"], x["frame_mask"], jax.random.fold_in(rng, i))
        parts.append(_rows(distributed.to_host(feats), _global_valid(b, "frames", mesh)))
    return _concat(parts)


def _rows(tree, keep: np.ndarray):
    return jax.tree.map(lambda x: x[keep], tree)


def _global_valid(batch: Batch, key: str, mesh) -> np.ndarray:
    """The padding mask of the whole global batch, assembled from this process's rows of
    ``valid`` as the batch itself is (processes may hold the same rows: a ``model`` axis
    spanning processes replicates the batch over them)."""
    local = np.asarray(batch.get("valid", np.ones(len(batch[key]))), np.int32)
    return np.asarray(distributed.to_host(sharding_lib.shard_batch({"v": local}, mesh)["v"]), bool)


def _concat(parts):
    if not parts:
        raise ValueError("nothing to encode: the evaluation split is empty")
    return jax.tree.map(lambda *xs: np.concatenate(xs), *parts)


def _bank_batches(ids: np.ndarray, batch: int, mesh) -> Iterable[Batch]:
    """Fixed-size global batches (padded with row 0, with a ``valid`` mask) of token ids that
    every process holds whole; each process yields its own rows of every batch, those its
    devices hold under the batch sharding (so they come back in the order encoded)."""
    rows = distributed.process_rows(batch, sharding_lib.batch_sharding(mesh, 1))
    for lo in range(0, len(ids), batch):
        part = ids[lo : lo + batch]
        valid = (np.arange(batch) < len(part)).astype(np.int32)
        part = np.concatenate([part, np.repeat(part[:1], batch - len(part), axis=0)])
        yield {"input_ids": part[rows], "valid": valid[rows]}


# --------------------------------------------------------------------------- metrics


def sk_normalised(
    levels_test: np.ndarray, bank_levels: np.ndarray, direction: str, iters: int, domain: str
) -> np.ndarray:
    """The SK-normed [texts, videos] matrix (SPEC §8) from per-level test and bank scores."""
    if direction == "t2v":
        priors = sinkhorn.sk_prior_t2v(list(bank_levels), iters, domain)
    else:
        priors = sinkhorn.sk_prior_v2t(list(bank_levels), iters, domain)
    return np.asarray(sinkhorn.apply_sk_norm(list(levels_test), priors, direction))


@dataclasses.dataclass
class Evaluation:
    """``metrics``: what results.json holds (plus ``sk_bank`` and ``seconds``);
    ``similarity``: the plain [texts, videos] score matrix (for the report)."""

    metrics: Dict[str, Any]
    similarity: np.ndarray


def evaluate(
    fns: RetrievalFns,
    params,
    mesh,
    eval_cfg,
    test_data,
    *,
    rng: jax.Array,
    step: int = 0,
    train_data=None,
    sk_norm: Optional[bool] = None,
    bank_seed: int = 0,
) -> Evaluation:
    """Metrics of ``params`` on ``test_data`` (a ``pipeline.VideoTextData``).

    ``train_data`` (the training split) supplies the SK-norm query banks, drawn with
    ``bank_seed``; without it, or with ``sk_norm=False``, only the plain metrics are computed.
    """
    ec = eval_cfg
    sk_norm = ec.sk_norm if sk_norm is None else sk_norm
    t0 = time.time()
    r_test, r_bank = jax.random.split(rng)
    text = encode_texts(fns, params, test_data.eval_text_batches(global_batch=ec.batch_size), mesh)
    video = encode_videos(
        fns, params, test_data.eval_video_batches(global_batch=ec.batch_size), mesh, r_test
    )
    levels = fns.score(params, text, video)  # [3, T, V]
    sim = levels.mean(axis=0)
    text_video = np.asarray(test_data.text_to_video)
    res = metrics_lib.retrieval_metrics(sim, text_video)
    results: Dict[str, Any] = {"t2v": res["t2v"], "v2t": res["v2t"]}
    if sk_norm and train_data is not None:
        size = None if ec.sk_bank_size < 0 else int(ec.sk_bank_size)
        bank = train_data.text_bank(size, seed=bank_seed)
        bank_text = encode_texts(
            fns, params, _bank_batches(bank["input_ids"], ec.batch_size, mesh), mesh
        )
        bank_t2v = fns.score(params, bank_text, video)  # [3, Nq, V]
        s_t2v = sk_normalised(levels, bank_t2v, "t2v", ec.sk_iters, ec.sk_domain)
        results["t2v_sk"] = metrics_lib.retrieval_metrics(s_t2v, text_video)["t2v"]
        vsize = None if ec.sk_v2t_bank_size < 0 else int(ec.sk_v2t_bank_size)
        bank_batches = train_data.eval_video_batches(
            global_batch=ec.batch_size, limit=vsize, seed=bank_seed
        )
        bank_video = encode_videos(fns, params, bank_batches, mesh, r_bank)
        bank_v2t = fns.score(params, text, bank_video)  # [3, T, Nv_train]
        s_v2t = sk_normalised(levels, bank_v2t, "v2t", ec.sk_iters, ec.sk_domain)
        results["v2t_sk"] = metrics_lib.retrieval_metrics(s_v2t, text_video)["v2t"]
        results["sk_bank"] = {"texts": bank_text.count, "videos": bank_video.count}
    results.update(num_texts=int(sim.shape[0]), num_videos=int(sim.shape[1]), step=int(step))
    results["seconds"] = round(time.time() - t0, 1)
    return Evaluation(metrics=results, similarity=sim)


def write_results(workdir: str, results: Dict[str, Any], writer=None) -> str:
    """results.json (the documented keys) + results.md; TensorBoard scalars via ``writer``."""
    keep = {k: results[k] for k in ("t2v", "v2t", "t2v_sk", "v2t_sk") if k in results}
    keep.update({k: results[k] for k in ("num_texts", "num_videos", "step")})
    if not distributed.is_main_process():
        return ""
    os.makedirs(workdir, exist_ok=True)
    path = os.path.join(workdir, "results.json")
    with open(path, "w", encoding="utf-8") as f:
        json.dump(keep, f, indent=2)
    table = metrics_lib.markdown_table({k: v for k, v in keep.items() if isinstance(v, dict)})
    with open(os.path.join(workdir, "results.md"), "w", encoding="utf-8") as f:
        f.write(f"Step {keep['step']}: {keep['num_texts']} texts x {keep['num_videos']} videos\n\n")
        f.write(table)
    if writer is not None:
        for name in ("t2v", "v2t", "t2v_sk", "v2t_sk"):
            if name in keep:
                writer.scalars(keep["step"], keep[name], prefix=f"eval/{name}/")
    return path
