"""The command line's error boundary: a known problem is one line on stderr, not a traceback.

    status = cli.guarded(lambda: app.run(main, ...), verbose=cli.verbose_requested(sys.argv))

* an exception of a ``known`` class (by default :class:`ucofia_jax.errors.UserError`: a bad
  config value or key, missing or bad data, an unreadable checkpoint, a full disk, a
  non-finite loss) prints ``error: <message>`` and a ``hint:`` line, and the status is
  :data:`USER_ERROR` (2);
* an ``OSError`` naming a file (permission denied, not found, disk full) is treated alike;
* Ctrl-C before the train loop has installed its handler: ``interrupted``, status 130;
* anything else is a bug: its traceback, status 1.

``--verbose`` on the command line or ``UCOFIA_VERBOSE=1`` in the environment prints the
traceback of known problems too.
"""

from __future__ import annotations

import os
import sys
import traceback
from typing import Callable, Optional, Sequence, Tuple, Type

from ucofia_jax.errors import UserError

USER_ERROR = 2
INTERRUPTED = 130  # 128 + SIGINT, what shells report for Ctrl-C
VERBOSE_ENV = "UCOFIA_VERBOSE"


def verbose_requested(argv: Sequence[str]) -> bool:
    """``--verbose`` (absl spellings) in ``argv`` or ``UCOFIA_VERBOSE`` set to a true value."""
    if os.environ.get(VERBOSE_ENV, "").strip().lower() not in ("", "0", "false", "no"):
        return True
    last = None
    for a in argv[1:]:
        if a in ("--verbose", "--verbose=true", "--verbose=True", "--verbose=1"):
            last = True
        elif a in ("--noverbose", "--verbose=false", "--verbose=False", "--verbose=0"):
            last = False
    return bool(last)


def one_line(message: str) -> str:
    """``'invalid config:\\n  config.a: why'`` -> ``'invalid config: config.a: why'``; a
    longer message keeps its lines (each names one problem)."""
    lines = [ln.rstrip() for ln in str(message).strip().splitlines() if ln.strip()]
    if not lines:
        return ""
    if len(lines) == 2 and lines[0].endswith(":"):
        return f"{lines[0]} {lines[1].strip()}"
    return "\n".join(lines)


def _is_file_error(e: BaseException) -> bool:
    return isinstance(e, OSError) and bool(getattr(e, "filename", None))


def guarded(
    fn: Callable[[], object],
    *,
    known: Tuple[Type[BaseException], ...] = (UserError,),
    verbose: bool = False,
    hint: Optional[Callable[[BaseException], Optional[str]]] = None,
    stream=None,
) -> int:
    """Runs ``fn``; returns the exit status (``SystemExit`` codes pass through)."""
    stream = stream or sys.stderr
    try:
        fn()
    except SystemExit as e:
        code = e.code
        if code is None:
            return 0
        if isinstance(code, int):
            return code
        stream.write(f"{code}\n")
        return 1
    except KeyboardInterrupt:
        if verbose:
            traceback.print_exc(file=stream)
        stream.write("interrupted (Ctrl-C)\n")
        return INTERRUPTED
    except BaseException as e:  # pylint: disable=broad-except
        if not (isinstance(e, known) or _is_file_error(e)):
            raise
        if verbose:
            traceback.print_exc(file=stream)
        text = one_line(str(e)) or type(e).__name__
        if _is_file_error(e) and not isinstance(e, known):
            text = f"{e.strerror or type(e).__name__}: {e.filename}"
        stream.write(f"error: {text}\n")
        extra = hint(e) if hint is not None else None
        tail = "" if verbose else f"--verbose (or {VERBOSE_ENV}=1) shows the traceback"
        line = "; ".join(x for x in (extra, tail) if x)
        if line:
            stream.write(f"hint: {line}\n")
        stream.flush()
        return USER_ERROR
    return 0
