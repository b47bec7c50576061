"""Environments for the subprocesses that play a user's command."""

import os
import signal


def one_device_env(**extra: str) -> dict:
    """``os.environ`` without the suite's forced device count (conftest.py), so that the child
    sees one CPU device as a user's shell does; the suite's compile flags stay."""
    env = dict(os.environ)
    flags = [f for f in env.get("XLA_FLAGS", "").split() if "device_count" not in f]
    env["XLA_FLAGS"] = " ".join(flags)
    env.update(extra)
    return env


def sigint_as_in_a_terminal() -> None:
    """``preexec_fn`` of a child that a test stops with Ctrl-C (SIGINT): an xdist worker
    ignores SIGINT and a child inherits that, where a terminal's shell would not."""
    signal.signal(signal.SIGINT, signal.SIG_DFL)
