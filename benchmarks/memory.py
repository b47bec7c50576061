r"""Per-device memory of the compiled train step (XLA's ``memory_analysis()``), no real arrays.

  python benchmarks/memory.py                          # the full table (slow: ~48 compiles)
  python benchmarks/memory.py --compile=false          # all rows but temp/peak: seconds each
  python benchmarks/memory.py --models=b32 --devices=1,8 --dtypes=bfloat16 --remat=full \
      --accumulate=1,4                                 # a few rows

The paper's recipe (SPEC §9): 12 frames x 32 words, global batch 128, ViT-B/32 or ViT-B/16,
UCoFiA head with 500 top-k samples. Each row lowers and compiles the same jitted, sharded
train step as training (training/trainer.py) on abstract shapes (``jax.ShapeDtypeStruct``)
over N virtual CPU devices, on a pure-FSDP mesh (``data=1, fsdp=N``: the batch and every
large weight split N ways), and reads what XLA will allocate per device:

  params+opt  the arguments (params, BertAdam's m and v, step, rng, the batch shard)
  temp        activations and other temporaries of the step
  peak        arguments + outputs - donated (aliased) + temp: the device's working set
  saved       what autodiff keeps from one micro-batch's forward for its backward (the
              vjp's residuals beyond the parameters), from jax's trace: device-independent,
              and the number remat changes (XLA:CPU expands remat's optimization barriers
              before scheduling, so on CPU the temp column does not show remat's saving)

CPU numbers are XLA:CPU's buffer assignment; a GPU/TPU compile differs in fusion and in
bf16 handling (XLA:CPU may keep some bf16 matmuls in f32), so read them as estimates.
"""

from __future__ import annotations

import argparse
import itertools
import os
import sys
import time


def _parse(argv):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--models", default="b32,b16", help="b32,b16")
    p.add_argument("--devices", default="1,8,32", help="mesh sizes (virtual CPU devices)")
    p.add_argument("--dtypes", default="float32,bfloat16")
    p.add_argument("--remat", default="none,full", help="config.model.remat values")
    p.add_argument("--accumulate", default="1,4", help="config.train.accumulate_steps values")
    p.add_argument(
        "--compile",
        default="true",
        choices=("true", "false"),
        help="false: no XLA compile (seconds a row): params+opt from the shardings, saved "
        "from the trace; temp and peak left blank",
    )
    p.add_argument("--batch", type=int, default=128)
    p.add_argument("--frames", type=int, default=12)
    p.add_argument("--words", type=int, default=32)
    return p.parse_args(argv)


ARGS = _parse(sys.argv[1:] if __name__ == "__main__" else [])
_MAX_DEVICES = max(int(d) for d in ARGS.devices.split(","))
# Virtual devices must be requested before jax starts.
# LLVM's optimisation level changes the machine code, not XLA's buffer assignment; level 0
# compiles several times faster.
os.environ["XLA_FLAGS"] = (
    os.environ.get("XLA_FLAGS", "")
    + f" --xla_force_host_platform_device_count={_MAX_DEVICES}"
    + " --xla_backend_optimization_level=0"
).strip()
os.environ.setdefault("JAX_PLATFORMS", "cpu")

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402

from ucofia_jax.config import base_config  # noqa: E402
from ucofia_jax.models.model import Model  # noqa: E402
from ucofia_jax.runtime import sharding  # noqa: E402
from ucofia_jax.training import checkpoints  # noqa: E402
from ucofia_jax.training import trainer as trainer_lib  # noqa: E402

PATCH = {"b32": 32, "b16": 16}
GB = 1024**3


def row_config(model: str, devices: int, dtype: str, remat: str, accumulate: int):
    c = base_config()  # OpenAI ViT-B/32 sizes, 12 frames, 32 words, batch 128
    c.model.clip.vision_patch_size = PATCH[model]
    c.model.clip.dtype = dtype
    c.model.remat = remat
    c.data.max_frames = ARGS.frames
    c.data.max_words = ARGS.words
    c.train.batch_size = ARGS.batch
    c.train.accumulate_steps = accumulate
    c.mesh.update(dict(data=1, fsdp=devices, model=1))
    return c


def saved_for_backward(model: Model, params, batch) -> int:
    """Bytes of the loss's vjp residuals beyond the parameters (shapes only, no compile)."""
    rng = jax.random.PRNGKey(0)
    vjp_fn = jax.eval_shape(
        lambda p, b: jax.vjp(lambda q: model.loss(q, b, rng)[0], p)[1], params, batch
    )
    return max(checkpoints.state_nbytes(vjp_fn) - checkpoints.state_nbytes(params), 0)


def measure(model_name: str, devices: int, dtype: str, remat: str, accumulate: int) -> dict:
    c = row_config(model_name, devices, dtype, remat, accumulate)
    model = Model.from_config(c.model, max_frames=c.data.max_frames, max_words=c.data.max_words)
    mesh = sharding.make_mesh(c.mesh, jax.devices()[:devices])
    params = jax.eval_shape(model.init, jax.random.PRNGKey(0))
    trainer = trainer_lib.make_trainer(
        model, c.train, mesh, {"params": params}, 1000, axis_rules=c.mesh.logical_axis_rules
    )
    opt_state = jax.eval_shape(trainer.tx.init, params)
    state = {
        "step": jax.ShapeDtypeStruct((), jnp.int32),
        "params": params,
        "opt_state": opt_state,
        "rng": jax.ShapeDtypeStruct((2,), jnp.uint32),
    }
    b, f, s = c.train.batch_size, c.data.max_frames, c.data.image_size
    batch = {
        "input_ids": jax.ShapeDtypeStruct((b, c.data.max_words), jnp.int32),
        "frames": jax.ShapeDtypeStruct((b, f, s, s, 3), jnp.uint8),
        "frame_mask": jax.ShapeDtypeStruct((b, f), jnp.int32),
    }
    micro = b // (devices * accumulate)  # the examples one device encodes at once
    saved = saved_for_backward(
        model,
        params,
        {k: jax.ShapeDtypeStruct((micro, *v.shape[1:]), v.dtype) for k, v in batch.items()},
    )
    t0 = time.time()
    if ARGS.compile == "false":
        # What the step's state arguments occupy per device, by their declared shardings.
        local = jax.tree.map(
            lambda x, sh: jax.ShapeDtypeStruct(sh.shard_shape(x.shape), x.dtype),
            state,
            trainer.state_shardings,
        )
        args = (
            checkpoints.state_nbytes(local) + checkpoints.state_nbytes(batch) // devices
        )  # the batch is split N ways
        return dict(args=args / GB, temp=None, peak=None, saved=saved / GB, secs=0.0)
    compiled = trainer.train_step.lower(state, batch).compile()
    mem = compiled.memory_analysis()
    args = mem.argument_size_in_bytes
    peak = args + mem.output_size_in_bytes - mem.alias_size_in_bytes + mem.temp_size_in_bytes
    return dict(
        args=args / GB,
        temp=mem.temp_size_in_bytes / GB,
        peak=peak / GB,
        saved=saved / GB,
        secs=time.time() - t0,
    )


def _gib(x) -> str:
    return "" if x is None else f"{x:.2f}"


def main():
    rows = itertools.product(
        ARGS.models.split(","),
        [int(d) for d in ARGS.devices.split(",")],
        ARGS.dtypes.split(","),
        ARGS.remat.split(","),
        [int(a) for a in ARGS.accumulate.split(",")],
    )
    print(
        f"global batch {ARGS.batch}, {ARGS.frames} frames x {ARGS.words} words; "
        f"per-device GiB from memory_analysis() (jax {jax.__version__}, "
        f"{jax.default_backend()})"
    )
    print(
        "| model | devices (fsdp) | dtype | remat | accumulate | params+opt | temp | peak | saved |"
    )
    print("|---|---|---|---|---|---|---|---|---|")
    for model, devices, dtype, remat, accumulate in rows:
        if ARGS.batch % (devices * accumulate):
            print(
                f"| {model} | {devices} | {dtype} | {remat} | {accumulate} | batch not divisible ||||"
            )
            continue
        r = measure(model, devices, dtype, remat, accumulate)
        print(
            f"| ViT-{model[0].upper()}/{model[1:]} | {devices} | {dtype} | {remat} | {accumulate} "
            f"| {_gib(r['args'])} | {_gib(r['temp'])} | {_gib(r['peak'])} | {_gib(r['saved'])} |",
            flush=True,
        )
        if r["temp"] is not None:
            print(f"  (compiled in {r['secs']:.0f} s)", file=sys.stderr, flush=True)


if __name__ == "__main__":
    main()
