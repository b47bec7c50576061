"""launch.sh: help, argument pass-through, environment, and clear errors (no cluster needed).

The multi-process path itself runs for real in test_multiprocess.py; here `local` and
`cpu-multiprocess` run a tiny probe program, and `slurm` / `tpu-pod` are checked with
``--dry-run`` (the srun / gcloud command they would run) and their missing-variable errors.
The README's own `cpu-multiprocess` line runs the demo as written (slow; shrunk by overrides);
a real SLURM run is tests/test_slurm.py's.
"""

from __future__ import annotations

import json
import os
import shlex
import subprocess
import sys
import time
from pathlib import Path
from types import SimpleNamespace

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


# --------------------------------------------------------------------------- README, as written


def _readme_command(subcommand: str) -> list[str]:
    """The README's `bash launch.sh SUBCOMMAND ...` line (its multi-host block), as argv."""
    for line in (REPO / "README.md").read_text(encoding="utf-8").splitlines():
        if line.startswith(f"bash launch.sh {subcommand} "):
            return shlex.split(line, comments=True)
    raise AssertionError(f"README has no `bash launch.sh {subcommand}` line")


def test_a_mesh_without_some_process_is_refused(monkeypatch):
    # The check behind preflight.check_inputs (before compile): 2 processes x 2 devices, and a
    # mesh of process 0's devices only (the demo's old mesh.data=1) is refused, naming it.
    import jax  # noqa: PLC0415 -- the other tests here never import jax

    from ucofia_jax.runtime import distributed  # noqa: PLC0415

    devices = [SimpleNamespace(process_index=p) for p in (0, 0, 1, 1)]
    monkeypatch.setattr(jax, "process_count", lambda: 2)
    monkeypatch.setattr(jax, "device_count", lambda: 4)
    monkeypatch.setattr(jax, "local_device_count", lambda: 2)
    with pytest.raises(
        ValueError, match=r"config\.mesh uses 1 of the 4 devices .* process\(es\) \[1\]"
    ):
        distributed.check_mesh_spans_processes(devices[:1], "config.mesh")
    with pytest.raises(ValueError, match=r"mesh\.data=-1"):
        distributed.check_mesh_spans_processes(devices[:2], "config.mesh")
    distributed.check_mesh_spans_processes(devices, "config.mesh")  # all: fine
    distributed.check_mesh_spans_processes(devices[1:3], "config.mesh")  # one of each: fine


@pytest.mark.slow  # two processes build the demo data, compile, train 4 steps, evaluate
def test_readme_cpu_multiprocess_demo_as_written(tmp_path):
    argv = _readme_command("cpu-multiprocess")
    assert argv[3:] == [
        "2",
        "--devices-per-process=2",
        "--config=configs/demo.py",
        "--workdir=/tmp/mp",
    ], argv
    workdir = tmp_path / "mp"  # the README's /tmp/mp, made private to this test
    argv = [a if not a.startswith("--workdir=") else f"--workdir={workdir}" for a in argv]
    shrink = [  # time only: fewer clips and steps, smaller SK-norm banks
        "--config.train.num_steps=4",
        "--config.data.synthetic.num_train=64",
        "--config.data.synthetic.num_test=20",
        "--config.eval.sk_bank_size=64",
        "--config.eval.sk_v2t_bank_size=20",
        "--progress=false",
    ]
    env = {k: v for k, v in os.environ.items() if k not in SLURM_VARS}
    env["PYTHON"] = sys.executable
    log = tmp_path / "mp.log"
    with open(log, "w") as out:
        proc = subprocess.run(
            [*argv, *shrink], cwd=REPO, env=env, stdout=out, stderr=subprocess.STDOUT, timeout=1500
        )
    text = log.read_text(errors="replace")
    assert proc.returncode == 0, text[-8000:]
    assert "mesh {'data': 4, 'fsdp': 1, 'model': 1} over 4 cpu devices" in text
    results = json.loads((workdir / "results.json").read_text())
    assert (results["num_videos"], results["step"]) == (20, 4)
    for key in ("t2v", "v2t", "t2v_sk", "v2t_sk"):
        assert 0 <= results[key]["R@1"] <= 100
    # The report draws clips of both processes' halves of the test set.
    assert (workdir / "report" / "index.html").stat().st_size > 0
