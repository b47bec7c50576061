"""Several processes stop at one step: a signal to one ``jax.distributed`` process reaches
all of them through JAX's preemption sync point (checkpoints.PreemptionGuard). The
single-process signal handling is tested in test_train.py, test_faults.py, test_resume.py."""

import os
import re
import signal
import socket
import subprocess
import sys

import pytest
from _env import one_device_env

HERE = os.path.dirname(os.path.abspath(__file__))
REPO = os.path.dirname(HERE)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("localhost", 0))
        return s.getsockname()[1]


def _two_processes():
    env = one_device_env(JAX_PLATFORMS="cpu")
    env["PYTHONPATH"] = REPO + os.pathsep + env.get("PYTHONPATH", "")
    port = _free_port()
    return [
        subprocess.Popen(
            [sys.executable, os.path.join(HERE, "_preemption_worker.py"), str(port), str(i)],
            env=env,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )
        for i in range(2)
    ]


def _wait_ready(proc):
    for line in proc.stdout:
        if line.strip() == "READY":
            return
        assert not line.startswith("synced False"), line
    raise AssertionError(proc.stderr.read()[-3000:])


def _stopped(procs):
    outs = []
    for p in procs:
        out, err = p.communicate(timeout=120)
        assert p.returncode == 0, err[-3000:]
        m = re.search(r"stopped at step (\d+) by (\w+)", out)
        assert m, out + err[-3000:]
        outs.append((int(m.group(1)), m.group(2)))
    return outs


@pytest.mark.slow  # two jax.distributed processes: ~20 s
@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGINT])
def test_a_signal_to_one_process_stops_both_at_the_same_step(sig):
    procs = _two_processes()
    try:
        for p in procs:
            _wait_ready(p)
        procs[1].send_signal(sig)  # the other process gets nothing
        (s0, name0), (s1, name1) = _stopped(procs)
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()
    assert s0 == s1
    name = signal.Signals(sig).name
    assert name1 == name and name0 == "SIGTERM"  # JAX's notice: a SIGTERM somewhere
