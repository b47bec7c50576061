"""N steps straight vs. a run SIGKILLed after N-1 steps (or stopped by Ctrl-C) and resumed
from its last checkpoint to N: the parameters must be equal (same data position, PRNG,
optimizer state). And the resume check (issue 21, item 6): a config that changes the state's
structure or the data is refused naming the key before any dataset is built; a changed lr
resumes with one line saying so."""

import functools
import os
import signal
import subprocess
import sys

import jax
import numpy as np
import pytest
from _tiny import tiny_config, tiny_model

from ucofia_jax import errors, main, preflight
from ucofia_jax.runtime import sharding
from ucofia_jax.training import checkpoints, resume
from ucofia_jax.training import trainer as train

HERE = os.path.dirname(os.path.abspath(__file__))


def _worker(mode, root):
    env = dict(os.environ)
    env["PYTHONPATH"] = os.path.dirname(HERE) + os.pathsep + env.get("PYTHONPATH", "")
    # The resumed process reuses the first one's compiled step (speed only); the suite's
    # cache (conftest.py) when there is one, shared with the other resume tests.
    env.setdefault("JAX_COMPILATION_CACHE_DIR", os.path.join(root, "jax_cache"))
    env["JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS"] = "0"
    return subprocess.run(
        [sys.executable, os.path.join(HERE, "_resume_worker.py"), mode, root],
        env=env,
        capture_output=True,
        text=True,
        timeout=900,
    )


@pytest.mark.slow
def test_sigkill_and_resume_gives_the_same_params(tmp_path):
    root = str(tmp_path)
    first = _worker("first", root)
    assert first.returncode == -9, (
        f"expected SIGKILL, got {first.returncode}:\n{first.stderr[-3000:]}"
    )
    ckpts = sorted(os.listdir(os.path.join(root, "b", "checkpoints")))
    assert ckpts, "the killed run left no checkpoint"
    second = _worker("resume", root)
    assert second.returncode == 0, second.stderr[-3000:]
    assert "resumed to 6" in second.stdout
    a = np.load(os.path.join(root, "straight.npz"))
    b = np.load(os.path.join(root, "resumed.npz"))
    assert set(a.files) == set(b.files)
    for k in a.files:
        # Same ops on the same device: equal up to 1 ulp (XLA's CPU thread pool may split a
        # reduction differently between the two processes). A wrong data position, PRNG key or
        # optimizer state would differ by orders of magnitude more.
        np.testing.assert_allclose(b[k], a[k], rtol=1e-6, atol=1e-30, err_msg=k)


@pytest.mark.slow
def test_sigint_saves_the_step_and_resumes_exactly(tmp_path):
    """Ctrl-C (a real SIGINT from outside) during training: the step in progress finishes, is
    saved, the process exits 130; the resumed run ends bitwise equal to a straight one."""
    root = str(tmp_path)
    env = dict(os.environ)
    env["PYTHONPATH"] = os.path.dirname(HERE) + os.pathsep + env.get("PYTHONPATH", "")
    env.setdefault("JAX_COMPILATION_CACHE_DIR", os.path.join(root, "jax_cache"))
    env["JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS"] = "0"
    proc = subprocess.Popen(
        [sys.executable, os.path.join(HERE, "_resume_worker.py"), "sigint", root],
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    lines = []
    for line in proc.stdout:
        lines.append(line)
        if line.strip() == "READY":
            proc.send_signal(signal.SIGINT)
            break
    out, err = proc.communicate(timeout=600)
    assert proc.returncode == 130, f"{proc.returncode}:\n{err[-3000:]}"
    assert "stopped at step 4 by SIGINT" in out, out
    assert "SIGINT: saving a checkpoint after this step" in err
    assert "Traceback" not in err and "KeyboardInterrupt" not in err, err[-3000:]
    steps = sorted(int(n) for n in os.listdir(os.path.join(root, "c", "checkpoints")))
    assert steps[-1] == 4, steps  # the step the signal interrupted was saved

    second = _worker("sigint_resume", root)
    assert second.returncode == 0, second.stderr[-3000:]
    assert "resumed to 6" in second.stdout
    a = np.load(os.path.join(root, "straight.npz"))
    b = np.load(os.path.join(root, "resumed_sigint.npz"))
    assert set(a.files) == set(b.files)
    for k in a.files:
        # Bitwise: the resumed process runs the same compiled steps on the same data.
        np.testing.assert_array_equal(b[k], a[k], err_msg=k)


# --------------------------------------------------------------------------- the resume check


def _config(workdir):
    c = tiny_config()
    c.mesh.data = 1
    c.train.update(dict(epochs=0, num_steps=4))
    return preflight.resolve_paths(c, workdir)  # as main does before saving the config


def _placed_state(c):
    """The state a run of ``c`` trains (its optimizer's real state), on one device."""
    model = tiny_model(c)
    state = train.create_train_state(model, c.seed)
    mesh = sharding.make_mesh(c.mesh, jax.devices()[:1])
    trainer = train.make_trainer(
        model, c.train, mesh, state, schedule_total=4, axis_rules=c.mesh.logical_axis_rules
    )
    return train.place_state(trainer, state)


@pytest.fixture(scope="module")
def saved_workdir(tmp_path_factory):
    """A workdir with checkpoint 2 of the tiny config, as a run of main leaves it."""
    workdir = str(tmp_path_factory.mktemp("resume_check") / "run")
    c = _config(workdir)
    ck = checkpoints.Checkpointer(workdir, keep=2, async_save=False)
    meta = {"step": 2, "epoch": 0, "step_in_epoch": 2, "config": resume.config_dict(c)}
    ck.save(2, _placed_state(c), meta)
    ck.close()
    return workdir


class _DatasetBuilt(Exception):
    """Raised by the stand-in of main's dataset step: the run got past the resume check."""


@pytest.fixture
def no_dataset(monkeypatch):
    """main's dataset step replaced by a recorder that stops the run there."""
    calls = []

    def build(config, out):
        calls.append(config.data.data_dir)
        raise _DatasetBuilt

    monkeypatch.setattr(main, "_prepare_synthetic_data", build)
    return calls


# (override key, value, what the one-line refusal must name)
REFUSED = [
    ("data.max_frames", 3, "config.data.max_frames 2 -> 3"),
    ("data.jpeg_quality", 80, "config.data.jpeg_quality 95 -> 80"),
    ("data.slice_framepos", 0, "config.data.slice_framepos 2 -> 0"),
    ("train.optimizer", "adamw", "config.train.optimizer 'bertadam' -> 'adamw'"),
    ("train.weight_decay", 0.0, "config.train.weight_decay 0.2 -> 0.0"),  # no decay state
    ("model.clip.embed_dim", 128, "config.model.clip.embed_dim 64 -> 128"),
    ("model.clip.dtype", "bfloat16", "config.model.clip.dtype 'float32' -> 'bfloat16'"),
    ("seed", 3, "config.seed 0 -> 3"),
]


@pytest.mark.parametrize("key,value,named", REFUSED, ids=[r[0] for r in REFUSED])
def test_refused_change_is_named_before_any_dataset_is_built(
    saved_workdir, no_dataset, capsys, key, value, named
):
    c = _config(saved_workdir)
    section, _, leaf = key.rpartition(".")
    (c[section] if section else c)[leaf] = value
    if key == "model.clip.embed_dim":
        c.model.clip.text_width = 128
    with pytest.raises(errors.ConfigError) as refused:
        main.run(c, saved_workdir, "train", progress=False)
    msg = str(refused.value)
    assert named in msg and "\n" not in msg, msg
    assert msg.startswith(os.path.join(saved_workdir, "checkpoints", "2") + " was written")
    assert no_dataset == [] and not os.path.exists(os.path.join(saved_workdir, "data"))
    assert "resuming" not in capsys.readouterr().out


def test_another_optimizer_names_the_key_and_the_state_paths(saved_workdir, no_dataset):
    c = _config(saved_workdir)
    c.train.optimizer = "adamw"
    with pytest.raises(errors.ConfigError, match="another model or optimizer") as refused:
        main.run(c, saved_workdir, "train", progress=False)
    assert "its state differs: opt_state/" in str(refused.value)


def test_allowed_data_change_resumes_with_one_line(saved_workdir, no_dataset, capsys):
    c = _config(saved_workdir)
    c.data.jpeg_quality = 80
    c.train.allow_resume_with_changes = True
    with pytest.raises(_DatasetBuilt):
        main.run(c, saved_workdir, "train", progress=False)
    said = [ln for ln in capsys.readouterr().out.splitlines() if ln.startswith("resuming")]
    assert len(said) == 1 and said[0].endswith(
        "with changed settings: config.data.jpeg_quality 95 -> 80, "
        "config.train.allow_resume_with_changes False -> True"
    ), said


def test_changed_lr_resumes_with_one_line_saying_what_changed(saved_workdir, no_dataset, capsys):
    c = _config(saved_workdir)
    c.train.lr = 0.002
    c.train.warmup_proportion = 0.2
    with pytest.raises(_DatasetBuilt):  # past the check: on to the dataset
        main.run(c, saved_workdir, "train", progress=False)
    said = [ln for ln in capsys.readouterr().out.splitlines() if "changed settings" in ln]
    where = os.path.join(saved_workdir, "checkpoints", "2")
    assert said == [
        f"resuming {where} with changed settings: config.train.lr 0.001 -> 0.002, "
        "config.train.warmup_proportion 0.1 -> 0.2"
    ], said
    assert no_dataset == [c.data.data_dir]
    # ... and the checkpoint restores under the check _train runs on it.
    state = _placed_state(c)
    check = functools.partial(
        resume.check_resume,
        resume.config_dict(c),
        saved_workdir,
        shapes=resume.tree_shapes(state["params"]),
    )
    ck = checkpoints.Checkpointer(saved_workdir, keep=2)
    try:
        restored, meta = ck.restore_latest(state, check=check)
    finally:
        ck.close()
    assert meta["step"] == 2 and int(restored["step"]) == 0


def test_the_state_tree_of_a_config_matches_what_training_saves(saved_workdir):
    """main's traced state (no arrays) names and shapes every array a run saves: an unchanged
    config is never refused for its structure."""
    c = _config(saved_workdir)
    _, _, saved = checkpoints.newest_saved(saved_workdir)
    assert saved == main._state_shapes(c, tiny_model(c))
    assert len(saved) > 100 and any(k.startswith("opt_state/") for k in saved)
