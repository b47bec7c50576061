"""launch.sh: help, argument pass-through, environment, and clear errors (no cluster needed).

The multi-process path itself runs for real in test_multiprocess.py; here `local` and
`cpu-multiprocess` run a tiny probe program, and `slurm` / `tpu-pod` are checked with
``--dry-run`` (the srun / gcloud command they would run) and their missing-variable errors.
"""

from __future__ import annotations

import json
import os
import shlex
import subprocess
import sys
import time
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
LAUNCH = REPO / "launch.sh"

PROBE = r"""
import json, os, sys
keys = ["UCOFIA_DISTRIBUTED", "UCOFIA_COORDINATOR", "UCOFIA_NUM_PROCESSES", "UCOFIA_PROCESS_ID",
        "UCOFIA_LOCAL_DEVICE_IDS", "JAX_PLATFORMS", "XLA_FLAGS", "CUDA_VISIBLE_DEVICES",
        "XLA_PYTHON_CLIENT_MEM_FRACTION", "TF_CPP_MIN_LOG_LEVEL"]
print("PROBE " + json.dumps({"argv": sys.argv[1:], "env": {k: os.environ.get(k) for k in keys}}),
      flush=True)
"""

SLURM_VARS = (
    "SLURM_JOB_ID",
    "SLURM_JOB_NODELIST",
    "SLURM_NODELIST",
    "SLURM_JOB_NUM_NODES",
    "SLURM_NNODES",
    "SLURM_GPUS_ON_NODE",
    "SLURM_GPUS_PER_NODE",
    "SLURM_PROCID",
    "SLURM_NTASKS",
    "SLURM_LOCALID",
    "TPU_NAME",
    "ZONE",
    "CLOUDSDK_COMPUTE_ZONE",
    "CLOUDSDK_CORE_PROJECT",
    "UCOFIA_COORDINATOR",
    "UCOFIA_DISTRIBUTED",
    "UCOFIA_NUM_PROCESSES",
    "UCOFIA_PROCESS_ID",
    "XLA_FLAGS",
    "CUDA_VISIBLE_DEVICES",
    "XLA_PYTHON_CLIENT_MEM_FRACTION",
    "JAX_PLATFORMS",
)


def run(args, extra_env=None, check=True):
    env = {k: v for k, v in os.environ.items() if k not in SLURM_VARS}
    env["PYTHON"] = sys.executable
    env.update(extra_env or {})
    proc = subprocess.run(
        ["bash", str(LAUNCH), *args], cwd=REPO, env=env, capture_output=True, text=True, timeout=60
    )
    if check:
        assert proc.returncode == 0, proc.stdout + proc.stderr
    return proc


def probes(stdout):
    return [
        json.loads(line.split("PROBE ", 1)[1]) for line in stdout.splitlines() if "PROBE " in line
    ]


@pytest.fixture()
def probe(tmp_path):
    path = tmp_path / "probe.py"
    path.write_text(PROBE)
    return f"--entry={path}"


def test_help_lists_every_subcommand():
    out = run(["help"]).stdout
    for word in ("local", "cpu-multiprocess", "slurm", "tpu-pod", "--config", "--workdir"):
        assert word in out
    bad = run(["nonsense"], check=False)
    assert bad.returncode == 2 and "unknown subcommand" in bad.stderr


def test_bash_syntax_and_strict_mode():
    subprocess.run(["bash", "-n", str(LAUNCH)], check=True)
    assert "set -euo pipefail" in LAUNCH.read_text()


def test_local_cpu_passes_args_and_sets_env(probe):
    (p,) = probes(
        run(
            [
                "local",
                "--cpu",
                "--cpu-devices=3",
                probe,
                "--config=configs/demo.py",
                "--workdir=/tmp/x y",
                "--config.train.batch_size=8",
            ],
            {"XLA_FLAGS": "--xla_foo=1 --xla_force_host_platform_device_count=8"},
        ).stdout
    )
    assert p["argv"] == [
        "--config=configs/demo.py",
        "--workdir=/tmp/x y",
        "--config.train.batch_size=8",
    ]
    env = p["env"]
    assert env["JAX_PLATFORMS"] == "cpu"
    # the device count is replaced, other XLA flags kept
    assert env["XLA_FLAGS"].split() == ["--xla_foo=1", "--xla_force_host_platform_device_count=3"]
    assert env["UCOFIA_DISTRIBUTED"] == "auto" and env["UCOFIA_COORDINATOR"] is None
    assert env["TF_CPP_MIN_LOG_LEVEL"] == "2"


def test_local_gpu_env(probe):
    (p,) = probes(run(["local", "--gpus=0,1", probe, "--", "--cpu"]).stdout)
    assert p["argv"] == ["--cpu"]  # after `--`, even launcher-looking args go to the program
    assert p["env"]["CUDA_VISIBLE_DEVICES"] == "0,1"
    assert p["env"]["XLA_PYTHON_CLIENT_MEM_FRACTION"] == "0.90"
    assert "xla_gpu_enable_latency_hiding_scheduler" in p["env"]["XLA_FLAGS"]
    (p,) = probes(run(["local", probe], {"XLA_PYTHON_CLIENT_MEM_FRACTION": "0.5"}).stdout)
    assert p["env"]["XLA_PYTHON_CLIENT_MEM_FRACTION"] == "0.5"  # user's value wins
    bad = run(["local", "--gpus=first", probe], check=False)
    assert bad.returncode == 2 and "--gpus must be" in bad.stderr


def test_local_runs_the_main_module_by_default():
    out = run(["local", "--cpu", "--dry-run", "--config=configs/demo.py"]).stdout
    assert "-m ucofia_jax.main --config=configs/demo.py" in out


def test_cpu_multiprocess_spawns_n_processes(probe):
    out = run(["cpu-multiprocess", "3", "--devices-per-process=2", probe, "--workdir=w"]).stdout
    ps = sorted(probes(out), key=lambda p: int(p["env"]["UCOFIA_PROCESS_ID"]))
    assert [p["env"]["UCOFIA_PROCESS_ID"] for p in ps] == ["0", "1", "2"]
    coords = {p["env"]["UCOFIA_COORDINATOR"] for p in ps}
    assert len(coords) == 1 and coords.pop().startswith("127.0.0.1:")
    for p in ps:
        assert p["argv"] == ["--workdir=w"]
        assert p["env"]["UCOFIA_NUM_PROCESSES"] == "3"
        assert p["env"]["JAX_PLATFORMS"] == "cpu"
        assert p["env"]["XLA_FLAGS"] == "--xla_force_host_platform_device_count=2"
    assert "[process 2] PROBE" in out  # output tagged per process


def test_cpu_multiprocess_failure_stops_the_rest(tmp_path):
    prog = tmp_path / "fail.py"
    prog.write_text(
        "import os, sys, time\n"
        "if os.environ['UCOFIA_PROCESS_ID'] == '1': sys.exit(7)\n"
        "time.sleep(30)\n"
    )
    proc = run(["cpu-multiprocess", "2", f"--entry={prog}"], check=False)
    assert proc.returncode == 7
    assert "stopping the others" in proc.stderr


def test_cpu_multiprocess_kills_a_process_that_ignores_term(tmp_path):
    # jax.distributed's preemption handler can swallow SIGTERM: launch.sh falls back to KILL.
    prog = tmp_path / "stubborn.py"
    prog.write_text(
        "import os, signal, sys, time\n"
        "if os.environ['UCOFIA_PROCESS_ID'] == '1':\n"
        "  time.sleep(0.5); sys.exit(3)\n"
        "signal.signal(signal.SIGTERM, signal.SIG_IGN)\n"
        "time.sleep(60)\n"
    )
    t0 = time.time()
    proc = run(["cpu-multiprocess", "2", f"--entry={prog}"], check=False)
    assert proc.returncode == 3 and time.time() - t0 < 30


def test_cpu_multiprocess_needs_a_count():
    proc = run(["cpu-multiprocess", "--config=x"], check=False)
    assert proc.returncode == 2 and "number of processes" in proc.stderr


SLURM_ENV = {"SLURM_JOB_ID": "4242", "SLURM_JOB_NODELIST": "gpu[07-08]", "SLURM_JOB_NUM_NODES": "2"}


@pytest.mark.parametrize("missing", ["SLURM_JOB_ID", "SLURM_JOB_NODELIST", "SLURM_JOB_NUM_NODES"])
def test_slurm_missing_variable_is_a_clear_error(missing):
    env = {k: v for k, v in SLURM_ENV.items() if k != missing}
    proc = run(["slurm", "--config=configs/msrvtt.py"], env, check=False)
    assert proc.returncode == 2
    assert f"${missing} is not set" in proc.stderr
    assert "sbatch" in proc.stderr  # says what to do
    assert proc.stdout == ""


def test_slurm_per_gpu_needs_gpu_count():
    proc = run(["slurm", "--per=gpu"], SLURM_ENV, check=False)
    assert proc.returncode == 2 and "SLURM_GPUS_ON_NODE" in proc.stderr


def test_slurm_dry_run_builds_srun_command():
    out = run(
        ["slurm", "--dry-run", "--config=configs/msrvtt.py", "--workdir=/runs/a"], SLURM_ENV
    ).stdout
    assert "UCOFIA_COORDINATOR=gpu07:" in out and "UCOFIA_NUM_PROCESSES=2" in out
    assert "srun --nodes=2 --ntasks-per-node=1 --ntasks=2" in out
    assert "_slurm-task" in out and "--config=configs/msrvtt.py --workdir=/runs/a" in out
    out = run(
        ["slurm", "--dry-run", "--per=gpu", "--port=1234"], {**SLURM_ENV, "SLURM_GPUS_ON_NODE": "8"}
    ).stdout
    assert "UCOFIA_COORDINATOR=gpu07:1234" in out and "UCOFIA_NUM_PROCESSES=16" in out
    assert "--ntasks-per-node=8" in out


def test_slurm_task_maps_slurm_ids(probe):
    env = {
        "SLURM_PROCID": "5",
        "SLURM_NTASKS": "16",
        "SLURM_LOCALID": "1",
        "UCOFIA_COORDINATOR": "gpu07:1234",
        "UCOFIA_SLURM_PER": "gpu",
    }
    (p,) = probes(run(["_slurm-task", probe, "--", "--workdir=w"], env).stdout)
    assert p["argv"] == ["--workdir=w"]
    e = p["env"]
    assert (e["UCOFIA_PROCESS_ID"], e["UCOFIA_NUM_PROCESSES"], e["UCOFIA_LOCAL_DEVICE_IDS"]) == (
        "5",
        "16",
        "1",
    )
    assert e["UCOFIA_DISTRIBUTED"] == "on" and e["UCOFIA_COORDINATOR"] == "gpu07:1234"
    proc = run(["_slurm-task", probe], {"SLURM_NTASKS": "2"}, check=False)
    assert proc.returncode == 2 and "$SLURM_PROCID is not set" in proc.stderr


def test_tpu_pod_errors_and_dry_run():
    proc = run(["tpu-pod", "--zone=us-central2-b"], check=False)
    assert proc.returncode == 2 and "TPU VM name is missing" in proc.stderr
    proc = run(["tpu-pod", "--tpu=pod"], check=False)
    assert proc.returncode == 2 and "zone is missing" in proc.stderr
    out = run(
        [
            "tpu-pod",
            "--dry-run",
            "--tpu=my-v4-32",
            "--zone=us-central2-b",
            "--config=configs/msrvtt.py",
            "--workdir=gs://b/run",
        ]
    ).stdout
    argv = shlex.split(out.strip().lstrip("+"))
    assert argv[:8] == [
        "env",
        "gcloud",
        "compute",
        "tpus",
        "tpu-vm",
        "ssh",
        "my-v4-32",
        "--zone=us-central2-b",
    ]
    assert "--worker=all" in argv
    (remote,) = [a[len("--command=") :] for a in argv if a.startswith("--command=")]
    assert remote == (
        "cd ~/ucofia-jax && UCOFIA_DISTRIBUTED=on bash launch.sh local -- "
        "--config=configs/msrvtt.py --workdir=gs://b/run"
    )
