"""The index job as a 2-process ``jax.distributed`` run (launch.sh cpu-multiprocess, one CPU
device each) equals a 1-process build of the same folder with the same model.

Each process takes every second file of the sorted plan and appends to the same LanceDB
table; process 0 deletes stale rows and writes the meta. Compared: the set of rows (paths,
ids, sizes, mtimes: exactly) and every stored feature (float16; atol 1e-3, since the two
runs batch different videos together and a batched matmul may round differently per batch),
and that both processes indexed their half.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
from _env import one_device_env
from _search_fixtures import make_clips, save_workdir, search_config

from ucofia_jax.search.store import Store, writer_lease

REPO = Path(__file__).resolve().parents[1]


def _start(argv, log: Path) -> subprocess.Popen:
    env = one_device_env()  # launch.sh adds each process's device count
    env["PYTHON"] = sys.executable
    env["UCOFIA_INIT_TIMEOUT"] = "120"
    env["PYTHONPATH"] = str(REPO) + os.pathsep + env.get("PYTHONPATH", "")
    return subprocess.Popen(
        argv,
        cwd=REPO,
        env=env,
        stdout=open(log, "w"),
        stderr=subprocess.STDOUT,
        start_new_session=True,
    )


def _wait(proc, log: Path, deadline: float):
    try:
        proc.wait(timeout=max(1.0, deadline - time.time()))
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait()
        raise AssertionError(f"timed out:\n{log.read_text()[-4000:]}") from None
    assert proc.returncode == 0, log.read_text()[-6000:]
    return log.read_text()


def _rows(index: Path) -> dict:
    return {r["path"]: r for r in Store.open(index).table.to_arrow().to_pylist()}


@pytest.mark.slow
def test_two_process_index_equals_one_process_index(tmp_path):
    workdir = save_workdir(tmp_path / "run", search_config(noise_at_eval=True))
    clips = tmp_path / "clips"
    make_clips(clips, 6)
    args = [
        "index",
        "--videos",
        str(clips),
        "--workdir",
        workdir,
        "--workers",
        "0",
        "--batch_size",
        "2",
        "--no_progress",
    ]
    multi = _start(
        [
            "bash",
            str(REPO / "launch.sh"),
            "cpu-multiprocess",
            "2",
            "--devices-per-process=1",
            "--entry=ucofia_jax.search",
            "--",
            *args,
            "--index",
            str(tmp_path / "multi"),
        ],
        tmp_path / "multi.log",
    )
    single = _start(
        [sys.executable, "-m", "ucofia_jax.search", *args, "--index", str(tmp_path / "single")],
        tmp_path / "single.log",
    )
    deadline = time.time() + 420
    out_multi = _wait(multi, tmp_path / "multi.log", deadline)
    _wait(single, tmp_path / "single.log", deadline)
    for p in (0, 1):
        assert f"[process {p}] indexed 3 " in out_multi, out_multi[-3000:]

    a, b = _rows(tmp_path / "multi"), _rows(tmp_path / "single")
    assert sorted(a) == sorted(b) == [f"video{i}.mp4" for i in range(6)]
    for path in a:
        for key in ("video_id", "size", "mtime_ns", "start", "end", "mask"):
            assert a[path][key] == b[path][key], (path, key)
        for key in ("vector", "frames", "pixels"):
            np.testing.assert_allclose(
                np.asarray(a[path][key], np.float32),
                np.asarray(b[path][key], np.float32),
                atol=1e-3,
                rtol=0,
                err_msg=f"{path} {key}",
            )
    assert (
        Store.open(tmp_path / "multi").meta["fingerprint"]
        == Store.open(tmp_path / "single").meta["fingerprint"]
    )


@pytest.mark.slow
def test_two_process_index_stops_with_one_line_when_the_lease_is_held(tmp_path):
    """Another writer holds the index: process 0 cannot take the lease, every process learns
    it and exits 2 with one line (no hang at a barrier, no traceback)."""
    workdir = save_workdir(tmp_path / "run", search_config())
    clips = tmp_path / "clips"
    make_clips(clips, 2)
    idx = tmp_path / "idx"
    with writer_lease(idx):
        proc = _start(
            ["bash", str(REPO / "launch.sh"), "cpu-multiprocess", "2", "--devices-per-process=1"]
            + ["--entry=ucofia_jax.search", "--", "index", "--videos", str(clips)]
            + ["--index", str(idx), "--workdir", workdir, "--workers", "0", "--no_progress"],
            tmp_path / "multi.log",
        )
        try:
            proc.wait(timeout=300)
        finally:
            if proc.poll() is None:
                os.killpg(proc.pid, signal.SIGKILL)
                proc.wait()
    out = (tmp_path / "multi.log").read_text()
    assert proc.returncode == 2, out[-3000:]
    assert f"[process 0] error: {idx}: another `index` is writing" in out, out[-3000:]
    assert "Traceback" not in out and not Store.exists(idx)


def _marked_processes(marker: str) -> list:
    """Live processes whose environment holds ``marker`` (zombies excluded: they are gone,
    only not yet reaped)."""
    found = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            if f"{MARKER_VAR}={marker}".encode() not in (entry / "environ").read_bytes():
                continue
            state = (entry / "stat").read_text().rsplit(")", 1)[1].split()[0]
            cmdline = (entry / "cmdline").read_bytes().replace(b"\0", b" ").decode()
        except OSError:  # gone meanwhile, or not ours to read
            continue
        if state != "Z":
            found.append((int(entry.name), cmdline))
    return found


MARKER_VAR = "UCOFIA_TEST_PROCESS_MARKER"


@pytest.mark.slow
@pytest.mark.skipif(not Path("/proc/self/environ").exists(), reason="needs Linux /proc")
def test_sigkilled_index_leaves_no_process_behind(tmp_path):
    """``index --workers 2`` is SIGKILLed while its workers decode: within a few seconds no
    process it started (decode workers, the multiprocessing resource tracker) is left.
    Processes are found by a marker in their environment, which every child inherits."""
    workdir = save_workdir(tmp_path / "run", search_config())
    clips = tmp_path / "clips"
    make_clips(clips, 40, seed=7)
    marker = f"{os.getpid()}-{time.time_ns()}"
    env = one_device_env()
    env["PYTHONPATH"] = str(REPO) + os.pathsep + env.get("PYTHONPATH", "")
    env[MARKER_VAR] = marker
    proc = subprocess.Popen(
        [sys.executable, "-m", "ucofia_jax.search", "index", "--videos", str(clips)]
        + ["--index", str(tmp_path / "idx"), "--workdir", workdir]
        + ["--workers", "2", "--batch_size", "1", "--no_progress"],
        env=env,
        cwd=tmp_path,
        stdout=open(tmp_path / "index.log", "w"),
        stderr=subprocess.STDOUT,
        start_new_session=True,
    )
    try:
        deadline = time.time() + 240
        while time.time() < deadline and proc.poll() is None:
            children = [p for p, _ in _marked_processes(marker) if p != proc.pid]
            if len(children) >= 3:  # two workers and the resource tracker
                break
            time.sleep(0.1)
        assert proc.poll() is None, (tmp_path / "index.log").read_text()[-3000:]
        assert len(children) >= 3, _marked_processes(marker)
        os.kill(proc.pid, signal.SIGKILL)  # the main process only, as a user's kill -9 would
        proc.wait()
        deadline = time.time() + 10
        while _marked_processes(marker) and time.time() < deadline:
            time.sleep(0.1)
        assert _marked_processes(marker) == []
    finally:
        if proc.poll() is None:
            proc.kill()
        for pid, _ in _marked_processes(marker):  # a failed run: leave nothing behind
            os.kill(pid, signal.SIGKILL)
