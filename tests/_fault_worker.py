"""Subprocess side of test_faults.py: tiny training runs with a fault injected.

python tests/_fault_worker.py nan      DIR   # lr 1e30: NaN at some step, checkpoint every step
python tests/_fault_worker.py damage   DIR   # damaged latest checkpoint (3 kinds) -> fallback;
                                             # a changed config on resume -> refused
python tests/_fault_worker.py readonly DIR   # checkpoints/ made immutable (chattr +i) mid-run
python tests/_fault_worker.py readonly_midsave DIR   # the directory an asynchronous save is
                                             # writing made immutable (chattr -R +i) under it
python tests/_fault_worker.py diskfull DIR   # checkpoints/ on a tiny tmpfs: disk full mid-run

Each writes DIR/result.json for the test to read. The repository root must be importable
(test_faults.py puts it on PYTHONPATH); tests/ is this script's directory (``_tiny``).
"""

import glob
import json
import os
import shutil
import subprocess
import sys
import time

import jax
import numpy as np
from _tiny import random_arrays, tiny_config, tiny_model  # tests/ is this script's directory
from _train_data import ArrayData

from ucofia_jax import errors
from ucofia_jax.runtime import sharding
from ucofia_jax.training import checkpoints, loop, resume
from ucofia_jax.training import trainer as train

N = 4
VIDEO_IDS = [f"video{100 + i}" for i in range(24)]


def setup(**train_overrides):
    c = tiny_config()
    c.mesh.data = 1
    c.train.checkpoint_every_steps = 1
    c.train.update(train_overrides)
    mesh = sharding.make_mesh(c.mesh, jax.devices()[:1])
    model = tiny_model(c)
    state = train.create_train_state(model, 0)
    trainer = train.make_trainer(
        model, c.train, mesh, state, schedule_total=N, axis_rules=c.mesh.logical_axis_rules
    )
    data = ArrayData(random_arrays(24, c), batch_size=8, seed=3, video_ids=VIDEO_IDS)
    return c, model, trainer, state, data


def flat_params(state):
    return {
        jax.tree_util.keystr(p): np.asarray(v)
        for p, v in jax.tree_util.tree_flatten_with_path(jax.device_get(state["params"]))[0]
    }


def all_finite(tree) -> bool:
    return all(
        bool(np.all(np.isfinite(np.asarray(x))))
        for x in jax.tree.leaves(jax.device_get(tree))
        if np.issubdtype(np.asarray(x).dtype, np.inexact)
    )


def batch_ids(data, epoch, step_in_epoch):
    """The video ids of a batch, computed the way ArrayData orders rows."""
    n = len(data.video_ids)
    order = np.random.default_rng([data.seed, epoch]).permutation(n)
    rows = order[step_in_epoch * data.batch_size : (step_in_epoch + 1) * data.batch_size]
    return [data.video_ids[i] for i in rows]


def run(workdir, trainer, state, data, total=N, keep=3, check=None, **kw):
    ck = checkpoints.Checkpointer(workdir, keep=keep)
    try:
        placed = train.place_state(trainer, state)
        restored = ck.restore_latest(placed, check=check)
        start = None
        if restored is not None:
            placed, meta = restored
            start = meta["step"]
        ck.check_room(placed)
        out = loop.train_loop(
            trainer,
            placed,
            data,
            total_steps=total,
            checkpointer=ck,
            progress=False,
            start_step=start,
            **kw,
        )
    finally:
        ck.close()
    return out


# --------------------------------------------------------------------------- modes


def mode_nan(root):
    c, model, trainer, state, data = setup(lr=1e30, clip_lr=1e30, schedule="constant")
    wd = os.path.join(root, "run")
    result = {}
    try:
        run(wd, trainer, state, data, total=6)
        result["error"] = None
    except errors.NonFiniteLossError as e:
        result["error"] = str(e)
    ck = checkpoints.Checkpointer(wd, keep=3)
    target = train.place_state(trainer, state)
    result["saved"] = {}
    for step in ck.complete_steps():
        restored, _ = ck.restore(target, step)
        result["saved"][step] = {
            "finite": all_finite(restored),
            "state_step": int(jax.device_get(restored["step"])),
        }
    ck.close()
    spe = data.steps_per_epoch
    result["ids_of_step"] = {k: batch_ids(data, (k - 1) // spe, (k - 1) % spe) for k in range(1, 7)}
    return result


def _truncate(step_dir):
    files = sorted(glob.glob(os.path.join(step_dir, "state", "ocdbt.process_0", "d", "*")))
    big = max(files, key=os.path.getsize)
    with open(big, "r+b") as f:
        f.truncate(os.path.getsize(big) // 2)


DAMAGE = {
    "truncated_array": _truncate,
    "no_state_metadata": lambda d: os.remove(os.path.join(d, "state", "_METADATA")),
    "no_meta_metadata": lambda d: os.remove(os.path.join(d, "meta", "metadata")),
}


def mode_damage(root):
    c, model, trainer, state, data = setup()
    base = os.path.join(root, "base")
    straight = flat_params(run(base, trainer, state, data))
    result = {"kinds": {}}
    for kind, damage in DAMAGE.items():
        wd = os.path.join(root, kind)
        shutil.copytree(base, wd)
        damage(os.path.join(wd, "checkpoints", str(N)))
        t0 = time.time()
        out = run(wd, trainer, state, data)
        got = flat_params(out)
        result["kinds"][kind] = {
            "equal": all(np.array_equal(got[k], straight[k]) for k in straight),
            "step": int(jax.device_get(out["step"])),
            "set_aside": sorted(os.listdir(os.path.join(wd, checkpoints.DAMAGED_DIR))),
            "seconds": time.time() - t0,
        }

    # A changed config on resume: refused before any array is read, naming the keys.
    saved_cfg = resume.config_dict(c)

    def refused(new_cfg, params):
        def check(step, meta, shapes):
            resume.check_resume(
                resume.config_dict(new_cfg),
                base,
                step,
                {**meta},
                shapes,
                resume.tree_shapes(params),
                allow_changes=new_cfg.train.allow_resume_with_changes,
            )

        ck = checkpoints.Checkpointer(base, keep=3)
        try:
            ck.restore_latest(train.place_state(trainer, state), check=check)
            return None
        except errors.ConfigError as e:
            return str(e)
        finally:
            ck.close()

    # The checkpoints of `run` carry no config in their meta: the workdir's config.json is
    # what a resumed run compares with (main writes both).
    with open(os.path.join(base, "config.json"), "w") as f:
        json.dump(saved_cfg, f)
    params = jax.device_get(state["params"])
    batch = tiny_config()
    batch.mesh.data = 1
    batch.train.checkpoint_every_steps = 1
    batch.train.batch_size = 16
    batch.seed = 7
    result["batch_seed"] = refused(batch, params)
    batch.train.allow_resume_with_changes = True
    result["batch_seed_allowed"] = refused(batch, params)
    wider = tiny_config()
    wider.mesh.data = 1
    wider.train.checkpoint_every_steps = 1
    wider.model.clip.embed_dim = 128
    wider.model.clip.text_width = 128
    wider_params = jax.device_get(tiny_model(wider).init(jax.random.PRNGKey(0)))
    result["model"] = refused(wider, wider_params)
    return result


def _stop_run(root, make_fault, undo_fault):
    """Train with a checkpoint every step; ``make_fault(checkpoints dir)`` runs before the
    3rd batch (while the save of step 2 may still be writing); ``undo_fault`` at the end."""
    c, model, trainer, state, data = setup()
    wd = os.path.join(root, "run")
    marks = {}

    class Faulty(ArrayData):
        def epoch(self, epoch, start_step=0):
            for i, b in enumerate(super().epoch(epoch, start_step)):
                if epoch == 0 and i == 2 and "fault" not in marks:
                    marks["saved_before"] = checkpoints._step_dirs(os.path.join(wd, "checkpoints"))
                    make_fault(os.path.join(wd, "checkpoints"))
                    marks["fault"] = time.time()
                yield b

    faulty = Faulty(data.arrays, batch_size=8, seed=3, video_ids=VIDEO_IDS)
    result = {}
    try:
        run(wd, trainer, state, faulty, total=8)
        result["error"] = None
    except errors.CheckpointError as e:
        result["error"] = str(e)
        result["seconds_to_stop"] = time.time() - marks["fault"]
    finally:
        undo_fault(os.path.join(wd, "checkpoints"))
    result["saved_before"] = marks.get("saved_before")
    ckdir = os.path.join(wd, "checkpoints")
    result["tmp_left"] = [n for n in os.listdir(ckdir) if checkpoints.TMP_MARK in n]
    # The previous checkpoint is intact: it restores and is finite.
    ck = checkpoints.Checkpointer(wd, keep=3)
    target = train.place_state(trainer, state)
    result["complete"] = ck.complete_steps()
    restored, meta = ck.restore(target, ck.complete_steps()[-1])
    result["intact_step"] = int(meta["step"])
    result["intact_finite"] = all_finite(restored)
    ck.close()
    result["tmp_left_after_restart"] = [n for n in os.listdir(ckdir) if checkpoints.TMP_MARK in n]
    return result


def mode_readonly(root):
    def fault(d):
        subprocess.run(["chattr", "+i", d], check=True)

    def undo(d):
        subprocess.run(["chattr", "-i", d], check=False)

    return _stop_run(root, fault, undo)


def mode_readonly_midsave(root):
    """The save's half-written directory turns immutable while Orbax writes its arrays
    (one of them, at least): the writes in flight fail in TensorStore's threads."""
    locked = []

    def fault(d):
        t0 = time.time()
        while not locked and time.time() - t0 < 5:
            locked.extend(glob.glob(os.path.join(d, f"*{checkpoints.TMP_MARK}*")))
            time.sleep(0.001)
        if locked:
            subprocess.run(["chattr", "-R", "+i", *locked], check=True)

    def undo(d):
        for path in locked:
            subprocess.run(["chattr", "-R", "-i", path], check=False)

    result = _stop_run(root, fault, undo)
    result["locked"] = locked
    return result


def mode_diskfull(root):
    """checkpoints/ on a tmpfs with room for two checkpoints, not three: the start-up check
    passes, the third save runs out of space (a real ENOSPC; needs mount permission)."""
    c, model, trainer, state, data = setup()
    # A trained state hardly compresses: a checkpoint takes about its array bytes.
    one = checkpoints.state_nbytes(train.place_state(trainer, state))
    wd = os.path.join(root, "run")
    ckdir = os.path.join(wd, "checkpoints")
    os.makedirs(ckdir)
    size = int(2.5 * one) + (1 << 20)
    subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={size}", "tmpfs", ckdir], check=True)
    result = {"checkpoint_bytes": one, "tmpfs_bytes": size}
    try:
        t0 = time.time()
        try:
            run(wd, trainer, state, data, total=8)
            result["error"] = None
        except errors.CheckpointError as e:
            result["error"] = str(e)
            result["seconds"] = time.time() - t0
        result["tmp_left"] = [n for n in os.listdir(ckdir) if checkpoints.TMP_MARK in n]
        ck = checkpoints.Checkpointer(wd, keep=3)
        result["complete"] = ck.complete_steps()
        restored, meta = ck.restore(train.place_state(trainer, state), ck.complete_steps()[-1])
        result["intact_step"] = int(meta["step"])
        result["intact_finite"] = all_finite(restored)
        ck.close()
    finally:
        subprocess.run(["umount", ckdir], check=False)
    return result


def main():
    mode, root = sys.argv[1], sys.argv[2]
    result = globals()[f"mode_{mode}"](root)
    with open(os.path.join(root, "result.json"), "w") as f:
        json.dump(result, f, indent=1, default=str)
    print("done", mode)


if __name__ == "__main__":
    main()
