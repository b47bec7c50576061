"""UCoFiA head cost on CPU at MSR-VTT shapes (D=512, 32 words, 12 frames x 50 tokens, 48 kept
tokens, 4 seqTransf layers): time and peak memory of

  select     token selection + temporal encoder for 1k videos (perturbed top-k, 500 samples)
  full       1k texts x 1k videos: selection + text side + blockwise three levels
  oneshot    one-shot ``Model.score`` vs blockwise on a smaller N x N (one-shot 1k x 1k
             needs the 't v w p' tensor alone at 6.3 GB)
  bank       SK-norm prior from a query bank (default 9k texts) x 1k videos: three blockwise
             levels in text chunks + Sinkhorn per level

Each configuration runs in its own subprocess so that its peak RSS (ru_maxrss) is its own;
``base`` is the RSS after importing jax and building the inputs that are not streamed.
Scoring is ``Model.score`` (blockwise with ``Blocks``) with the pair function that evaluation
uses (``kernels.native.pair_levels_for(--level3-kernel)``), as ``evaluation.evaluator``.
CLIP outputs are random features (the head alone is initialised, CLIP only lends its
logit scale); per-video token features are generated inside the jitted
per-block loop (as if streamed from CLIP), so the 1.2 GB of [1k, 600, 512] patch tokens never
exist at once; they are drawn with ``ops.topk.hash_normal`` (``--inputs threefry`` for
``jax.random.normal``, which alone costs ~7 s of CPU for 1k videos). ``synth`` times that
input synthesis alone, so it can be subtracted from ``select`` / ``full``. CPU time (user+sys) is reported with wall time because the machine may be shared.

    python benchmarks/similarity.py [--configs select,full,oneshot,bank] [--bank-texts 9000]
        [--bank-videos 1000] [--text-block 50] [--video-block 50] [--json OUT]
        [--inputs hash|threefry] [--noise-prng hash|threefry] [--level3-kernel auto|xla|native]
        (configs also: synth)
"""

from __future__ import annotations

import argparse
import ctypes
import json
import os
import resource
import subprocess
import sys
import time

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from ucofia_jax.kernels import native
from ucofia_jax.models import clip as clip_lib
from ucofia_jax.models.head import UCoFiAHead
from ucofia_jax.models.model import Blocks, Model
from ucofia_jax.ops.blockwise import map_in_blocks
from ucofia_jax.ops.sinkhorn import sk_prior_t2v
from ucofia_jax.ops.topk import hash_normal

D, NW, F, NTOK, LAYERS = 512, 32, 12, 50, 4


def _proc_status_mb(*fields):
    """{field: MB} for the kB fields of /proc/self/status (empty where unavailable)."""
    out = {}
    try:
        with open("/proc/self/status") as fh:
            for line in fh:
                name = line.split(":")[0]
                if name in fields:
                    out[name] = int(line.split()[1]) / 1024.0
    except OSError:
        pass
    return out


def _rss_mb():
    """Peak RSS since the last ``_reset_peak`` (VmHWM), in MB; ru_maxrss where unavailable."""
    peak = _proc_status_mb("VmHWM").get("VmHWM")
    if peak is not None:
        return peak
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0


def _reset_peak():
    # Linux: writing 5 to clear_refs resets VmHWM, so compile-time peaks (LLVM) are not
    # counted as the head's working memory. malloc_trim first hands the heap that compilation
    # freed back to the OS (glibc keeps it otherwise, and it would count as resident).
    _malloc_trim()
    try:
        with open("/proc/self/clear_refs", "w") as fh:
            fh.write("5")
    except OSError:
        pass


def _rss_parts_mb():
    """Current resident memory split into anonymous (heap: arrays, compiled programs) and
    file-backed (pages of mapped shared libraries such as jaxlib's 350 MB libjax_common.so:
    shared between processes and evictable), in MB."""
    parts = _proc_status_mb("RssAnon", "RssFile")
    return {name[3:].lower(): mb for name, mb in parts.items()}


def _malloc_trim():
    try:
        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except (OSError, AttributeError):
        pass


def _cpu_s():
    r = resource.getrusage(resource.RUSAGE_SELF)
    return r.ru_utime + r.ru_stime


def _model(args) -> Model:
    """The evaluation model at MSR-VTT sizes (ViT-B/32 CLIP, whose weights are never made),
    with this run's head settings."""
    clip_cfg = clip_lib.CLIPConfig()
    head = UCoFiAHead(
        embed_dim=D,
        max_frames=F,
        max_words=NW,
        seq_layers=LAYERS,
        eval_noise_prng=args.noise_prng,
    )
    if clip_cfg.embed_dim != D:
        raise ValueError(f"CLIPConfig's width is {clip_cfg.embed_dim}, expected {D}")
    return Model(clip_config=clip_cfg, clip=clip_lib.CLIP(clip_cfg), head=head)


def _child(cfg, args):
    normal = hash_normal if args.inputs == "hash" else jax.random.normal

    model = _model(args)
    head = model.head
    pair_fn = native.pair_levels_for(args.level3_kernel, mask_padding=model.masks_padding)
    blocks = Blocks(text=args.text_block, video=args.video_block)
    key = jax.random.PRNGKey(0)
    z = lambda *s: jnp.zeros(s, jnp.float32)
    head_params = jax.jit(  # plain arrays: the head declares logical axes on its params
        lambda k: nn.unbox(
            head.init(
                k, z(1, D), z(1, NW, D), z(1, F, D), z(1, F * NTOK, D), jnp.ones((1, F)), 0.0, rng=k
            )["params"]
        )
    )(key)
    # Only the head is initialised: of CLIP, scoring reads nothing but the logit scale.
    params = {"clip": {"logit_scale": jnp.log(100.0)}, "head": head_params}
    # Initialisation compiles a program of its own (and, op by op, many small ones); drop
    # those executables so that the resident base is what evaluation itself holds.
    jax.clear_caches()
    head_vars = {"params": params["head"]}

    def _synth(i):  # i: [block] video ids -> random CLIP features of the block
        kf, kp, ks = jax.random.split(jax.random.fold_in(key, i[0]), 3)
        b = i.shape[0]
        fc = normal(kf, (b, F, D)) * 0.5
        pt = normal(kp, (b, F * NTOK, D)) * 0.5
        pt = pt.reshape(b, F, NTOK, D).at[:, :, 0].set(fc).reshape(b, F * NTOK, D)
        return fc, pt, ks

    def _videos(params, idx, block=args.select_block, synth_only=False):
        def one(i):  # i: [block] video ids -> that block's features + selection
            fc, pt, ks = _synth(i)
            if synth_only:
                return {"sum": jnp.sum(pt, axis=(1, 2)) + jnp.sum(fc, axis=(1, 2))}
            return head.apply(
                params, fc, pt, jnp.ones((i.shape[0], F)), rng=ks, method=UCoFiAHead.encode_video
            )

        return map_in_blocks(one, idx, block)

    videos_j = jax.jit(_videos)
    videos = lambda n: videos_j(head_vars, jnp.arange(n))

    def texts(n, seed):
        tt = jnp.asarray(np.random.default_rng(seed).standard_normal((n, NW, D), np.float32) * 0.5)
        return head.apply(head_vars, tt[:, -1], tt, method=UCoFiAHead.encode_text)

    levels_j = jax.jit(lambda t, v: model.score(params, t, v, blockwise=blocks, pair_fn=pair_fn))
    levels = levels_j

    def warm(n_texts=None, n_videos=None):
        # compile without running (lower().compile() fills the same cache as the call)
        if n_videos is not None:
            videos_j.lower(head_vars, jnp.arange(n_videos)).compile()
        if n_texts is not None:
            ts = jax.eval_shape(lambda: texts(n_texts, 0))
            vs = jax.eval_shape(lambda: videos_j(head_vars, jnp.arange(n_videos)))
            levels_j.lower(ts, vs).compile()

    out = {"config": cfg}
    if cfg == "synth":
        synth_j = jax.jit(lambda idx: _videos(head_vars, idx, synth_only=True))
        jax.block_until_ready(synth_j(jnp.arange(1000)))
        _reset_peak()
        t0, c0 = time.time(), _cpu_s()
        jax.block_until_ready(synth_j(jnp.arange(1000)))
        out.update(
            wall_s=time.time() - t0,
            cpu_s=_cpu_s() - c0,
            note=f"input synthesis only ({args.inputs}), 1k videos",
        )
    elif cfg == "select":
        warm(None, 1000)
        _reset_peak()
        t0, c0 = time.time(), _cpu_s()
        v = jax.block_until_ready(videos(1000))
        out.update(wall_s=time.time() - t0, cpu_s=_cpu_s() - c0, note="1k videos, incl. noise")
    elif cfg == "full":
        t0 = time.time()
        warm(1000, 1000)
        out["compile_s"] = time.time() - t0
        _reset_peak()
        base = _rss_mb()
        t0, c0 = time.time(), _cpu_s()
        v = jax.block_until_ready(videos(1000))
        t_sel = time.time() - t0
        t = jax.block_until_ready(texts(1000, 0))
        t_txt = time.time() - t0 - t_sel
        s = jax.block_until_ready(levels(t, v))
        out.update(
            wall_s=time.time() - t0,
            cpu_s=_cpu_s() - c0,
            select_wall_s=t_sel,
            texts_wall_s=t_txt,
            levels_wall_s=time.time() - t0 - t_sel - t_txt,
            base_rss_mb=base,
            shape=list(s[0].shape),
        )
    elif cfg == "oneshot":
        n = args.oneshot_n
        v = jax.block_until_ready(videos(n))
        t = texts(n, 0)
        one = jax.jit(lambda p, t, v: model.score(p, t, v, pair_fn=pair_fn))
        jax.block_until_ready(one(params, t, v))
        jax.block_until_ready(levels(t, v))
        _reset_peak()
        r0 = _rss_mb()
        t0, c0 = time.time(), _cpu_s()
        a = jax.block_until_ready(one(params, t, v))
        out.update(
            oneshot_wall_s=time.time() - t0,
            oneshot_cpu_s=_cpu_s() - c0,
            oneshot_peak_rss_mb=_rss_mb(),
        )
        _reset_peak()
        t0 = time.time()
        b = jax.block_until_ready(levels(t, v))
        out.update(blockwise_peak_rss_mb=_rss_mb())
        out.update(
            blockwise_wall_s=time.time() - t0,
            n=n,
            max_abs_diff=float(
                max(np.abs(np.asarray(x) - np.asarray(y)).max() for x, y in zip(a, b))
            ),
            bitwise_equal=all(np.array_equal(np.asarray(x), np.asarray(y)) for x, y in zip(a, b)),
            rss_before_mb=r0,
        )
    elif cfg == "bank":
        nq, nv, chunk = args.bank_texts, args.bank_videos, 1000
        v = jax.block_until_ready(videos(nv))
        warm(min(chunk, nq), nv)
        jax.block_until_ready(sk_prior_t2v([jnp.zeros((nq, nv))] * 3))
        _reset_peak()
        base = _rss_mb()
        t0, c0 = time.time(), _cpu_s()
        rows = [[], [], []]
        for start in range(0, nq, chunk):
            s = levels(texts(min(chunk, nq - start), 100 + start), v)
            for l in range(3):
                rows[l].append(np.asarray(s[l]))
        banks = [jnp.asarray(np.concatenate(r, 0)) for r in rows]
        t_sim = time.time() - t0
        pri = jax.block_until_ready(sk_prior_t2v(banks))
        out.update(
            wall_s=time.time() - t0,
            cpu_s=_cpu_s() - c0,
            sim_wall_s=t_sim,
            sinkhorn_wall_s=time.time() - t0 - t_sim,
            base_rss_mb=base,
            bank=[nq, nv],
            finite=bool(all(np.isfinite(np.asarray(p)).all() for p in pri)),
        )
    else:
        raise ValueError(cfg)
    out["peak_rss_mb"] = _rss_mb()
    out["rss_now_mb"] = _rss_parts_mb()
    print("RESULT " + json.dumps(out), flush=True)


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--configs", default="select,full,oneshot,bank")
    ap.add_argument("--text-block", type=int, default=50)
    ap.add_argument("--video-block", type=int, default=50)
    ap.add_argument("--oneshot-n", type=int, default=128)
    ap.add_argument("--select-block", type=int, default=10, help="videos per selection block")
    ap.add_argument(
        "--inputs",
        default="hash",
        choices=["hash", "threefry"],
        help="generator of the synthetic CLIP features",
    )
    ap.add_argument(
        "--noise-prng",
        default="hash",
        choices=["hash", "threefry"],
        help="the head's eval_noise_prng (selection noise)",
    )
    ap.add_argument(
        "--level3-kernel",
        default="auto",
        choices=["auto", "xla", "native"],
        help="eval.level3_kernel: the pair function of kernels.native.pair_levels_for "
        "(native: the fused CPU kernel after the GEMM)",
    )
    ap.add_argument("--bank-texts", type=int, default=9000)
    ap.add_argument("--bank-videos", type=int, default=1000)
    ap.add_argument("--json", default=None)
    ap.add_argument("--child", default=None, help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.child:
        return _child(args.child, args)
    results = []
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    env = dict(os.environ, PYTHONPATH=root + os.pathsep + os.environ.get("PYTHONPATH", ""))
    for cfg in args.configs.split(","):
        cmd = [sys.executable, os.path.abspath(__file__), "--child", cfg] + [
            a for a in sys.argv[1:] if not a.startswith("--configs") and a != args.configs
        ]
        t0 = time.time()
        p = subprocess.run(cmd, capture_output=True, text=True, env=env)
        line = [l for l in p.stdout.splitlines() if l.startswith("RESULT ")]
        if p.returncode or not line:
            print(f"{cfg}: FAILED rc={p.returncode}\n{p.stderr[-2000:]}")
            continue
        r = json.loads(line[-1][7:])
        r["process_s"] = time.time() - t0
        results.append(r)
        print(json.dumps(r), flush=True)
    load = os.getloadavg()
    print(
        f"\nload average {load[0]:.1f} {load[1]:.1f} {load[2]:.1f} on {os.cpu_count()} CPUs "
        f"(shared machine: compare cpu_s, not only wall_s)"
    )
    print(f"{'config':8s} {'wall s':>8s} {'cpu s':>8s} {'peak RSS MB':>12s}  notes")
    for r in results:
        wall = r.get("wall_s", r.get("oneshot_wall_s"))
        cpu = r.get("cpu_s", r.get("oneshot_cpu_s"))
        notes = {
            k: v
            for k, v in r.items()
            if k
            not in ("config", "wall_s", "cpu_s", "peak_rss_mb", "oneshot_wall_s", "oneshot_cpu_s")
        }
        print(f"{r['config']:8s} {wall:8.1f} {cpu:8.1f} {r['peak_rss_mb']:12.0f}  {notes}")
    if args.json:
        with open(args.json, "w") as fh:
            json.dump({"results": results, "loadavg": load}, fh, indent=1)


if __name__ == "__main__":
    main()
