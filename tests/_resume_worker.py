"""Subprocess side of test_resume.py.

python tests/_resume_worker.py first  DIR   # straight run to N in DIR/a, then DIR/b killed
                                            # (SIGKILL, no cleanup) after step KILL_AT
python tests/_resume_worker.py resume DIR   # resume DIR/b to N
python tests/_resume_worker.py sigint DIR   # straight run to N in DIR/a, then DIR/c with the
                                            # real signal guard: prints READY before batch
                                            # SIGINT_AT and waits for the parent's SIGINT;
                                            # saves that step, exits 130 (as main does)
python tests/_resume_worker.py sigint_resume DIR   # resume DIR/c to N

The repository root must be importable (test_resume.py puts it on PYTHONPATH); tests/, this
script's directory, is on sys.path as for any script (``_tiny``).
"""

import os
import signal
import sys
import time

import jax
import numpy as np
from _tiny import random_arrays, tiny_config, tiny_model  # tests/ is this script's directory
from _train_data import ArrayData

from ucofia_jax.runtime import sharding
from ucofia_jax.training import checkpoints, loop
from ucofia_jax.training import trainer as train

N, KILL_AT = 6, 5
SIGINT_AT = 3  # the batch (0-based, over epochs) before which the parent presses Ctrl-C


def setup():
    c = tiny_config()
    c.mesh.data = 1
    c.train.checkpoint_every_steps = 2
    c.train.schedule = "warmup_cosine"
    mesh = sharding.make_mesh(c.mesh, jax.devices()[:1])
    model = tiny_model(c)
    state = train.create_train_state(model, 0)
    trainer = train.make_trainer(
        model, c.train, mesh, state, schedule_total=N, axis_rules=c.mesh.logical_axis_rules
    )
    # 3 steps per epoch, so the run crosses an epoch boundary (data position matters).
    data = ArrayData(random_arrays(24, c), batch_size=8, seed=3)
    return c, trainer, state, data


class KillAfter:
    """A 'guard' that kills the process with SIGKILL (no cleanup) once the step is reached."""

    signal_name = None

    def stop_at(self, step):
        if step >= KILL_AT:
            os.kill(os.getpid(), signal.SIGKILL)
        return False


class WaitForSignal(ArrayData):
    """Before batch SIGINT_AT: says READY on stdout and waits (like a slow input pipeline)
    until the guard has seen the parent's SIGINT."""

    guard = None

    def epoch(self, epoch, start_step=0):
        for i, b in enumerate(super().epoch(epoch, start_step), start=start_step):
            if epoch * self.steps_per_epoch + i == SIGINT_AT:
                print("READY", flush=True)
                t0 = time.time()
                while not self.guard.requested and time.time() - t0 < 120:
                    time.sleep(0.05)
            yield b


def run(workdir, trainer, state, data, guard=None):
    ck = checkpoints.Checkpointer(workdir, keep=3)
    placed = train.place_state(trainer, state)
    if ck.latest_step() is not None:
        placed, _ = ck.restore(placed)
    out = loop.train_loop(
        trainer,
        placed,
        data,
        total_steps=N,
        checkpointer=ck,
        guard=guard,
        progress=False,
    )
    ck.close()
    return out


def save_params(out, path):
    flat = {
        jax.tree_util.keystr(p): np.asarray(v)
        for p, v in jax.tree_util.tree_flatten_with_path(jax.device_get(out["params"]))[0]
    }
    np.savez(path, **flat)


def main():
    mode, root = sys.argv[1], sys.argv[2]
    c, trainer, state, data = setup()
    if mode == "sigint":
        save_params(run(os.path.join(root, "a"), trainer, state, data), f"{root}/straight.npz")
        guard = checkpoints.PreemptionGuard()
        waiting = WaitForSignal(data.arrays, batch_size=data.batch_size, seed=data.seed)
        waiting.guard = guard
        out = run(os.path.join(root, "c"), trainer, state, waiting, guard=guard)
        guard.restore()
        print("stopped at step", int(jax.device_get(out["step"])), "by", guard.signal_name)
        sys.exit(130 if guard.signal_name == "SIGINT" else 0)
    if mode == "sigint_resume":
        out = run(os.path.join(root, "c"), trainer, state, data)
        save_params(out, os.path.join(root, "resumed_sigint.npz"))
        print("resumed to", int(jax.device_get(out["step"])))
        return
    if mode == "first":
        out = run(os.path.join(root, "a"), trainer, state, data)
        flat = {
            jax.tree_util.keystr(p): np.asarray(v)
            for p, v in jax.tree_util.tree_flatten_with_path(jax.device_get(out["params"]))[0]
        }
        np.savez(os.path.join(root, "straight.npz"), **flat)
        run(os.path.join(root, "b"), trainer, state, data, guard=KillAfter())
        raise SystemExit("not killed")
    out = run(os.path.join(root, "b"), trainer, state, data)
    flat = {
        jax.tree_util.keystr(p): np.asarray(v)
        for p, v in jax.tree_util.tree_flatten_with_path(jax.device_get(out["params"]))[0]
    }
    np.savez(os.path.join(root, "resumed.npz"), **flat)
    print("resumed to", int(jax.device_get(out["step"])))


if __name__ == "__main__":
    main()
