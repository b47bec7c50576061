r"""Train-step benchmark: step time, samples/s, FLOPs per step (XLA cost analysis) and MFU.

  python benchmarks/train_step.py --model=demo                       # the CPU demo model
  python benchmarks/train_step.py --model=vit_b32 --batch=8 --frames=12 --peak_flops=1e12
  python benchmarks/train_step.py --model=vit_b32 --batch=128 --dtype=bfloat16 \
      --peak_flops=989e12                                            # H100 bf16 dense

Runs the same jitted, sharded train step as training (random weights and inputs; the
batch is sharded over all devices on 'data'). FLOPs come from the compiled step's
``cost_analysis()`` (XLA counts a multiply-add as 2 FLOPs); MFU = FLOPs/step / step time /
``--peak_flops`` (per device x devices). Prints one markdown table row.
"""

from __future__ import annotations

import argparse
import time

import jax
import numpy as np

from configs import demo, msrvtt
from ucofia_jax import config as config_lib
from ucofia_jax.models.model import Model
from ucofia_jax.runtime import sharding
from ucofia_jax.training import trainer as trainer_lib


def build_config(args):
    if args.model == "demo":
        c = demo.get_config()
    else:
        c = msrvtt.get_config()
        c.model.clip.checkpoint = ""
        c.model.head.init_temporal_from_clip = True
    if args.frames:
        c.data.max_frames = args.frames
    if args.batch:
        c.train.batch_size = args.batch
    c.model.clip.dtype = args.dtype
    if args.num_samples:
        c.model.head.num_samples = args.num_samples
    c.train.schedule = "constant"  # lr > 0 from step 0 (the warmup's step 0 is a no-op)
    c.mesh.data = -1
    return c


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--model", choices=["demo", "vit_b32"], default="demo")
    p.add_argument("--batch", type=int, default=0, help="global batch (default: the config's)")
    p.add_argument("--frames", type=int, default=0, help="frames per clip (default: config's)")
    p.add_argument("--dtype", choices=["float32", "bfloat16"], default="float32")
    p.add_argument("--num_samples", type=int, default=0, help="perturbed top-k samples")
    p.add_argument("--steps", type=int, default=5, help="timed steps (after 1 warm-up step)")
    p.add_argument(
        "--peak_flops",
        type=float,
        default=0.0,
        help="peak FLOP/s of ONE device for the MFU column (0: no MFU)",
    )
    args = p.parse_args(argv)

    c = build_config(args)
    config_lib.validate(c)
    mesh = sharding.make_mesh(c.mesh)
    model = Model.from_config(c.model, max_frames=c.data.max_frames, max_words=c.data.max_words)
    state = trainer_lib.create_train_state(model, 0)
    trainer = trainer_lib.make_trainer(
        model, c.train, mesh, state, schedule_total=1000, axis_rules=c.mesh.logical_axis_rules
    )
    state = trainer_lib.place_state(trainer, state)
    b, f, s = c.train.batch_size, c.data.max_frames, c.data.image_size
    rng = np.random.default_rng(0)
    ids = rng.integers(1, 49000, (b, c.data.max_words)).astype(np.int32)
    ids[:, -1] = 49407
    batch = sharding.shard_batch(
        {
            "input_ids": ids,
            "frames": rng.integers(0, 256, (b, f, s, s, 3), dtype=np.uint8),
            "frame_mask": np.ones((b, f), np.int32),
        },
        mesh,
    )

    t0 = time.time()
    compiled = trainer.train_step.lower(state, batch).compile()
    compile_s = time.time() - t0
    cost = compiled.cost_analysis()
    cost = cost[0] if isinstance(cost, (list, tuple)) else cost
    flops = float(cost.get("flops", 0.0)) if cost else 0.0
    state, m = compiled(state, batch)  # warm-up
    jax.block_until_ready(m)
    times = []
    for _ in range(args.steps):
        t = time.time()
        state, m = compiled(state, batch)
        jax.block_until_ready(m)
        times.append(time.time() - t)
    step_s = float(np.median(times))
    n_params = sum(x.size for x in jax.tree.leaves(state["params"]))
    ndev = jax.device_count()
    mfu = flops / step_s / (args.peak_flops * ndev) if args.peak_flops else float("nan")
    dev = f"{ndev}x {jax.devices()[0].device_kind}"
    print(
        "| model | params | batch | frames | dtype | device | compile s | step s | samples/s "
        "| GFLOPs/step | MFU |"
    )
    print("|---|---|---|---|---|---|---|---|---|---|---|")
    print(
        f"| {args.model} | {n_params / 1e6:.1f}M | {b} | {f} | {args.dtype} | {dev} | "
        f"{compile_s:.0f} | {step_s:.3f} | {b / step_s:.1f} | {flops / 1e9:.1f} | "
        + (f"{100 * mfu:.1f}% |" if args.peak_flops else "n/a |")
    )


if __name__ == "__main__":
    main()
