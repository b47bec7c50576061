"""N steps straight vs. a run SIGKILLed after N-1 steps and resumed from its last
checkpoint to N: the parameters must be equal (same data position, PRNG, optimizer state)."""

import os
import subprocess
import sys

import numpy as np
import pytest

HERE = os.path.dirname(os.path.abspath(__file__))


def _worker(mode, root):
    env = dict(os.environ)
    env["PYTHONPATH"] = os.path.dirname(HERE) + os.pathsep + env.get("PYTHONPATH", "")
    # The resumed process reuses the first one's compiled step (speed only).
    env["JAX_COMPILATION_CACHE_DIR"] = os.path.join(root, "jax_cache")
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
