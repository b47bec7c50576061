"""N steps straight vs. a run SIGKILLed after N-1 steps (or stopped by Ctrl-C) and resumed
from its last checkpoint to N: the parameters must be equal (same data position, PRNG,
optimizer state)."""

import os
import signal
import subprocess
import sys

import numpy as np
import pytest

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
