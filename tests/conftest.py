"""Test set-up shared by the suite; everything here must happen before jax is first imported.

* Four virtual CPU devices let the sharded code paths (mesh over 'data') run here.
* ``--xla_backend_optimization_level=0``: XLA:CPU's LLVM back end spends most of a test's
  time compiling programs that then run a few steps on tiny shapes; the lower level halves
  compile time. It changes the machine code XLA emits, not the HLO program (fusions,
  precision), and every tolerance in the suite holds at either level. Subprocesses that
  play a user's command (the notebook, search, launch.sh: tests/_env.py) keep it but drop
  the forced device count, so they see one CPU device as a user's shell does; the README's
  demo command runs with no XLA flags at all.
* A persistent compilation cache shared by the xdist workers and their subprocesses: many
  tests compile the same tiny programs (the demo's step, the tiny model's encoders). Keyed by
  the program, the compile options and the jax version, so a hit runs the very executable a
  fresh compile would make. ``UCOFIA_TEST_JAX_CACHE=''`` turns it off.
"""

import os
import tempfile

_flags = os.environ.get("XLA_FLAGS", "")
if "xla_force_host_platform_device_count" not in _flags:
    _flags += " --xla_force_host_platform_device_count=4"
if "xla_backend_optimization_level" not in _flags:
    _flags += " --xla_backend_optimization_level=0"
os.environ["XLA_FLAGS"] = _flags.strip()
_cache = os.environ.get(
    "UCOFIA_TEST_JAX_CACHE", os.path.join(tempfile.gettempdir(), f"ucofia-jax-tests-{os.getuid()}")
)
if _cache:
    os.environ.setdefault("JAX_COMPILATION_CACHE_DIR", _cache)
    os.environ.setdefault("JAX_COMPILATION_CACHE_MAX_SIZE", str(4 << 30))
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
