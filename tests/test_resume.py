"""N steps straight vs. a run SIGKILLed after N-1 steps and resumed from its last
checkpoint to N: the parameters must be equal (same data position, PRNG, optimizer state)."""
import os
import subprocess
import sys

import numpy as np

HERE = os.path.dirname(os.path.abspath(__file__))


def _worker(mode, root):
  env = dict(os.environ)
  env["PYTHONPATH"] = os.path.dirname(HERE) + os.pathsep + env.get("PYTHONPATH", "")
  # The resumed process reuses the first one's compiled step (speed only).
  env["JAX_COMPILATION_CACHE_DIR"] = os.path.join(root, "jax_cache")
  env["JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS"] = "0"
  return subprocess.run([sys.executable, os.path.join(HERE, "_resume_worker.py"), mode, root],
                        env=env, capture_output=True, text=True, timeout=900)


def test_sigkill_and_resume_gives_the_same_params(tmp_path):
  root = str(tmp_path)
  first = _worker("first", root)
  assert first.returncode == -9, f"expected SIGKILL, got {first.returncode}:\n{first.stderr[-3000:]}"
  ckpts = sorted(os.listdir(os.path.join(root, "b", "checkpoints")))
  assert ckpts, "the killed run left no checkpoint"
  second = _worker("resume", root)
  assert second.returncode == 0, second.stderr[-3000:]
  assert "resumed to 6" in second.stdout
  a = np.load(os.path.join(root, "straight.npz"))
  b = np.load(os.path.join(root, "resumed.npz"))
  assert set(a.files) == set(b.files)
  for k in a.files:
    # Same ops in the same order on the same device: bit-identical.
    np.testing.assert_array_equal(b[k], a[k], err_msg=k)
