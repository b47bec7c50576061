"""Files kept between processes, in the user's cache folder (``~/.cache/ucofia_jax``).

* ``kernels/``: the native level-3 kernel's shared libraries (``UCOFIA_KERNEL_CACHE`` moves it);
* ``xla/``: JAX's persistent compilation cache, next to it (``UCOFIA_COMPILE_CACHE=DIR`` moves
  it, ``UCOFIA_COMPILE_CACHE=off`` disables it). A second ``search query`` then loads the
  compiled encoders and scorer instead of compiling them again.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Optional

KERNEL_CACHE_ENV = "UCOFIA_KERNEL_CACHE"
COMPILE_CACHE_ENV = "UCOFIA_COMPILE_CACHE"


def kernel_cache_dir() -> Path:
    default = Path.home() / ".cache" / "ucofia_jax" / "kernels"
    return Path(os.environ.get(KERNEL_CACHE_ENV, default))


def compile_cache_dir() -> Optional[Path]:
    """Where compiled programs are kept between processes; None when disabled."""
    value = os.environ.get(COMPILE_CACHE_ENV, "").strip()
    if value.lower() in ("off", "0", "none", "false"):
        return None
    return Path(value) if value else kernel_cache_dir().parent / "xla"


def enable_compilation_cache() -> Optional[Path]:
    """Turns on JAX's persistent compilation cache for every program, however small or quick
    to compile: search compiles a few programs of well under a second each, which JAX's
    defaults would not keep. A setting of the whole process. Returns the folder (None:
    disabled)."""
    folder = compile_cache_dir()
    if folder is None:
        return None
    import jax  # noqa: PLC0415 -- this module is imported by command lines before jax is needed

    jax.config.update("jax_compilation_cache_dir", str(folder))
    jax.config.update("jax_persistent_cache_min_compile_time_secs", 0.0)
    jax.config.update("jax_persistent_cache_min_entry_size_bytes", 0)
    return folder
