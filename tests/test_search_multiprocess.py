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

from ucofia_jax.search.store import Store

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
