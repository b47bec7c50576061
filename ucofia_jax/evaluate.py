"""Evaluation (SPEC §8, §10): encode every test text and video once, score all pairs block by
block, metrics with and without SK-norm, results.json + a markdown table.

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

import json
import logging
import os
import time
from typing import Any, Dict, Iterable, Optional

import jax
import jax.numpy as jnp
import numpy as np

from ucofia_jax import distributed
from ucofia_jax import metrics as metrics_lib
from ucofia_jax import sharding as sharding_lib
from ucofia_jax.ops import sinkhorn

log = logging.getLogger(__name__)


class Encoder:
    """Jitted text / video encoders and the blockwise pair scorer for one model + mesh."""

    def __init__(self, model, mesh, eval_cfg):
        self.model, self.mesh, self.cfg = model, mesh, eval_cfg
        self._text = jax.jit(lambda p, ids: model.encode_text(p, ids))
        self._video = jax.jit(lambda p, fr, fm, r: model.encode_video(p, fr, fm, r, train=False))
        self._levels = jax.jit(
            lambda p, t, v: jnp.stack(model.similarity_levels(p, t, v, train=False))
        )

    def texts(self, params, batches: Iterable[Dict[str, np.ndarray]]) -> Dict[str, np.ndarray]:
        out = []
        for b in batches:
            ids = sharding_lib.shard_batch(
                {"input_ids": np.asarray(b["input_ids"], np.int32)}, self.mesh
            )["input_ids"]
            side = distributed.to_host(self._text(params, ids))
            out.append({k: v[_global_valid(b, "input_ids")] for k, v in side.items()})
        return _concat(out)

    def videos(
        self, params, batches: Iterable[Dict[str, np.ndarray]], rng: jax.Array
    ) -> Dict[str, np.ndarray]:
        out = []
        for i, b in enumerate(batches):
            x = sharding_lib.shard_batch(
                {"frames": b["frames"], "frame_mask": np.asarray(b["frame_mask"], np.int32)},
                self.mesh,
            )
            side = distributed.to_host(
                self._video(params, x["frames"], x["frame_mask"], jax.random.fold_in(rng, i))
            )
            out.append({k: v[_global_valid(b, "frames")] for k, v in side.items()})
        return _concat(out)

    def levels(
        self, params, text: Dict[str, np.ndarray], video: Dict[str, np.ndarray]
    ) -> np.ndarray:
        """[3, texts, videos] float32: S1, S2, S3 of every pair, in fixed-size blocks.

        One process: the head's ``blockwise_levels`` (one jitted kernel; text blocks split over
        the mesh's 'data' devices with shard_map). Several processes: a host loop over blocks
        (every process holds the full encoded sides, so no cross-host sharding is needed).
        """
        if jax.process_count() == 1:
            from ucofia_jax.models.ucofia import UCoFiAHead  # pylint: disable=g-import-not-at-top

            mesh = self.mesh if self.mesh.shape["data"] > 1 else None
            s = self.model.head.apply(
                {"params": params["head"]},
                text,
                video,
                params["clip"]["logit_scale"],
                train=False,
                text_block=int(self.cfg.text_block),
                video_block=int(self.cfg.video_block),
                mesh=mesh,
                axis="data",
                method=UCoFiAHead.blockwise_levels,
            )
            return np.stack([np.asarray(x, np.float32) for x in s])
        return self.levels_loop(params, text, video)

    def levels_loop(
        self, params, text: Dict[str, np.ndarray], video: Dict[str, np.ndarray]
    ) -> np.ndarray:
        nt, nv = len(next(iter(text.values()))), len(next(iter(video.values())))
        tb, vb = min(self.cfg.text_block, nt), min(self.cfg.video_block, nv)
        out = np.zeros((3, nt, nv), np.float32)
        for t0 in range(0, nt, tb):
            tblk = _pad_rows({k: v[t0 : t0 + tb] for k, v in text.items()}, tb)
            for v0 in range(0, nv, vb):
                vblk = _pad_rows({k: v[v0 : v0 + vb] for k, v in video.items()}, vb)
                s = np.asarray(self._levels(params, tblk, vblk))
                tn, vn = min(tb, nt - t0), min(vb, nv - v0)
                out[:, t0 : t0 + tn, v0 : v0 + vn] = s[:, :tn, :vn]
        return out


def _global_valid(batch, key) -> np.ndarray:
    """The padding mask of the whole global batch: every process holds only its rows of
    ``valid``, in process order, as ``to_host`` returns the rows."""
    local = np.asarray(batch.get("valid", np.ones(len(batch[key]))), np.int32)
    return np.asarray(distributed.process_allgather(local), bool)


def _concat(parts):
    if not parts:
        raise ValueError("nothing to encode: the evaluation split is empty")
    return {k: np.concatenate([p[k] for p in parts]) for k in parts[0]}


def _pad_rows(tree: Dict[str, np.ndarray], n: int) -> Dict[str, np.ndarray]:
    """Pad the leading axis to ``n`` by repeating row 0 (keeps one compiled block shape)."""

    def one(x):
        if len(x) == n:
            return x
        return np.concatenate([x, np.repeat(x[:1], n - len(x), axis=0)])

    return {k: one(v) for k, v in tree.items()}


def sk_normalised(
    levels_test: np.ndarray, bank_levels: np.ndarray, direction: str, iters: int, domain: str
) -> np.ndarray:
    """The SK-normed [texts, videos] matrix (SPEC §8) from per-level test and bank scores."""
    if direction == "t2v":
        priors = sinkhorn.sk_prior_t2v(list(bank_levels), iters, domain)
    else:
        priors = sinkhorn.sk_prior_v2t(list(bank_levels), iters, domain)
    return np.asarray(sinkhorn.apply_sk_norm(list(levels_test), priors, direction))


def evaluate(
    model,
    params,
    mesh,
    config,
    test_data,
    *,
    train_data=None,
    rng: jax.Array,
    step: int = 0,
    sk_norm: Optional[bool] = None,
    encoder: Optional[Encoder] = None,
) -> Dict[str, Any]:
    """Metrics of ``params`` on ``test_data`` (a ``pipeline.VideoTextData``).

    ``encoder``: an ``Encoder(model, mesh, config.eval)`` kept across calls (evaluation after
    every epoch), so its jitted encoders compile once; a fresh one per call otherwise.

    ``train_data`` (the training split) supplies the SK-norm query banks; without it, or with
    ``sk_norm=False``, only the plain metrics are computed.
    """
    ec = config.eval
    enc = encoder if encoder is not None else Encoder(model, mesh, ec)
    sk_norm = ec.sk_norm if sk_norm is None else sk_norm
    t0 = time.time()
    r_test, r_bank = jax.random.split(rng)
    text = enc.texts(params, test_data.eval_text_batches(global_batch=ec.batch_size))
    video = enc.videos(params, test_data.eval_video_batches(global_batch=ec.batch_size), r_test)
    levels = enc.levels(params, text, video)  # [3, T, V]
    sim = levels.mean(axis=0)
    text_video = np.asarray(test_data.text_to_video)
    res = metrics_lib.retrieval_metrics(sim, text_video)
    results: Dict[str, Any] = {"t2v": res["t2v"], "v2t": res["v2t"]}
    if sk_norm and train_data is not None:
        size = None if ec.sk_bank_size < 0 else int(ec.sk_bank_size)
        bank = train_data.text_bank(size, seed=config.seed)
        bank_text = enc.texts(params, _batched(bank, ec.batch_size))
        bank_t2v = enc.levels(params, bank_text, video)  # [3, Nq, V]
        s_t2v = sk_normalised(levels, bank_t2v, "t2v", ec.sk_iters, ec.sk_domain)
        results["t2v_sk"] = metrics_lib.retrieval_metrics(s_t2v, text_video)["t2v"]
        vsize = None if ec.sk_v2t_bank_size < 0 else int(ec.sk_v2t_bank_size)
        bank_video = enc.videos(
            params,
            train_data.eval_video_batches(
                global_batch=ec.batch_size, limit=vsize, seed=config.seed
            ),
            r_bank,
        )
        bank_v2t = enc.levels(params, text, bank_video)  # [3, T, Nv_train]
        s_v2t = sk_normalised(levels, bank_v2t, "v2t", ec.sk_iters, ec.sk_domain)
        results["v2t_sk"] = metrics_lib.retrieval_metrics(s_v2t, text_video)["v2t"]
        results["sk_bank"] = {
            "texts": int(len(bank_text["sentence"])),
            "videos": int(len(bank_video["video_feature"])),
        }
    results.update(num_texts=int(sim.shape[0]), num_videos=int(sim.shape[1]), step=int(step))
    results["seconds"] = round(time.time() - t0, 1)
    results["_similarity"] = sim  # for the report; not written to results.json
    return results


def _batched(arrays: Dict[str, np.ndarray], batch: int):
    """Fixed-size global batches (padded, with a ``valid`` mask) of arrays that every process
    holds whole; each process yields its own rows of every batch."""
    n = len(next(iter(arrays.values())))
    rows = distributed.local_batch_slice(batch)
    for lo in range(0, n, batch):
        part = {k: v[lo : lo + batch] for k, v in arrays.items()}
        m = len(part["input_ids"])
        part = _pad_rows(part, batch)
        part["valid"] = (np.arange(batch) < m).astype(np.int32)
        yield {k: v[rows] for k, v in part.items()}


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
