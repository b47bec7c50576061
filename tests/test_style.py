"""One style everywhere: ``ruff format --check .`` and ``ruff check .`` from the repo root.

The rules are the curated set in ``ruff.toml``; ``make lint`` runs the same two commands
(here ``ruff check`` reports one line per finding, ``--output-format=concise``).
ruff is pinned in ``requirements-lock.txt`` (a range in the ``test`` extra): its formatting
and rules change between minor releases. Fix findings with ``ruff format .`` and
``ruff check --fix .``.
"""

import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


def _ruff() -> list[str]:
    """The ruff of the interpreter running the tests (its venv's bin/), else ``python -m ruff``."""
    # Not resolved: sys.executable is often a symlink out of the venv.
    exe = Path(sys.executable).with_name("ruff")
    return [str(exe)] if exe.is_file() else [sys.executable, "-m", "ruff"]


@pytest.mark.parametrize(
    "args",
    [("format", "--check", "."), ("check", "--output-format=concise", ".")],
    ids=["format", "check"],
)
def test_ruff(args):
    proc = subprocess.run([*_ruff(), *args], cwd=ROOT, capture_output=True, text=True, timeout=300)
    if proc.returncode != 0:
        pytest.fail(
            f"`ruff {' '.join(args)}` failed (exit {proc.returncode}); fix with "
            f"`ruff format .` / `ruff check --fix .`:\n{proc.stdout}{proc.stderr}",
            pytrace=False,
        )
