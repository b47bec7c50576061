r"""What the checkpoints' checksums cost: save and restore times with and without them.

  python benchmarks/checkpoint_integrity.py                     # demo and ViT-B/32 rows
  python benchmarks/checkpoint_integrity.py --models=demo --repeats=5

Each row builds a train state of the model's real tree (params and the configured optimizer's
state, every float filled with random numbers so that nothing compresses away) on one device
and times, in a fresh directory per measurement (median of ``--repeats``):

  checksum     ``checkpoints.state_checksums`` of the whole state (the work added to a save,
               and again to a restore), after its one compile (``compile`` column)
  save block   how long ``Checkpointer.save`` holds the train loop with asynchronous saving
               (the default): the checksums plus Orbax's copy to the host
  save total   a synchronous save to disk
  restore      ``Checkpointer.restore`` of the latest step onto the state's shardings

each without checksums (the item is not written / not compared) and with them. Rows:
``demo`` (configs/demo.py) and ``b32`` (configs/msrvtt.py: ViT-B/32 CLIP and the UCoFiA head,
~150M parameters, BertAdam's two moments: ~1.8 GB of arrays; needs ~8 GB of memory).
"""

from __future__ import annotations

import argparse
import os
import shutil
import statistics
import sys
import tempfile
import time

import jax
import jax.numpy as jnp
import numpy as np

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from configs import demo, msrvtt  # noqa: E402  (the repository root is put on sys.path first)
from ucofia_jax.models.model import Model  # noqa: E402
from ucofia_jax.training import checkpoints, optim  # noqa: E402

CONFIGS = {"demo": demo.get_config, "b32": msrvtt.get_config}


def _parse(argv):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--models", default="demo,b32", help="comma-separated: demo,b32")
    p.add_argument("--repeats", type=int, default=3, help="timed runs per cell (median)")
    p.add_argument("--dir", default="", help="where to write (default: a temporary directory)")
    return p.parse_args(argv)


def make_state(name: str):
    """A train state with the real tree of ``name``'s config, random floats throughout."""
    c = CONFIGS[name]()
    model = Model.from_config(c.model, max_frames=c.data.max_frames, max_words=c.data.max_words)
    shapes = jax.eval_shape(model.init, jax.random.PRNGKey(0))
    tx = optim.make_optimizer(c.train, optim.group_schedules(c.train, 1000))
    opt_shapes = jax.eval_shape(tx.init, shapes)
    rng = np.random.default_rng(0)

    def fill(s):
        if jnp.issubdtype(s.dtype, jnp.floating):
            return jnp.asarray(rng.standard_normal(s.shape, np.float32), s.dtype)
        return jnp.zeros(s.shape, s.dtype)

    state = {
        "step": jnp.zeros((), jnp.int32),
        "params": jax.tree.map(fill, shapes),
        "opt_state": jax.tree.map(fill, opt_shapes),
        "rng": jax.random.PRNGKey(1),
    }
    # Committed to a device, as training places its state: the restored arrays then have the
    # same sharding and reuse the checksums' compiled code (as a resumed run does).
    return jax.device_put(state, jax.devices()[0])


def _without_checksums():
    """Patch the module so that nothing is written or compared; returns the undo."""
    item, verify = checkpoints._checksum_item, checkpoints.verify_checksums
    checkpoints._checksum_item = lambda tree: {}
    checkpoints.verify_checksums = lambda *a, **k: None

    def undo():
        checkpoints._checksum_item, checkpoints.verify_checksums = item, verify

    return undo


def _save_restore(state, root: str, repeats: int):
    """(async save blocking s, sync save s, restore s), medians."""
    block, total, restore = [], [], []
    for i in range(repeats):
        wd = os.path.join(root, f"run{i}")
        ck = checkpoints.Checkpointer(wd, keep=2, async_save=True)
        t0 = time.perf_counter()
        ck.save(1, state, {"step": 1})
        block.append(time.perf_counter() - t0)
        ck.close()
        shutil.rmtree(wd)
        ck = checkpoints.Checkpointer(wd, keep=2, async_save=False)
        t0 = time.perf_counter()
        ck.save(1, state, {"step": 1})
        ck.wait()
        total.append(time.perf_counter() - t0)
        t0 = time.perf_counter()
        restored, _ = ck.restore(state)
        jax.block_until_ready(restored)
        restore.append(time.perf_counter() - t0)
        ck.close()
        shutil.rmtree(wd)
    return tuple(statistics.median(x) for x in (block, total, restore))


def row(name: str, root: str, repeats: int):
    state = make_state(name)
    jax.block_until_ready(state)
    n_params = sum(x.size for x in jax.tree.leaves(state["params"]))
    mib = checkpoints.state_nbytes(state) / 2**20
    t0 = time.perf_counter()
    checkpoints.state_checksums(state)
    compile_s = time.perf_counter() - t0
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        checkpoints.state_checksums(state)
        times.append(time.perf_counter() - t0)
    undo = _without_checksums()
    try:
        plain = _save_restore(state, os.path.join(root, f"{name}-plain"), repeats)
    finally:
        undo()
    summed = _save_restore(state, os.path.join(root, f"{name}-sums"), repeats)
    return name, n_params, mib, compile_s, statistics.median(times), plain, summed


def main(argv=None) -> None:
    args = _parse(sys.argv[1:] if argv is None else argv)
    root = args.dir or tempfile.mkdtemp(prefix="ckpt_integrity_")
    print(
        f"jax {jax.__version__}, {jax.devices()[0].platform} ({jax.devices()[0].device_kind}), "
        f"{os.cpu_count()} CPUs, repeats {args.repeats}, in {root}"
    )
    head = (
        "model  params(M)  state MiB  compile s  checksum s  save block s (off/on)  "
        "save total s (off/on)  restore s (off/on)"
    )
    print(head)
    print("-" * len(head))
    try:
        for name in args.models.split(","):
            name, n, mib, comp, chk, plain, summed = row(name.strip(), root, args.repeats)
            cells = [f"{a:.2f}/{b:.2f} ({100 * (b - a) / a:+.0f}%)" for a, b in zip(plain, summed)]
            print(
                f"{name:<6} {n / 1e6:>9.1f} {mib:>10.0f} {comp:>10.2f} {chk:>11.3f}  "
                f"{cells[0]:>21}  {cells[1]:>21}  {cells[2]:>18}",
                flush=True,
            )
    finally:
        if not args.dir:
            shutil.rmtree(root, ignore_errors=True)


if __name__ == "__main__":
    main()
