"""Compile and run time of the CLIP towers (ViT-B/32, random weights) on the default backend.

    python benchmarks/clip_forward.py            # batch 1, 12 frames, 32 tokens, f32 and bf16

Video: encode_video on [B, F, 224, 224, 3] with the TS2-Net shift on blocks 10-11 (the
UCoFiA recipe). Text: encode_text on [B, 32]. Run time is the median of --repeats calls
after one warm-up; compile time is lower() + compile().
"""

from __future__ import annotations

import argparse
import os
import statistics
import time

import jax
import jax.numpy as jnp
import numpy as np

from ucofia_jax.models import clip


def random_params(cfg: clip.CLIPConfig, seed: int = 0) -> dict:
    # Values do not matter for timing; skip compiling the initialiser.
    model = clip.CLIP(cfg)
    r = cfg.image_resolution
    shapes = jax.eval_shape(
        model.init,
        jax.random.PRNGKey(0),
        jax.ShapeDtypeStruct((1, r, r, 3), jnp.float32),
        jax.ShapeDtypeStruct((1, 2), jnp.int32),
    )["params"]
    rng = np.random.default_rng(seed)
    return jax.tree_util.tree_map(
        lambda s: jnp.asarray(0.02 * rng.standard_normal(s.shape, np.float32)), shapes
    )


def towers(model: clip.CLIP):
    """(video, text) forward functions of ``model``, taking the params first."""
    video = lambda p, x: model.apply({"params": p}, x, method=model.encode_video)
    text = lambda p, t: model.apply({"params": p}, t, method=model.encode_text)
    return video, text


def bench(fn, args, repeats: int) -> tuple[float, float]:
    t0 = time.perf_counter()
    compiled = jax.jit(fn).lower(*args).compile()
    compile_s = time.perf_counter() - t0
    jax.block_until_ready(compiled(*args))  # warm-up
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        jax.block_until_ready(compiled(*args))
        times.append(time.perf_counter() - t0)
    return compile_s, statistics.median(times)


def main():
    ap = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    ap.add_argument("--batch", type=int, default=1)
    ap.add_argument("--frames", type=int, default=12)
    ap.add_argument("--words", type=int, default=32)
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--dtypes", default="float32,bfloat16")
    args = ap.parse_args()

    base = clip.CLIPConfig(token_shift_blocks=(10, 11))  # ViT-B/32 defaults
    params = random_params(base)
    frames = jax.random.normal(jax.random.PRNGKey(1), (args.batch, args.frames, 224, 224, 3))
    ids = jax.random.randint(jax.random.PRNGKey(2), (args.batch, args.words), 1, 49407)
    dev = jax.devices()[0]
    print(
        f"backend: {jax.default_backend()} ({dev.device_kind}), {os.cpu_count()} host cores, "
        f"jax {jax.__version__}"
    )
    print("| tower | input | dtype | compile (s) | run (ms) |")
    print("|---|---|---|---|---|")
    for dtype in args.dtypes.split(","):
        model = clip.CLIP(clip.CLIPConfig(token_shift_blocks=(10, 11), dtype=dtype))
        video, text = towers(model)
        c, r = bench(video, (params, frames), args.repeats)
        print(
            f"| video ViT-B/32 | [{args.batch},{args.frames},224,224,3] | {dtype} | {c:.1f} | {1e3 * r:.0f} |",
            flush=True,
        )
        c, r = bench(text, (params, ids), args.repeats)
        print(
            f"| text | [{args.batch},{args.words}] | {dtype} | {c:.1f} | {1e3 * r:.1f} |",
            flush=True,
        )


if __name__ == "__main__":
    main()
