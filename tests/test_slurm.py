"""The demo under a real single-node SLURM: munged, slurmctld and slurmd started here (as root,
with a slurm.conf written for this host in a temporary directory), then

    sbatch -N1 -n2 --wrap "bash launch.sh slurm --per=gpu --gpus-per-node=2 \\
        --config=configs/demo.py --workdir=W ..."                   (JAX_PLATFORMS=cpu)

i.e. 2 SLURM tasks = 2 processes of 1 CPU device each, and the same results.json as one
process with 2 devices (``launch.sh local --cpu --cpu-devices=2``): the same mesh
(data = 2) and per-device work, only the all-reduces cross a process boundary (gloo). "Same"
means every metric of results.json equal to 1e-6 (a rank that moved would shift a recall by
at least 100 / 20 test texts or videos) and the same counts and step.

The demo is shrunk by overrides only (time): 64 + 20 synthetic clips, 4 training steps,
SK-norm banks of 64 texts / 20 videos; the two runs share one built dataset (the reference
run builds it). Skipped, saying why, where the daemons cannot run (not root, binaries
missing: ``apt-get install -y slurm-wlm munge``, or they do not come up). The daemons are
stopped at the end, by the process ids they wrote.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
from _env import one_device_env

pytestmark = pytest.mark.slow  # two demo runs (compile + 4 steps + evaluation): minutes

REPO = Path(__file__).resolve().parents[1]
BINARIES = ("munged", "munge", "slurmctld", "slurmd", "sbatch", "sinfo", "scancel")
SHRINK = [
    "--config.train.num_steps=4",
    "--config.data.synthetic.num_train=64",
    "--config.data.synthetic.num_test=20",
    "--config.eval.sk_bank_size=64",
    "--config.eval.sk_v2t_bank_size=20",
    "--progress=false",
]
METRIC_KEYS = ("t2v", "v2t", "t2v_sk", "v2t_sk")
RUN_TIMEOUT_S = 1500


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _skip_reason() -> str | None:
    missing = [b for b in BINARIES if shutil.which(b) is None]
    if missing:
        return (
            f"SLURM test: {', '.join(missing)} not installed (apt-get install -y slurm-wlm munge)"
        )
    if os.geteuid() != 0:
        return "SLURM test: starting munged, slurmctld and slurmd needs root"
    return None


def _slurm_conf(d: Path, host: str) -> str:
    return "\n".join(
        [
            "ClusterName=ucofiatest",
            f"SlurmctldHost={host}(127.0.0.1)",  # no DNS needed
            "SlurmUser=root",
            "SlurmdUser=root",
            f"SlurmctldPort={_free_port()}",
            f"SlurmdPort={_free_port()}",
            "AuthType=auth/munge",
            "CredType=cred/munge",
            f"AuthInfo=socket={d / 'munge' / 'munge.sock'}",
            "MpiDefault=none",
            "ProctrackType=proctrack/linuxproc",
            "TaskPlugin=task/none",
            "SwitchType=switch/none",
            "SchedulerType=sched/builtin",
            "SelectType=select/cons_tres",
            "SelectTypeParameters=CR_CPU",
            "ReturnToService=2",
            f"StateSaveLocation={d / 'state'}",
            f"SlurmdSpoolDir={d / 'spool'}",
            f"SlurmctldPidFile={d / 'slurmctld.pid'}",
            f"SlurmdPidFile={d / 'slurmd.pid'}",
            f"SlurmctldLogFile={d / 'log' / 'slurmctld.log'}",
            f"SlurmdLogFile={d / 'log' / 'slurmd.log'}",
            "JobCompType=jobcomp/none",
            "AccountingStorageType=accounting_storage/none",
            "JobAcctGatherType=jobacct_gather/none",
            "MailProg=/bin/true",
            f"NodeName={host} NodeAddr=127.0.0.1 CPUs=2 State=UNKNOWN",
            f"PartitionName=test Nodes={host} Default=YES MaxTime=INFINITE State=UP",
            "",
        ]
    )


def _stop(pid_file: Path) -> None:
    """SIGTERM the daemon whose pid it wrote, then SIGKILL after 10 s."""
    try:
        pid = int(pid_file.read_text().strip())
    except (OSError, ValueError):
        return
    for sig, wait in ((signal.SIGTERM, 10.0), (signal.SIGKILL, 2.0)):
        try:
            os.kill(pid, sig)
        except ProcessLookupError:
            return
        deadline = time.time() + wait
        while time.time() < deadline:
            try:
                os.kill(pid, 0)
            except ProcessLookupError:
                return
            time.sleep(0.1)


def _tail(path: Path, n: int = 3000) -> str:
    try:
        return path.read_text(errors="replace")[-n:]
    except OSError:
        return f"({path} not written)"


@pytest.fixture(scope="module")
def slurm(tmp_path_factory):
    """A running one-node cluster: yields the environment that reaches it (SLURM_CONF)."""
    reason = _skip_reason()
    if reason:
        pytest.skip(reason)
    d = tmp_path_factory.mktemp("slurm")
    for sub in ("munge", "state", "spool", "log"):
        (d / sub).mkdir()
    os.chmod(d / "munge", 0o700)
    key = d / "munge" / "munge.key"
    key.write_bytes(os.urandom(1024))
    os.chmod(key, 0o400)
    conf = d / "slurm.conf"
    conf.write_text(_slurm_conf(d, socket.gethostname().split(".")[0]))
    env = {**os.environ, "SLURM_CONF": str(conf)}
    munge_sock = d / "munge" / "munge.sock"
    started = []
    try:
        subprocess.run(
            [
                "munged",
                "--force",
                f"--key-file={key}",
                f"--socket={munge_sock}",
                f"--pid-file={d / 'munge' / 'munged.pid'}",
                f"--log-file={d / 'munge' / 'munged.log'}",
                f"--seed-file={d / 'munge' / 'munged.seed'}",
            ],
            check=True,
            capture_output=True,
        )
        started.append(d / "munge" / "munged.pid")
        for daemon, pid in (("slurmctld", "slurmctld.pid"), ("slurmd", "slurmd.pid")):
            subprocess.run([daemon, "-f", str(conf)], env=env, check=True, capture_output=True)
            started.append(d / pid)
        state = ""
        for _ in range(60):
            proc = subprocess.run(
                ["sinfo", "-h", "-o", "%T"], env=env, capture_output=True, text=True
            )
            state = proc.stdout.strip()
            if state == "idle":
                break
            time.sleep(1)
        else:
            pytest.skip(
                f"SLURM test: the node did not come up (sinfo: {state!r} {proc.stderr.strip()})"
                f"\nslurmctld.log:\n{_tail(d / 'log' / 'slurmctld.log')}"
                f"\nslurmd.log:\n{_tail(d / 'log' / 'slurmd.log')}"
            )
        yield env
    except subprocess.CalledProcessError as e:
        pytest.skip(f"SLURM test: {e.cmd[0]} did not start: {e.stderr!r}")
    finally:
        subprocess.run(["scancel", "--user=root"], env=env, capture_output=True)
        for pid_file in reversed(started):
            _stop(pid_file)


def _launch_env() -> dict:
    # The test session's XLA_FLAGS force 4 CPU devices; each run here chooses its own.
    env = {k: v for k, v in one_device_env().items() if not k.startswith(("SLURM_", "UCOFIA_"))}
    env["JAX_PLATFORMS"] = "cpu"
    env["PYTHON"] = sys.executable
    return env


def _results(workdir: Path) -> dict:
    return json.loads((workdir / "results.json").read_text())


def test_demo_under_slurm_two_tasks_equals_one_process_two_devices(slurm, tmp_path):
    t0 = time.time()
    ref = tmp_path / "one_process"
    log = tmp_path / "one_process.log"
    with open(log, "w") as out:
        proc = subprocess.run(
            [
                "bash",
                "launch.sh",
                "local",
                "--cpu",
                "--cpu-devices=2",
                "--config=configs/demo.py",
                f"--workdir={ref}",
                *SHRINK,
            ],
            cwd=REPO,
            env=_launch_env(),
            stdout=out,
            stderr=subprocess.STDOUT,
            timeout=RUN_TIMEOUT_S,
        )
    assert proc.returncode == 0, _tail(log, 8000)
    t_ref = time.time() - t0

    work = tmp_path / "slurm_run"
    job_log = tmp_path / "slurm_job.log"
    program = " ".join(
        [
            "bash launch.sh slurm --per=gpu --gpus-per-node=2 --config=configs/demo.py",
            f"--workdir={work}",
            f"--config.data.data_dir={ref / 'data' / 'tfds'}",
            f"--config.data.manual_dir={ref / 'data' / 'raw'}",
            *SHRINK,
        ]
    )
    try:
        proc = subprocess.run(
            [
                "sbatch",
                "-N1",
                "-n2",
                "--wait",
                f"--time={RUN_TIMEOUT_S // 60}",
                f"--chdir={REPO}",
                f"--output={job_log}",
                f"--wrap={program}",
            ],
            env={**_launch_env(), "SLURM_CONF": slurm["SLURM_CONF"]},
            capture_output=True,
            text=True,
            timeout=RUN_TIMEOUT_S + 60,
        )
    finally:
        subprocess.run(["scancel", "--user=root"], env=slurm, capture_output=True)
    assert proc.returncode == 0, f"{proc.stdout}{proc.stderr}\njob log:\n{_tail(job_log, 8000)}"
    job = job_log.read_text(errors="replace")
    assert "process 0/2" in job and "process 1/2" in job  # two processes under srun
    assert "2 global devices" in job

    got, want = _results(work), _results(ref)
    assert set(got) == set(want)
    for key in METRIC_KEYS:
        assert got[key] == pytest.approx(want[key], abs=1e-6), (key, got[key], want[key])
    for key in ("num_texts", "num_videos", "step"):
        assert got[key] == want[key], key
    assert (got["num_videos"], got["step"]) == (20, 4)
    assert (work / "report" / "index.html").exists()  # drawn from both processes' frames
    print(
        f"slurm: t2v R@1 {got['t2v']['R@1']} (one process: {want['t2v']['R@1']}); "
        f"reference {t_ref:.0f} s, total {time.time() - t0:.0f} s"
    )
