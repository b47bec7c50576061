"""The program ``tests/test_mesh_batches.py`` launches (``launch.sh --entry``): batches that
follow the mesh, read by the real pipeline and assembled as the train loop assembles them.

For each mesh of ``MESHES`` (4 devices: 1 process x 4 or 2 processes x 2), this process
reads the first global batches of a built dataset with
``VideoTextData(..., mesh=mesh).train_batches`` (its rows under the batch sharding), makes
global arrays with ``sharding.shard_batch`` (what ``training.loop`` does), records the whole
global batch (``distributed.to_host``), and takes SGD steps of a small contrastive model
whose two weights are sharded by the default ``config.mesh.logical_axis_rules`` (over
``model`` on one mesh, over ``fsdp`` on the other). It writes, per mesh and variant,
``{mesh}_{variant}_{process}.npz``: the global batches, the losses and the final weights;
for ``mesh``, also the test split encoded by the evaluator's loop (``evaluator.encode_texts``
/ ``encode_videos``, padded last batch) with the trained weights.

Variants (``--variants``): ``mesh`` is the pipeline as the program runs it; the others are
deliberately wrong ways to feed a process, for the companion test that checks the comparison
catches them: ``blocks`` (process p reads rows ``[p*b, (p+1)*b)``, the rule the pipeline had
before it followed the mesh) and ``swapped`` (each process reads the other's rows).
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
from jax.sharding import NamedSharding

from configs import demo
from data_pipeline import pipeline
from ucofia_jax.config import base_config
from ucofia_jax.evaluation import evaluator
from ucofia_jax.runtime import distributed, sharding

# name -> (data, fsdp, model); both use all 4 devices
MESHES = {"data1_model4": (1, 1, 4), "data2_fsdp2": (2, 2, 1)}
VARIANTS = ("mesh", "blocks", "swapped")
GLOBAL_BATCH = 8
EVAL_BATCH = 4
FRAMES, SIZE, WORDS = 4, 32, 16  # the sampling tests/test_mesh_batches.py builds with
VOCAB_BUCKETS, DIM = 64, 16
SEED = 0


def data_config(data_dir: str) -> ml_collections.ConfigDict:
    """``config.data`` of the demo pointed at the dataset the test built in ``data_dir``."""
    d = demo.get_config().data
    d.update(
        dict(
            dataset="msrvtt",
            data_dir=data_dir,
            manual_dir="",
            max_words=WORDS,
            max_frames=FRAMES,
            image_size=SIZE,
            expand_sentences=False,
        )
    )
    return d


class BlockRowsData(pipeline.VideoTextData):
    """Wrong on purpose: process p reads rows ``[p*b, (p+1)*b)`` whatever the mesh."""

    def rows(self, global_batch: int) -> np.ndarray:
        return pipeline.block_rows(global_batch, jax.process_index(), jax.process_count())


def open_data(variant: str, data_cfg, mesh) -> pipeline.VideoTextData:
    if variant == "mesh":
        return pipeline.VideoTextData(data_cfg, split="train", mesh=mesh)
    if variant == "blocks":
        return BlockRowsData(data_cfg, split="train", mesh=mesh)
    if variant == "swapped":  # read the rows the mesh gives the other process
        other = (jax.process_index() + 1) % jax.process_count()
        return pipeline.VideoTextData(
            data_cfg,
            split="train",
            mesh=mesh,
            process_index=other,
            process_count=jax.process_count(),
        )
    raise ValueError(f"unknown variant {variant!r}")


def init_params() -> dict:
    rng = np.random.default_rng(SEED)
    return {
        "token_table": rng.standard_normal((VOCAB_BUCKETS, DIM)).astype(np.float32) * 0.5,
        "video_proj": rng.standard_normal((FRAMES * 3, DIM)).astype(np.float32) * 0.5,
    }


# Logical names as the package's parameters declare them (models/layers.py vocabulary).
LOGICAL = {"token_table": ("vocab", "embed"), "video_proj": (None, "joint")}


def loss_fn(params, input_ids, frames):
    """Symmetric contrastive loss over the whole global batch (every row a negative)."""
    t = params["token_table"][input_ids % VOCAB_BUCKETS].mean(axis=1)
    v = frames.astype(jnp.float32).mean(axis=(2, 3)).reshape(frames.shape[0], -1) / 255.0
    v = v @ params["video_proj"]
    t = t / jnp.linalg.norm(t, axis=-1, keepdims=True)
    v = v / jnp.linalg.norm(v, axis=-1, keepdims=True)
    logits = 10.0 * t @ v.T
    labels = jnp.arange(logits.shape[0])
    lt = -jnp.take_along_axis(jax.nn.log_softmax(logits, 1), labels[:, None], 1).mean()
    lv = -jnp.take_along_axis(jax.nn.log_softmax(logits, 0), labels[None, :], 0).mean()
    return (lt + lv) / 2


def run_mesh(name: str, variant: str, data_cfg, steps: int, out: Path) -> None:
    data_, fsdp, model = MESHES[name]
    mesh = sharding.make_mesh(ml_collections.ConfigDict(dict(data=data_, fsdp=fsdp, model=model)))
    rules = base_config().mesh.logical_axis_rules
    params0 = init_params()
    logical = {k: jax.sharding.PartitionSpec(*v) for k, v in LOGICAL.items()}
    param_sh = sharding.param_shardings(params0, logical, mesh, rules)
    params = jax.tree.map(jax.device_put, params0, param_sh)
    repl = NamedSharding(mesh, jax.sharding.PartitionSpec())

    def step(p, input_ids, frames):
        loss, g = jax.value_and_grad(loss_fn)(p, input_ids, frames)
        return jax.tree.map(lambda w, d: w - 1.0 * d, p, g), loss

    step = jax.jit(step, out_shardings=(param_sh, repl))
    data = open_data(variant, data_cfg, mesh)
    record = {k: [] for k in ("video_index", "text_index", "input_ids", "frames")}
    losses = []
    batches = data.train_batches(epoch=0, seed=SEED, global_batch=GLOBAL_BATCH)
    for _, batch in zip(range(steps), batches):
        keys = ("video_index", "text_index", "input_ids", "frames")
        inputs = sharding.shard_batch({k: batch[k] for k in keys}, mesh)
        for k in keys:
            record[k].append(distributed.to_host(inputs[k]))
        params, loss = step(params, inputs["input_ids"], inputs["frames"])
        losses.append(float(loss))
    flat = {f"param_{k}": np.asarray(v) for k, v in distributed.to_host(params).items()}
    if variant == "mesh":  # the evaluator's encoding loop on the same mesh
        flat.update(encode_test_split(data_cfg, mesh, params))
    np.savez(
        out / f"{name}_{variant}_{jax.process_index()}.npz",
        losses=np.asarray(losses, np.float64),
        rows=data.rows(GLOBAL_BATCH),
        **{k: np.stack(v) for k, v in record.items()},
        **flat,
    )


def encode_test_split(data_cfg, mesh, params) -> dict:
    """``evaluator.encode_texts`` / ``encode_videos`` of the test split (6 clips in global
    batches of 4: the last has 2 padding rows) with the model's two projections as encoders;
    what every process gets back."""
    test = pipeline.VideoTextData(data_cfg, split="test", mesh=mesh)

    def encode_text(p, input_ids):
        return p["token_table"][input_ids % VOCAB_BUCKETS].mean(axis=1)

    def encode_video(p, frames, frame_mask, rng):
        pooled = frames.astype(jnp.float32).mean(axis=(2, 3)) / 255.0
        return pooled.reshape(frames.shape[0], -1) @ p["video_proj"]

    fns = evaluator.RetrievalFns(
        encode_text=jax.jit(encode_text), encode_video=jax.jit(encode_video), score=None
    )
    batches = dict(global_batch=EVAL_BATCH)
    text = evaluator.encode_texts(fns, params, test.eval_text_batches(**batches), mesh)
    video = evaluator.encode_videos(
        fns, params, test.eval_video_batches(**batches), mesh, jax.random.PRNGKey(0)
    )
    return {"eval_text": np.asarray(text), "eval_video": np.asarray(video)}


def main(argv: list[str]) -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--data_dir", required=True)
    parser.add_argument("--out", required=True)
    parser.add_argument("--variants", default="mesh")
    parser.add_argument("--steps", type=int, default=2)
    args = parser.parse_args(argv)
    distributed.maybe_initialize()  # before anything asks jax for its devices
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    cfg = data_config(args.data_dir)
    for name in MESHES:
        for variant in args.variants.split(","):
            run_mesh(name, variant, cfg, args.steps, out)
    distributed.sync("mesh worker done")


if __name__ == "__main__":
    main(sys.argv[1:])
