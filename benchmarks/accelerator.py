"""Accelerator benchmark: UCoFiA train step and a full SK-norm evaluation, on GPU / TPU / CPU.

  python benchmarks/accelerator.py --peak_tflops=989            # one H100 (dense bf16 peak)
  python benchmarks/accelerator.py --tiny                       # CPU check, tiny sizes

Train: ViT-B/32 CLIP + UCoFiA head (configs/msrvtt.py: 12 frames, 32 words), the original
optimiser chain, global batch 128 sharded over all local devices (falls back to the next
``--batch_sizes`` entry when the first one runs out of memory). Reported per backbone dtype
(float32, bfloat16): step time (median of ``--steps`` timed steps after ``--warmup``),
samples/s, XLA's FLOP count of the compiled step (cost analysis, per device) and MFU =
FLOPs / step time / (``--peak_tflops`` x 1e12). The same peak is used for both dtypes
unless ``--peak_tflops_f32`` is given (float32 matmuls run on TF32 tensor cores on GPUs by
default, at about half the bf16 peak).

Eval: ``--eval_texts`` x ``--eval_videos`` (1k x 1k) test set plus an SK-norm query bank of
``--bank_texts`` (9k) training captions (t2v prior) and ``--bank_videos`` (1k) training videos
(v2t prior): encode every text and video once, the three similarity levels blockwise, the
Sinkhorn priors, and the metrics (timed end to end after a warm-up run that compiles).

Everything is random (weights from scratch, random frames and token ids): the timings do not
depend on the values. Expect about 3-4 minutes on one H100 for the defaults.
"""
from __future__ import annotations

import argparse
import functools
import json
import os
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
if str(REPO) not in sys.path:
  sys.path.insert(0, str(REPO))

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

from ucofia_jax import losses, metrics, optim
from ucofia_jax.models import clip as clip_lib
from ucofia_jax.models import ucofia as ucofia_lib
from ucofia_jax.ops import sinkhorn


def parse_args(argv=None):
  p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                              formatter_class=argparse.RawDescriptionHelpFormatter)
  p.add_argument("--config", default="configs/msrvtt.py",
                 help="config file for the model sizes and the optimiser (default ViT-B/32)")
  p.add_argument("--tiny", action="store_true",
                 help="CPU check: the demo model and small sizes (overrides the defaults)")
  p.add_argument("--frames", type=int, default=None, help="default: config (12)")
  p.add_argument("--words", type=int, default=None, help="default: config (32)")
  p.add_argument("--batch_sizes", default="128,64,32",
                 help="global batch sizes to try in order until one fits")
  p.add_argument("--dtypes", default="float32,bfloat16")
  p.add_argument("--steps", type=int, default=10)
  p.add_argument("--warmup", type=int, default=2)
  p.add_argument("--peak_tflops", type=float, default=0.0,
                 help="peak TFLOP/s per device for MFU (e.g. 989 H100 SXM bf16, 275 TPU v4)")
  p.add_argument("--peak_tflops_f32", type=float, default=0.0,
                 help="peak for the float32 runs (default: --peak_tflops)")
  p.add_argument("--eval_texts", type=int, default=1000)
  p.add_argument("--eval_videos", type=int, default=1000)
  p.add_argument("--bank_texts", type=int, default=9000)
  p.add_argument("--bank_videos", type=int, default=1000)
  p.add_argument("--encode_batch", type=int, default=128, help="videos per encoding batch")
  p.add_argument("--text_block", type=int, default=250)
  p.add_argument("--video_block", type=int, default=100)
  p.add_argument("--eval_dtype", default="bfloat16")
  p.add_argument("--skip_train", action="store_true")
  p.add_argument("--skip_eval", action="store_true")
  p.add_argument("--json", default="", help="also write the results here")
  args = p.parse_args(argv)
  if args.tiny:
    defaults = p.parse_args([])
    tiny = dict(config="configs/demo.py", batch_sizes="8", steps=3, warmup=1, eval_texts=40,
                eval_videos=40, bank_texts=120, bank_videos=40, encode_batch=20, text_block=20,
                video_block=20, eval_dtype="float32")
    for k, v in tiny.items():
      if getattr(args, k) == getattr(defaults, k):
        setattr(args, k, v)
  return args


def load_config(path: str, frames: int | None, words: int | None):
  import importlib.util
  spec = importlib.util.spec_from_file_location("bench_config", REPO / path if not os.path.isabs(path) else path)
  mod = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(mod)
  c = mod.get_config()
  if frames:
    c.data.max_frames = frames
  if words:
    c.data.max_words = words
  c.model.clip.checkpoint = ""
  return c


# --------------------------------------------------------------------------- model

class Model:
  """CLIP towers + UCoFiA head: the per-token features the head takes, as the trainer does."""

  def __init__(self, config, dtype: str):
    mc = config.model.clip.to_dict()
    mc["dtype"] = dtype
    self.cfg = clip_lib.CLIPConfig.from_ml(mc)
    self.clip = clip_lib.CLIP(self.cfg)
    self.head = ucofia_lib.head_from_config(config)
    self.frames, self.words = int(config.data.max_frames), int(config.data.max_words)
    self.res = self.cfg.image_resolution

  def init(self, rng):
    r1, r2 = jax.random.split(rng)
    _, clip_params = clip_lib.init_clip(self.cfg, r1)
    d, f, w = self.head.embed_dim, self.frames, self.words
    n = 1 + self.cfg.grid_size ** 2
    head_params = self.head.init(
        {"params": r2, "selection": r2}, jnp.zeros((1, d)), jnp.zeros((1, w, d)),
        jnp.zeros((1, f, d)), jnp.zeros((1, f * n, d)), jnp.ones((1, f)), jnp.zeros(()),
        train=True)["params"]
    return {"clip": clip_params, "head": head_params}

  def text_features(self, params, ids):
    hidden = self.clip.apply({"params": params["clip"]}, ids, method=clip_lib.CLIP.encode_text)
    return clip_lib.sentence_features(hidden, ids), hidden

  def video_features(self, params, frames):
    x = clip_lib.normalize_images(frames)
    out = self.clip.apply({"params": params["clip"]}, x, method=clip_lib.CLIP.encode_video)
    b, f, n, d = out.shape
    return out[:, :, 0], out.reshape(b, f * n, d)

  def loss(self, params, batch, rng):
    text_cls, text_tokens = self.text_features(params, batch["ids"])
    frame_cls, patches = self.video_features(params, batch["frames"])
    logits = self.head.apply({"params": params["head"]}, text_cls, text_tokens, frame_cls,
                             patches, batch["video_mask"], params["clip"]["logit_scale"],
                             rng=rng, train=True)
    return losses.symmetric_cross_entropy(logits)


def random_batch(rng: np.random.Generator, n: int, model: Model):
  ids = rng.integers(1, 49000, (n, model.words), dtype=np.int32)
  ids[:, -1] = 49407  # EOT (argmax) at the end
  return {"ids": ids,
          "frames": rng.integers(0, 256, (n, model.frames, model.res, model.res, 3), dtype=np.uint8),
          "video_mask": np.ones((n, model.frames), np.float32)}


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

def bench_train(config, dtype: str, batch_sizes, args, mesh) -> dict:
  model = Model(config, dtype)
  params = model.init(jax.random.key(0))
  tx = optim.make_optimizer(config.train, params, total_steps=1000)
  opt_state = tx.init(params)
  n_dev = mesh.size
  repl = NamedSharding(mesh, P())
  params, opt_state = jax.device_put((params, opt_state), repl)

  def step(params, opt_state, batch, key):
    loss, grads = jax.value_and_grad(model.loss)(params, batch, key)
    updates, opt_state = tx.update(grads, opt_state, params)
    params = optim.clamp_logit_scale(optax_apply(params, updates))
    return params, opt_state, loss

  last_err = None
  for bs in batch_sizes:
    if bs % n_dev:
      continue
    batch_np = random_batch(np.random.default_rng(bs), bs, model)
    shard = {k: NamedSharding(mesh, P("data", *([None] * (v.ndim - 1)))) for k, v in batch_np.items()}
    batch = {k: jax.device_put(v, shard[k]) for k, v in batch_np.items()}
    jitted = jax.jit(step, in_shardings=(repl, repl, shard, repl), out_shardings=(repl, repl, repl),
                     donate_argnums=(0, 1))
    try:
      t0 = time.perf_counter()
      compiled = jitted.lower(params, opt_state, batch, jax.random.key(1)).compile()
      compile_s = time.perf_counter() - t0
      p, o = params, opt_state
      times = []
      for i in range(args.warmup + args.steps):
        t0 = time.perf_counter()
        p, o, loss = compiled(p, o, batch, jax.random.key(i))
        loss = float(loss)  # blocks
        if i >= args.warmup:
          times.append(time.perf_counter() - t0)
    except Exception as err:  # noqa: BLE001 -- OOM comes as XlaRuntimeError / ValueError
      if is_oom(err):
        last_err = err
        print(f"  {dtype} batch {bs}: out of memory, trying a smaller batch", flush=True)
        params = model.init(jax.random.key(0))
        opt_state = tx.init(params)
        params, opt_state = jax.device_put((params, opt_state), repl)
        continue
      raise
    step_s = float(np.median(times))
    flops = flops_of(compiled)  # per device (SPMD program)
    peak = (args.peak_tflops_f32 if dtype == "float32" and args.peak_tflops_f32 else args.peak_tflops)
    mfu = flops / step_s / (peak * 1e12) if peak else float("nan")
    return dict(kind="train", dtype=dtype, batch=bs, devices=n_dev, step_s=step_s,
                step_s_min=float(np.min(times)), samples_per_s=bs / step_s,
                tflops_per_step_per_device=flops / 1e12, mfu=mfu, compile_s=compile_s,
                loss=loss, finite=bool(np.isfinite(loss)))
  raise RuntimeError(f"no batch size in {batch_sizes} fits ({n_dev} devices): {last_err}")


def optax_apply(params, updates):
  import optax
  return optax.apply_updates(params, updates)


# --------------------------------------------------------------------------- eval

def bench_eval(config, args, mesh) -> dict:
  model = Model(config, args.eval_dtype)
  params = jax.device_put(model.init(jax.random.key(0)), NamedSharding(mesh, P()))
  head = model.head
  rng = np.random.default_rng(0)
  n_dev = mesh.size
  data_sh = lambda nd: NamedSharding(mesh, P("data", *([None] * (nd - 1))))
  sel_key = jax.random.key(7)

  @jax.jit
  def encode_texts(params, ids):
    cls, tokens = model.text_features(params, ids)
    side = head.apply({"params": params["head"]}, cls, tokens, method=head.encode_text)
    return head.apply({"params": params["head"]}, side, method=head.project_text)

  @jax.jit
  def encode_videos(params, frames, mask, key):
    frame_cls, patches = model.video_features(params, frames)
    side = head.apply({"params": params["head"]}, frame_cls, patches, mask, rng=key,
                      train=False, method=head.encode_video)
    return head.apply({"params": params["head"]}, side, train=False, method=head.project_video)

  def _levels(params, t, v):
    shared = head.apply({"params": params["head"]}, params["clip"]["logit_scale"],
                        method=head.shared_inputs)
    from ucofia_jax.ops import similarity as sim_ops
    return jnp.stack(sim_ops.pair_levels(t, v, shared, head.tau))          # [3, t, v]

  @functools.partial(jax.jit, static_argnums=(3, 4))
  def blockwise(params, texts, videos, tb, vb):
    """[3, T, V] in (tb x vb) blocks: text blocks sharded over devices, videos looped."""
    nt = jax.tree.leaves(texts)[0].shape[0]
    nv = jax.tree.leaves(videos)[0].shape[0]
    tblocks = jax.tree.map(lambda x: x.reshape(nt // tb, tb, *x.shape[1:]), texts)
    vblocks = jax.tree.map(lambda x: x.reshape(nv // vb, vb, *x.shape[1:]), videos)

    def per_text_block(tblk):
      def per_video_block(vblk):
        return _levels(params, tblk, vblk)                                  # [3, tb, vb]
      out = jax.lax.map(per_video_block, vblocks)                           # [nvb, 3, tb, vb]
      return jnp.moveaxis(out, 0, 2).reshape(3, tb, nv)
    out = jax.lax.map(per_text_block, tblocks)                              # [ntb, 3, tb, V]
    return jnp.moveaxis(out, 0, 1).reshape(3, nt, nv)

  def pad_to(n, m):
    return -(-n // m) * m

  def encode_all_texts(n):
    ids = rng.integers(1, 49000, (n, model.words), dtype=np.int32)
    ids[:, -1] = 49407
    step = pad_to(min(n, 4 * args.encode_batch), n_dev)
    outs = []
    for i in range(0, n, step):
      chunk = ids[i:i + step]
      pad = step - len(chunk)
      chunk = np.concatenate([chunk, np.repeat(chunk[-1:], pad, 0)]) if pad else chunk
      out = encode_texts(params, jax.device_put(chunk, data_sh(2)))
      outs.append(jax.tree.map(lambda x: x[:step - pad] if pad else x, out))
    return jax.tree.map(lambda *xs: jnp.concatenate(xs), *outs)

  def encode_all_videos(n):
    step = pad_to(args.encode_batch, n_dev)
    outs = []
    for i in range(0, n, step):
      m = min(step, n - i)
      frames = rng.integers(0, 256, (step, model.frames, model.res, model.res, 3), dtype=np.uint8)
      mask = np.ones((step, model.frames), np.float32)
      out = encode_videos(params, jax.device_put(frames, data_sh(5)),
                          jax.device_put(mask, data_sh(2)), jax.random.fold_in(sel_key, i))
      outs.append(jax.tree.map(lambda x: x[:m], out))
    return jax.tree.map(lambda *xs: jnp.concatenate(xs), *outs)

  def sims(texts, videos):
    nt = jax.tree.leaves(texts)[0].shape[0]
    nv = jax.tree.leaves(videos)[0].shape[0]
    tb, vb = min(args.text_block, nt), min(args.video_block, nv)
    tpad, vpad = pad_to(nt, tb * 1), pad_to(nv, vb)
    texts = jax.tree.map(lambda x: jnp.pad(x, [(0, tpad - nt)] + [(0, 0)] * (x.ndim - 1)), texts)
    videos = jax.tree.map(lambda x: jnp.pad(x, [(0, vpad - nv)] + [(0, 0)] * (x.ndim - 1)), videos)
    return blockwise(params, texts, videos, tb, vb)[:, :nt, :nv]

  def run():
    timings = {}
    t0 = time.perf_counter()
    test_t = encode_all_texts(args.eval_texts)
    bank_t = encode_all_texts(args.bank_texts)
    jax.block_until_ready((test_t, bank_t))
    timings["encode_texts_s"] = time.perf_counter() - t0
    t1 = time.perf_counter()
    test_v = encode_all_videos(args.eval_videos)
    bank_v = encode_all_videos(args.bank_videos) if args.bank_videos else None
    jax.block_until_ready((test_v, bank_v))
    timings["encode_videos_s"] = time.perf_counter() - t1
    t2 = time.perf_counter()
    s_test = sims(test_t, test_v)                   # [3, T, V]
    s_bank_t2v = sims(bank_t, test_v)               # [3, bank texts, V]
    s_bank_v2t = sims(test_t, bank_v) if bank_v is not None else None  # [3, T, bank videos]
    jax.block_until_ready((s_test, s_bank_t2v, s_bank_v2t))
    timings["similarity_s"] = time.perf_counter() - t2
    t3 = time.perf_counter()
    pri_t2v = sinkhorn.sk_prior_t2v(list(s_bank_t2v), 4, config.eval.sk_domain)
    t2v_sk = sinkhorn.apply_sk_norm(list(s_test), pri_t2v, "t2v")
    if s_bank_v2t is not None:
      pri_v2t = sinkhorn.sk_prior_v2t(list(s_bank_v2t), 4, config.eval.sk_domain)
      v2t_sk = sinkhorn.apply_sk_norm(list(s_test), pri_v2t, "v2t")
    else:
      v2t_sk = t2v_sk
    plain = s_test.mean(0)
    plain, t2v_sk, v2t_sk = (np.asarray(x) for x in (plain, t2v_sk, v2t_sk))
    timings["sk_norm_s"] = time.perf_counter() - t3
    t4 = time.perf_counter()
    res = metrics.retrieval_metrics(plain)
    res["t2v_sk"] = metrics.retrieval_metrics(t2v_sk)["t2v"]
    res["v2t_sk"] = metrics.retrieval_metrics(v2t_sk)["v2t"]
    timings["metrics_s"] = time.perf_counter() - t4
    timings["total_s"] = time.perf_counter() - t0
    return timings, res

  t0 = time.perf_counter()
  run()  # compiles every shape once
  warm = time.perf_counter() - t0
  timings, res = run()
  return dict(kind="eval", dtype=args.eval_dtype, texts=args.eval_texts, videos=args.eval_videos,
              bank_texts=args.bank_texts, bank_videos=args.bank_videos, devices=n_dev,
              first_run_s=warm, t2v_R1=res["t2v"]["R@1"], **timings)


# --------------------------------------------------------------------------- main

def fmt_mfu(mfu: float) -> str:
  return f"{mfu * 100:.1f}%" if np.isfinite(mfu) else "n/a (no --peak_tflops)"


def main(argv=None):
  args = parse_args(argv)
  config = load_config(args.config, args.frames, args.words)
  devices = jax.local_devices()
  mesh = Mesh(np.array(devices), ("data",))
  kind = devices[0].device_kind
  print(f"backend {jax.default_backend()}, {len(devices)} x {kind}; jax {jax.__version__}; "
        f"config {args.config}{' (tiny)' if args.tiny else ''}: frames {config.data.max_frames}, "
        f"words {config.data.max_words}, vision {config.model.clip.vision_layers}L/"
        f"{config.model.clip.vision_width} patch {config.model.clip.vision_patch_size} "
        f"@{config.model.clip.image_resolution}", flush=True)
  rows = []
  t_start = time.perf_counter()
  if not args.skip_train:
    sizes = [int(b) for b in args.batch_sizes.split(",") if b]
    for dtype in [d for d in args.dtypes.split(",") if d]:
      r = bench_train(config, dtype, sizes, args, mesh)
      rows.append(r)
      print(f"  train {dtype}: batch {r['batch']} step {r['step_s'] * 1e3:.1f} ms  "
            f"{r['samples_per_s']:.1f} samples/s  {r['tflops_per_step_per_device']:.4g} TFLOP/step/dev  "
            f"MFU {fmt_mfu(r['mfu'])}  (compile {r['compile_s']:.1f} s)", flush=True)
  if not args.skip_eval:
    r = bench_eval(config, args, mesh)
    rows.append(r)
    print(f"  eval: {r['total_s']:.2f} s", flush=True)

  print()
  print(f"| {kind} x{len(devices)} | batch | step (ms) | samples/s | TFLOP/step/dev | MFU |")
  print("|---|---|---|---|---|---|")
  for r in rows:
    if r["kind"] == "train":
      print(f"| train {r['dtype']} | {r['batch']} | {r['step_s'] * 1e3:.1f} | "
            f"{r['samples_per_s']:.1f} | {r['tflops_per_step_per_device']:.4g} | {fmt_mfu(r['mfu'])} |")
  for r in rows:
    if r["kind"] == "eval":
      print()
      print(f"| eval ({r['dtype']}) | texts x videos | bank t/v | encode texts | encode videos | "
            f"similarities | SK-norm | metrics | total |")
      print("|---|---|---|---|---|---|---|---|---|")
      print(f"| {kind} x{len(devices)} | {r['texts']} x {r['videos']} | {r['bank_texts']} / "
            f"{r['bank_videos']} | {r['encode_texts_s']:.2f} s | {r['encode_videos_s']:.2f} s | "
            f"{r['similarity_s']:.2f} s | {r['sk_norm_s']:.2f} s | {r['metrics_s']:.2f} s | "
            f"**{r['total_s']:.2f} s** |")
  print(f"\nwall time {time.perf_counter() - t_start:.0f} s")
  if args.json:
    Path(args.json).write_text(json.dumps(dict(device=kind, devices=len(devices), rows=rows), indent=1))
  return rows


if __name__ == "__main__":
  main()
