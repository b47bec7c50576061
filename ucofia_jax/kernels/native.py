"""Native CPU kernels, built from source on first use and called through XLA FFI.

One kernel so far: ``pixel_word_isa``, level 3 of the head after its GEMM (see
``pixel_word_cpu.cc``), 2-3x faster than the XLA:CPU fusions of the same maths. It is an
evaluation fast path: no masks, float32, CPU backend; its gradient is the XLA code's
(``level3_native``). Everything else, and every platform without a C++ compiler, uses the
pure-JAX code in ``ops.similarity``, which stays the reference (tests compare the two).

The choice between the two is made here, above the maths: ``pair_levels_for(choice,
mask_padding)`` returns the pair function the evaluation passes to ``Model.score``.

Build: ``$CXX`` (default: the first of ``c++``, ``g++``, ``clang++`` on PATH) with
``-O3 -march=native`` against the FFI headers that ship with jaxlib; the shared library is
cached under ``$UCOFIA_KERNEL_CACHE`` (default ``~/.cache/ucofia_jax/kernels``) keyed by the
source, the jaxlib version, the compiler and the CPU's feature flags, so a cache shared by
different machines never hands one a library built for another's instruction set. Written to a temporary name and renamed, so concurrent processes
(multi-process runs) can build at once.
"""

from __future__ import annotations

import ctypes
import hashlib
import logging
import os
import platform
import shutil
import subprocess
import tempfile
import threading
from pathlib import Path
from typing import Optional, Tuple

import jax
import jax.numpy as jnp
import jaxlib

from ucofia_jax.ops import similarity
from ucofia_jax.runtime import caches

log = logging.getLogger(__name__)

SOURCE = Path(__file__).with_name("pixel_word_cpu.cc")
TARGET = "ucofia_pixel_word_isa"
FLAGS = ("-O3", "-march=native", "-std=c++17", "-shared", "-fPIC", "-w")
BUILD_TIMEOUT_S = 300

# Config values of ``eval.level3_kernel``: "auto" = native on a CPU backend when it builds.
LEVEL3_KERNELS = ("auto", "xla", "native")

_lock = threading.Lock()
_state: dict = {}  # "ok": bool, "reason": str (the library path when ok), "lib"


def _cpu_flags() -> str:
    try:
        with open("/proc/cpuinfo") as fh:
            for line in fh:
                if line.startswith(("flags", "Features")):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def cache_dir() -> Path:
    return caches.kernel_cache_dir()


def _compiler() -> Tuple[Optional[str], str]:
    names = [os.environ["CXX"]] if os.environ.get("CXX") else ["c++", "g++", "clang++"]
    path = next((p for p in map(shutil.which, names) if p), None)
    if path is None:
        return None, f"no C++ compiler: {' / '.join(map(repr, names))} not found (set $CXX)"
    try:
        version = subprocess.run(
            [path, "--version"], capture_output=True, text=True, timeout=30
        ).stdout.splitlines()[:1]
    except (OSError, subprocess.SubprocessError) as e:
        return None, f"C++ compiler {path} does not run: {e}"
    return path, (version[0] if version else path)


def _build() -> Path:
    """Compile (or find in the cache) the kernel library; raises RuntimeError with the reason."""
    cxx, version = _compiler()
    if cxx is None:
        raise RuntimeError(version)
    include = jax.ffi.include_dir()
    key = hashlib.sha256(
        "\0".join(
            [
                SOURCE.read_text(),
                jaxlib.__version__,
                version,
                " ".join(FLAGS),
                _cpu_flags(),
            ]
        ).encode()
    ).hexdigest()[:16]
    out = cache_dir() / f"pixel_word_cpu-{key}.so"
    if out.exists():
        return out
    out.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=out.parent, prefix=out.name + ".", suffix=".partial")
    os.close(fd)
    cmd = [cxx, *FLAGS, f"-I{include}", str(SOURCE), "-o", tmp]
    try:
        p = subprocess.run(cmd, capture_output=True, text=True, timeout=BUILD_TIMEOUT_S)
        if p.returncode:
            raise RuntimeError(
                f"building {SOURCE.name} failed ({' '.join(cmd)}):\n{p.stderr[-3000:]}"
            )
        os.replace(tmp, out)
    except subprocess.TimeoutExpired as e:
        raise RuntimeError(f"building {SOURCE.name} took over {BUILD_TIMEOUT_S} s") from e
    finally:
        if os.path.exists(tmp):
            os.remove(tmp)
    return out


def load() -> Tuple[bool, str]:
    """Build and register the kernel once per process: (available, reason or library path)."""
    with _lock:
        if not _state:
            try:
                path = _build()
                lib = ctypes.CDLL(str(path))
                jax.ffi.register_ffi_target(
                    TARGET, jax.ffi.pycapsule(lib.UcofiaPixelWordIsa), platform="cpu"
                )
                _state.update(ok=True, reason=str(path), lib=lib)
            except (RuntimeError, OSError, AttributeError) as e:
                _state.update(ok=False, reason=str(e))
                log.warning("native pixel-word kernel unavailable, using XLA: %s", e)
        return _state["ok"], _state["reason"]


def _check_choice(choice: str) -> None:
    if choice not in LEVEL3_KERNELS:
        raise ValueError(f"level3_kernel must be one of {LEVEL3_KERNELS}, got {choice!r}")


def resolve_level3_kernel(choice: str) -> str:
    """'auto' | 'xla' | 'native' -> 'xla' or 'native' for this process.

    'auto' is 'native' when the default backend is the CPU and the kernel builds; 'native'
    insists (error naming the reason when it cannot)."""
    _check_choice(choice)
    if choice == "xla":
        return "xla"
    if jax.default_backend() != "cpu":
        if choice == "native":
            raise RuntimeError(
                "level3_kernel='native' is a CPU kernel; the default backend "
                f"is {jax.default_backend()!r} (use 'auto' or 'xla')"
            )
        return "xla"
    ok, reason = load()
    if ok:
        return "native"
    if choice == "native":
        raise RuntimeError(f"level3_kernel='native' but the kernel is unavailable: {reason}")
    return "xla"


def pixel_word_isa(
    g: jax.Array,
    pixel_w: jax.Array,
    word_w2: jax.Array,
    word_w: jax.Array,
    pixel_w2: jax.Array,
    tau,
) -> jax.Array:
    """Level 3 after the GEMM: G 't w v p' -> 't v' (no logit scale), see pixel_word_cpu.cc.

    Same maths as ``ops.similarity.pixel_word`` without masks; agrees with it to float32
    rounding. Builds and registers the kernel on first use (RuntimeError when it cannot)."""
    ok, reason = load()
    if not ok:
        raise RuntimeError(f"the native pixel-word kernel is unavailable: {reason}")
    if g.ndim != 4:
        raise ValueError(f"G must be 't w v p', got shape {tuple(g.shape)}")
    t, w, v, p = g.shape
    for name, m, n in (
        ("pixel_mat_weight", pixel_w, p),
        ("word_mat_weight2", word_w2, w),
        ("word_mat_weight", word_w, w),
        ("pixel_mat_weight2", pixel_w2, p),
    ):
        if tuple(m.shape) != (n, n):
            raise ValueError(
                f"{name} has shape {tuple(m.shape)}, expected {(n, n)} for G of "
                f"shape {tuple(g.shape)}"
            )
    f32 = lambda x: jnp.asarray(x, jnp.float32)
    call = jax.ffi.ffi_call(
        TARGET, jax.ShapeDtypeStruct((t, v), jnp.float32), vmap_method="sequential"
    )
    return call(
        f32(g), f32(pixel_w), f32(word_w2), f32(word_w), f32(pixel_w2), jnp.reshape(f32(tau), ())
    )


@jax.custom_vjp
def level3_native(g: jax.Array, mats: similarity.IsaMatrices, tau: jax.Array) -> jax.Array:
    """``similarity.level3_from_g`` in the native kernel (``pixel_word(after_gemm=...)``).

    Its gradient is that of the XLA code, recomputed in the backward pass, so differentiating
    an evaluation path still works."""
    return pixel_word_isa(
        g, mats.pixel_mat_weight, mats.word_mat_weight2, mats.word_mat_weight,
        mats.pixel_mat_weight2, tau,
    )  # fmt: skip


def _level3_native_fwd(g, mats, tau):
    return level3_native(g, mats, tau), (g, mats, tau)


def _level3_native_bwd(residuals, cotangent):
    return jax.vjp(similarity.level3_from_g, *residuals)[1](cotangent)


level3_native.defvjp(_level3_native_fwd, _level3_native_bwd)


def pair_levels_native(
    text: similarity.TextPairInputs,
    video: similarity.VideoPairInputs,
    consts: similarity.PairConstants,
) -> similarity.SimilarityLevels:
    """``similarity.pair_levels`` with level 3 after its GEMM in the native kernel. A stable
    module-level function: blockwise kernels take the pair function as a static argument."""
    return similarity.pair_levels(text, video, consts, after_gemm=level3_native)


def check_takes_masks(choice: str, *, mask_padding: bool) -> None:
    """The native kernel takes no masks: with masked padding, 'native' is refused ('auto'
    falls back to XLA). The rule's one statement, for ``pair_levels_for`` and the run's
    config check before compiling (ucofia_jax/preflight.py)."""
    if mask_padding and choice == "native":
        raise ValueError(
            "config.eval.level3_kernel = 'native' takes no masks; "
            "config.model.head.mask_padding=True needs 'auto' or 'xla'"
        )


def pair_levels_for(choice: str, *, mask_padding: bool):
    """The pair function for ``eval.level3_kernel = choice`` in this process.

    Masked padding needs the XLA code ('auto' falls back to it; 'native' is refused)."""
    if mask_padding:
        _check_choice(choice)
        check_takes_masks(choice, mask_padding=mask_padding)
        return similarity.pair_levels
    if resolve_level3_kernel(choice) == "native":
        return pair_levels_native
    return similarity.pair_levels
