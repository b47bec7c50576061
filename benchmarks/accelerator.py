"""Accelerator benchmark: UCoFiA train step and a full SK-norm evaluation, on GPU / TPU / CPU.

  python benchmarks/accelerator.py --peak_tflops=989            # one H100 (dense bf16 peak)
  python benchmarks/accelerator.py --tiny                       # CPU check, tiny sizes

Train: the package's sharded train step (``training.trainer.make_trainer``: ViT-B/32 CLIP +
UCoFiA head from configs/msrvtt.py, 12 frames, 32 words, the original optimiser chain),
global batch 128 over every device on the ``data`` axis (falls back to the next
``--batch_sizes`` entry when the first one runs out of memory). Reported per backbone dtype
(float32, bfloat16): step time (median of ``--steps`` timed steps after ``--warmup``),
samples/s, XLA's FLOP count of the compiled step (cost analysis, per device) and MFU =
FLOPs / step time / (``--peak_tflops`` x 1e12). The same peak is used for both dtypes
unless ``--peak_tflops_f32`` is given (float32 matmuls run on TF32 tensor cores on GPUs by
default, at about half the bf16 peak).

Eval: ``--eval_texts`` x ``--eval_videos`` (1k x 1k) test set plus an SK-norm query bank of
``--bank_texts`` (9k) training captions (t2v prior) and ``--bank_videos`` (1k) training videos
(v2t prior), through ``evaluation.evaluator.evaluate`` with the ``retrieval_fns`` of the model
(level 3 as ``config.eval.level3_kernel``): encode every text and video once,
the three similarity levels blockwise, the Sinkhorn priors, and the metrics (timed end to
end, after a first run that compiles every shape).

Everything is random (weights from scratch, random frames and token ids): the timings do not
depend on the values. Expect about 3-4 minutes on one H100 for the defaults.
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import os
import sys
import time
from pathlib import Path

# Accelerator hosts may run this from a copy of the tree without `pip install -e .`.
REPO = Path(__file__).resolve().parents[1]
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))

import jax  # noqa: E402 -- after the sys.path line
import numpy as np  # noqa: E402 -- after the sys.path line

from data_pipeline import pipeline  # noqa: E402 -- after the sys.path line
from ucofia_jax.evaluation import evaluator  # noqa: E402 -- after the sys.path line
from ucofia_jax.models.model import Model  # noqa: E402 -- after the sys.path line
from ucofia_jax.runtime import sharding  # noqa: E402 -- after the sys.path line
from ucofia_jax.training import trainer as trainer_lib  # noqa: E402 -- after the sys.path line


def parse_args(argv=None):
    p = argparse.ArgumentParser(
        description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter
    )
    p.add_argument(
        "--config",
        default="configs/msrvtt.py",
        help="config file for the model sizes and the optimiser (default ViT-B/32)",
    )
    p.add_argument(
        "--tiny",
        action="store_true",
        help="CPU check: the demo model and small sizes (overrides the defaults)",
    )
    p.add_argument("--frames", type=int, default=None, help="default: config (12)")
    p.add_argument("--words", type=int, default=None, help="default: config (32)")
    p.add_argument(
        "--batch_sizes",
        default="128,64,32",
        help="global batch sizes to try in order until one fits",
    )
    p.add_argument("--dtypes", default="float32,bfloat16")
    p.add_argument("--steps", type=int, default=10)
    p.add_argument("--warmup", type=int, default=2)
    p.add_argument(
        "--peak_tflops",
        type=float,
        default=0.0,
        help="peak TFLOP/s per device for MFU (e.g. 989 H100 SXM bf16, 275 TPU v4)",
    )
    p.add_argument(
        "--peak_tflops_f32",
        type=float,
        default=0.0,
        help="peak for the float32 runs (default: --peak_tflops)",
    )
    p.add_argument("--eval_texts", type=int, default=1000)
    p.add_argument("--eval_videos", type=int, default=1000)
    p.add_argument("--bank_texts", type=int, default=9000)
    p.add_argument("--bank_videos", type=int, default=1000)
    p.add_argument(
        "--encode_batch",
        type=int,
        default=128,
        help="global batch of the text / video encoders (config.eval.batch_size)",
    )
    p.add_argument("--text_block", type=int, default=256, help="config.eval.text_block")
    p.add_argument("--video_block", type=int, default=64, help="config.eval.video_block")
    p.add_argument("--eval_dtype", default="bfloat16")
    p.add_argument("--skip_train", action="store_true")
    p.add_argument("--skip_eval", action="store_true")
    p.add_argument("--json", default="", help="also write the results here")
    args = p.parse_args(argv)
    if args.tiny:
        defaults = p.parse_args([])
        tiny = dict(
            config="configs/demo.py",
            batch_sizes="8",
            steps=3,
            warmup=1,
            eval_texts=40,
            eval_videos=40,
            bank_texts=120,
            bank_videos=40,
            encode_batch=20,
            text_block=20,
            video_block=20,
            eval_dtype="float32",
        )
        for k, v in tiny.items():
            if getattr(args, k) == getattr(defaults, k):
                setattr(args, k, v)
    return args


def load_config(path: str, frames: int | None, words: int | None):
    spec = importlib.util.spec_from_file_location(
        "bench_config", REPO / path if not os.path.isabs(path) else path
    )
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    c = mod.get_config()
    if frames:
        c.data.max_frames = frames
    if words:
        c.data.max_words = words
    c.model.clip.checkpoint = ""
    return c


# --------------------------------------------------------------------------- data


def random_arrays(config, n: int, seed: int) -> dict:
    rng = np.random.default_rng(seed)
    w, f, s = int(config.data.max_words), int(config.data.max_frames), int(config.data.image_size)
    vocab = int(config.model.clip.vocab_size)
    ids = rng.integers(1, vocab - 1, (n, w), dtype=np.int32)
    ids[:, -1] = vocab - 1  # EOT (the argmax) last
    return {
        "input_ids": ids,
        "frames": rng.integers(0, 256, (n, f, s, s, 3), dtype=np.uint8),
        "frame_mask": np.ones((n, f), np.int32),
    }


class RandomSplit:
    """The eval interface of ``data_pipeline.pipeline.VideoTextData`` over random arrays made
    batch by batch (nothing big held in host memory); one caption per video."""

    def __init__(self, config, num_videos: int, num_texts: int, seed: int):
        self.config, self.seed = config, seed
        self.num_videos, self.num_texts = num_videos, num_texts
        self.text_to_video = np.arange(num_texts) % num_videos
        vocab, words = int(config.model.clip.vocab_size), int(config.data.max_words)
        rng = np.random.default_rng(seed)
        self.input_ids = rng.integers(1, vocab - 1, (num_texts, words), dtype=np.int32)
        self.input_ids[:, -1] = vocab - 1
        self.pi, self.pc = jax.process_index(), jax.process_count()

    def _plan(self, n, global_batch, limit, seed):
        order = pipeline.VideoTextData._subset(n, limit, seed)
        index, valid = pipeline.eval_plan(len(order), global_batch)
        return (
            pipeline.shard_plan(order[index], self.pi, self.pc),
            pipeline.shard_plan(valid, self.pi, self.pc),
        )

    def eval_text_batches(self, *, global_batch, limit=None, seed=0):
        for t, v in zip(*self._plan(self.num_texts, global_batch, limit, seed)):
            yield {"input_ids": self.input_ids[t], "valid": v}

    def eval_video_batches(self, *, global_batch, limit=None, seed=0):
        for i, (t, v) in enumerate(zip(*self._plan(self.num_videos, global_batch, limit, seed))):
            a = random_arrays(self.config, len(t), self.seed * 100003 + i)
            yield {"frames": a["frames"], "frame_mask": a["frame_mask"], "valid": v}

    def text_bank(self, size=None, seed=0):
        t = pipeline.VideoTextData._subset(self.num_texts, size, seed)
        return {"input_ids": self.input_ids[t]}


def flops_of(compiled) -> float:
    try:
        cost = compiled.cost_analysis()
    except Exception:  # some backends do not implement it
        return float("nan")
    if isinstance(cost, (list, tuple)):
        cost = cost[0] if cost else {}
    return float((cost or {}).get("flops", float("nan")))


def is_oom(err: Exception) -> bool:
    text = str(err)
    return "RESOURCE_EXHAUSTED" in text or "Out of memory" in text or "out of memory" in text


# --------------------------------------------------------------------------- train


def _model(config) -> Model:
    return Model.from_config(
        config.model, max_frames=config.data.max_frames, max_words=config.data.max_words
    )


def bench_train(config, dtype: str, batch_sizes, args, mesh) -> dict:
    """The package's sharded train step (``training.trainer.make_trainer``), timed."""
    config = config.copy_and_resolve_references()
    config.model.clip.dtype = dtype
    model = _model(config)
    host_state = trainer_lib.create_train_state(model, 0)
    n_dev = sharding.batch_size_multiple(mesh)
    last_err = None
    for bs in batch_sizes:
        if bs % n_dev:
            print(f"  batch {bs} is not a multiple of {n_dev} devices: skipped", flush=True)
            continue
        config.train.batch_size = bs
        trainer = trainer_lib.make_trainer(
            model, config.train, mesh, host_state, 1000, axis_rules=config.mesh.logical_axis_rules
        )
        try:
            state = trainer_lib.place_state(trainer, host_state)
            batch = sharding.shard_batch(random_arrays(config, bs, bs), mesh)
            t0 = time.perf_counter()
            compiled = trainer.train_step.lower(state, batch).compile()
            compile_s = time.perf_counter() - t0
            times = []
            for i in range(args.warmup + args.steps):
                t0 = time.perf_counter()
                state, metrics = compiled(state, batch)
                loss = float(metrics["loss"])  # blocks
                if i >= args.warmup:
                    times.append(time.perf_counter() - t0)
        except Exception as err:  # noqa: BLE001 -- OOM comes as XlaRuntimeError / ValueError
            if is_oom(err):
                last_err = err
                print(f"  {dtype} batch {bs}: out of memory, trying a smaller batch", flush=True)
                state = batch = compiled = None
                continue
            raise
        step_s = float(np.median(times))
        flops = flops_of(compiled)  # per device (the SPMD program)
        peak = (
            args.peak_tflops_f32
            if dtype == "float32" and args.peak_tflops_f32
            else args.peak_tflops
        )
        mfu = flops / step_s / (peak * 1e12) if peak else float("nan")
        return dict(
            kind="train",
            dtype=dtype,
            batch=bs,
            devices=mesh.size,
            step_s=step_s,
            step_s_min=float(np.min(times)),
            samples_per_s=bs / step_s,
            tflops_per_step_per_device=flops / 1e12,
            mfu=mfu,
            compile_s=compile_s,
            loss=loss,
            finite=bool(np.isfinite(loss)),
        )
    raise RuntimeError(f"no batch size in {batch_sizes} fits ({mesh.size} devices): {last_err}")


# --------------------------------------------------------------------------- eval


def bench_eval(config, args, mesh) -> dict:
    """``evaluation.evaluator.evaluate`` end to end: encode, blockwise levels, SK-norm, metrics."""
    config = config.copy_and_resolve_references()
    config.model.clip.dtype = args.eval_dtype
    config.eval.update(
        dict(
            batch_size=args.encode_batch,
            text_block=args.text_block,
            video_block=args.video_block,
            sk_norm=True,
            sk_bank_size=args.bank_texts,
            sk_v2t_bank_size=args.bank_videos,
        )
    )
    model = _model(config)
    params = trainer_lib.create_train_state(model, 0)["params"]
    params = jax.device_put(params, sharding.replicated(mesh))
    test = RandomSplit(config, args.eval_videos, args.eval_texts, seed=1)
    bank = RandomSplit(config, max(args.bank_videos, 1), args.bank_texts, seed=2)
    # Built once (jitted encoders and the scorer), as ucofia_jax.main does: the timed run
    # measures evaluation, not recompilation.
    fns = evaluator.retrieval_fns(model, mesh, config.eval)

    def run():
        t0 = time.perf_counter()
        res = evaluator.evaluate(
            fns,
            params,
            mesh,
            config.eval,
            test,
            rng=jax.random.PRNGKey(0),
            step=0,
            train_data=bank,
        ).metrics
        return time.perf_counter() - t0, res

    first_s, _ = run()  # compiles every shape once
    total_s, res = run()
    return dict(
        kind="eval",
        dtype=args.eval_dtype,
        texts=args.eval_texts,
        videos=args.eval_videos,
        bank_texts=res.get("sk_bank", {}).get("texts", 0),
        bank_videos=res.get("sk_bank", {}).get("videos", 0),
        devices=mesh.size,
        first_run_s=first_s,
        total_s=total_s,
        t2v_R1=res["t2v"]["R@1"],
        has_sk="t2v_sk" in res and "v2t_sk" in res,
    )


# --------------------------------------------------------------------------- main


def fmt_mfu(mfu: float) -> str:
    return f"{mfu * 100:.1f}%" if np.isfinite(mfu) else "n/a (no --peak_tflops)"


def main(argv=None):
    args = parse_args(argv)
    config = load_config(args.config, args.frames, args.words)
    devices = jax.devices()
    config.mesh.update(dict(data=-1, fsdp=1, model=1))
    mesh = sharding.make_mesh(config.mesh)
    kind = devices[0].device_kind
    print(
        f"backend {jax.default_backend()}, {len(devices)} x {kind}; jax {jax.__version__}; "
        f"config {args.config}{' (tiny)' if args.tiny else ''}: frames {config.data.max_frames}, "
        f"words {config.data.max_words}, vision {config.model.clip.vision_layers}L/"
        f"{config.model.clip.vision_width} patch {config.model.clip.vision_patch_size} "
        f"@{config.model.clip.image_resolution}",
        flush=True,
    )
    rows = []
    t_start = time.perf_counter()
    if not args.skip_train:
        sizes = [int(b) for b in args.batch_sizes.split(",") if b]
        for dtype in [d for d in args.dtypes.split(",") if d]:
            r = bench_train(config, dtype, sizes, args, mesh)
            rows.append(r)
            print(
                f"  train {dtype}: batch {r['batch']} step {r['step_s'] * 1e3:.1f} ms  "
                f"{r['samples_per_s']:.1f} samples/s  {r['tflops_per_step_per_device']:.4g} TFLOP/step/dev  "
                f"MFU {fmt_mfu(r['mfu'])}  (compile {r['compile_s']:.1f} s)",
                flush=True,
            )
    if not args.skip_eval:
        r = bench_eval(config, args, mesh)
        rows.append(r)
        print(f"  eval: {r['total_s']:.2f} s (first run {r['first_run_s']:.1f} s)", flush=True)

    print()
    print(f"| {kind} x{len(devices)} | batch | step (ms) | samples/s | TFLOP/step/dev | MFU |")
    print("|---|---|---|---|---|---|")
    for r in rows:
        if r["kind"] == "train":
            print(
                f"| train {r['dtype']} | {r['batch']} | {r['step_s'] * 1e3:.1f} | "
                f"{r['samples_per_s']:.1f} | {r['tflops_per_step_per_device']:.4g} | {fmt_mfu(r['mfu'])} |"
            )
    for r in rows:
        if r["kind"] == "eval":
            print()
            print(
                "| eval (backbone dtype) | test texts x videos | SK-norm bank texts / videos | "
                "first run (compiles) | timed run |"
            )
            print("|---|---|---|---|---|")
            print(
                f"| {kind} x{len(devices)} ({r['dtype']}) | {r['texts']} x {r['videos']} | "
                f"{r['bank_texts']} / {r['bank_videos']} | {r['first_run_s']:.1f} s | "
                f"**{r['total_s']:.1f} s** |"
            )
    print(f"\nwall time {time.perf_counter() - t_start:.0f} s")
    if args.json:
        Path(args.json).write_text(
            json.dumps(dict(device=kind, devices=len(devices), rows=rows), indent=1)
        )
    return rows


if __name__ == "__main__":
    main()
