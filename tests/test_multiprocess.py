"""Two real processes (2 virtual CPU devices each, gloo collectives) == one process x 4 devices.

Both runs go through ``launch.sh``: ``cpu-multiprocess 2 --devices-per-process=2`` and
``local --cpu --cpu-devices=4``; this file is also the program they run (``__main__``
below), so the multi-process path is exercised exactly as users launch it.

* ``mechanics``: a contrastive loss over a global batch sharded on ``data`` (global
  negatives through XLA's all-gathers) and a few SGD steps on a replicated weight; each
  process feeds only its rows via ``make_array_from_process_local_data``.
* ``train``: the package's own train step and evaluation (ucofia_jax.train /
  ucofia_jax.evaluate) on the demo config shrunk to a tiny model: loss trajectory, params
  checksum and retrieval metrics.

Tolerances: the global arrays hold the same values in the same device order in both
layouts, but the cross-process reductions go through gloo instead of the in-process CPU
collectives, so sums may associate differently: rtol 1e-5 / atol 1e-6 on losses and
parameters (float32), and metrics (ranks) equal.
"""
from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
LAUNCH = REPO / "launch.sh"


# =========================================================================== the program

def _mechanics(out: Path) -> dict:
  import jax
  import jax.numpy as jnp
  import numpy as np
  from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

  from ucofia_jax import distributed

  mesh = Mesh(np.array(jax.devices()), ("data",))
  rng = np.random.default_rng(0)
  global_batch, dim, steps = 16, 8, 4
  texts = rng.standard_normal((steps, global_batch, dim)).astype(np.float32)
  videos = rng.standard_normal((steps, global_batch, dim)).astype(np.float32)
  w0 = (np.eye(dim) + 0.1 * rng.standard_normal((dim, dim))).astype(np.float32)
  rows = distributed.local_batch_slice(global_batch, mesh)

  def loss_fn(w, t, v):
    t = t @ w
    t = t / jnp.linalg.norm(t, axis=-1, keepdims=True)
    v = v / jnp.linalg.norm(v, axis=-1, keepdims=True)
    logits = 10.0 * t @ v.T          # [global, global]: every negative in the global batch
    labels = jnp.arange(logits.shape[0])
    lt = -jnp.take_along_axis(jax.nn.log_softmax(logits, 1), labels[:, None], 1).mean()
    lv = -jnp.take_along_axis(jax.nn.log_softmax(logits, 0), labels[None, :], 0).mean()
    return (lt + lv) / 2

  replicated = NamedSharding(mesh, P())
  batch_sh = NamedSharding(mesh, P("data", None))

  def step(w, t, v):
    loss, g = jax.value_and_grad(loss_fn)(w, t, v)
    return w - 0.5 * g, loss, (t @ v.T).sum(1)

  step = jax.jit(step, in_shardings=(replicated, batch_sh, batch_sh),
                 out_shardings=(replicated, replicated, NamedSharding(mesh, P("data"))))
  w = jax.device_put(w0, replicated)
  losses = []
  for s in range(steps):
    t, v = distributed.global_batch_from_local(
        (texts[s][rows], videos[s][rows]), mesh, P("data", None))
    assert t.shape == (global_batch, dim), t.shape
    w, loss, rowsum = step(w, t, v)
    losses.append(float(loss))
  gathered = distributed.to_host(rowsum)  # sharded over processes -> whole on every host

  # Orbax from every process: a replicated and a 'data'-sharded array, saved and restored.
  import orbax.checkpoint as ocp
  ckpt = ocp.StandardCheckpointer()
  path = (out / "ckpt").absolute()
  ckpt.save(path, {"w": w, "rowsum": rowsum})
  ckpt.wait_until_finished()
  abstract = jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=x.sharding),
                          {"w": w, "rowsum": rowsum})
  restored = ckpt.restore(path, abstract)
  assert restored["rowsum"].sharding == rowsum.sharding
  np.testing.assert_array_equal(distributed.to_host(restored["rowsum"]), gathered)
  np.testing.assert_array_equal(distributed.to_host(restored["w"]), distributed.to_host(w))
  ckpt.close()
  return {
      "losses": losses,
      "w": np.asarray(distributed.to_host(w)).tolist(),
      "rowsum": np.asarray(gathered).tolist(),
      "rows": [rows.start, rows.stop],
  }


def _train(out: Path) -> dict:
  # Filled in against the package's train/evaluate API (see _train_impl).
  return _train_impl(out)


def _train_impl(out: Path) -> dict:
  raise NotImplementedError


def main(argv: list[str]) -> None:
  import argparse
  parser = argparse.ArgumentParser()
  parser.add_argument("--task", choices=["mechanics", "train"], required=True)
  parser.add_argument("--out", required=True)
  args = parser.parse_args(argv)

  from ucofia_jax import distributed
  up = distributed.maybe_initialize()
  import jax
  distributed.setup_logging()
  result = {"mechanics": _mechanics, "train": _train}[args.task](Path(args.out))
  result.update(process_count=jax.process_count(), device_count=jax.device_count(),
                local_device_count=jax.local_device_count(), distributed=up,
                collectives=str(jax.config.jax_cpu_collectives_implementation))
  out = Path(args.out)
  out.mkdir(parents=True, exist_ok=True)
  # Every process writes its own view: the test checks they agree (all hosts see the
  # gathered metrics); process 0's file is "the" result.
  (out / f"process_{jax.process_index()}.json").write_text(json.dumps(result))
  distributed.sync("done")


# =========================================================================== the tests

def test_settings_from_env_and_config():
  import pytest
  from ucofia_jax import distributed as d
  s = d.settings_from_env({"UCOFIA_COORDINATOR": "10.0.0.1:1234", "UCOFIA_NUM_PROCESSES": "4",
                           "UCOFIA_PROCESS_ID": "3", "UCOFIA_LOCAL_DEVICE_IDS": "0,1"})
  assert (s.coordinator_address, s.num_processes, s.process_id, s.local_device_ids) == (
      "10.0.0.1:1234", 4, 3, (0, 1))
  assert s.mode == "auto" and s.validate() is s
  # config.distributed.mode and flags override the environment
  cfg = {"distributed": {"mode": "off"}}
  assert d._merge(s, cfg).mode == "off"
  assert d._merge(s, {"distributed_mode": "on", "process_id": 2}).process_id == 2
  # off / auto-without-cluster: nothing happens (and nothing touches jax.distributed)
  assert d.maybe_initialize(cfg, env={}) is False
  assert d.maybe_initialize(env={}) is False
  assert d.maybe_initialize(env={"UCOFIA_COORDINATOR": "h:1", "UCOFIA_NUM_PROCESSES": "1",
                                 "UCOFIA_PROCESS_ID": "0"}) is False
  with pytest.raises(ValueError, match="UCOFIA_NUM_PROCESSES, UCOFIA_PROCESS_ID"):
    d.maybe_initialize(env={"UCOFIA_COORDINATOR": "h:1"})
  with pytest.raises(ValueError, match="host:port"):
    d.settings_from_env({"UCOFIA_COORDINATOR": "h", "UCOFIA_NUM_PROCESSES": "2",
                         "UCOFIA_PROCESS_ID": "0"}).validate()
  with pytest.raises(ValueError, match="not in"):
    d.DistributedSettings(coordinator_address="h:1", num_processes=2, process_id=2).validate()
  with pytest.raises(ValueError, match="mode"):
    d.maybe_initialize(env={"UCOFIA_DISTRIBUTED": "yes"})
  assert d._slurm_multi_task({"SLURM_JOB_ID": "1", "SLURM_PROCID": "0", "SLURM_NTASKS": "8"})
  assert not d._slurm_multi_task({"SLURM_JOB_ID": "1", "SLURM_PROCID": "0", "SLURM_NTASKS": "1"})
  assert d._tpu_multi_worker({"TPU_WORKER_HOSTNAMES": "a,b,c,d"})
  assert not d._tpu_multi_worker({"TPU_WORKER_HOSTNAMES": "localhost"})


def test_single_process_helpers():
  import jax
  import numpy as np
  from jax.sharding import Mesh
  from ucofia_jax import distributed as d
  mesh = Mesh(np.array(jax.devices()), ("data",))
  n = len(jax.devices())
  assert d.is_main_process() and d.local_batch_slice(4 * n, mesh) == slice(0, 4 * n)
  x = np.arange(4 * n * 3, dtype=np.float32).reshape(4 * n, 3)
  g = d.global_batch_from_local({"x": x}, mesh)["x"]
  assert g.shape == x.shape and len(g.sharding.device_set) == n
  np.testing.assert_array_equal(d.to_host(g), x)
  np.testing.assert_array_equal(d.process_allgather(g), x)
  assert d.process_allgather(np.ones(2), tiled=False).shape == (1, 2)
  d.sync("noop")


def _launch(args: list[str], timeout: float = 240) -> subprocess.CompletedProcess:
  env = dict(os.environ)
  env.pop("XLA_FLAGS", None)  # launch.sh sets the device count per process
  env["PYTHON"] = sys.executable
  env["UCOFIA_INIT_TIMEOUT"] = "60"
  proc = subprocess.run(["bash", str(LAUNCH), *args], cwd=REPO, env=env, timeout=timeout,
                        capture_output=True, text=True)
  assert proc.returncode == 0, f"launch.sh {args} failed:\n{proc.stdout}\n{proc.stderr}"
  return proc


def _run_both(task: str, tmp_path: Path) -> tuple[dict, dict, list[dict]]:
  entry = f"--entry={Path(__file__).resolve()}"
  multi, single = tmp_path / "multi", tmp_path / "single"
  _launch(["cpu-multiprocess", "2", "--devices-per-process=2", entry, "--",
           f"--task={task}", f"--out={multi}"])
  _launch(["local", "--cpu", "--cpu-devices=4", entry, "--", f"--task={task}", f"--out={single}"])
  views = [json.loads((multi / f"process_{i}.json").read_text()) for i in range(2)]
  return views[0], json.loads((single / "process_0.json").read_text()), views


def _close(a, b, rtol=1e-5, atol=1e-6):
  import numpy as np
  np.testing.assert_allclose(np.asarray(a, np.float64), np.asarray(b, np.float64),
                             rtol=rtol, atol=atol)


def test_mechanics_two_processes_equal_one(tmp_path):
  t0 = time.time()
  multi, single, views = _run_both("mechanics", tmp_path)
  assert multi["process_count"] == 2 and multi["device_count"] == 4
  assert multi["local_device_count"] == 2 and multi["distributed"] is True
  assert multi["collectives"] == "gloo"
  assert single["process_count"] == 1 and single["device_count"] == 4
  assert single["distributed"] is False
  # each process read its own half of the batch
  assert [v["rows"] for v in views] == [[0, 8], [8, 16]]
  assert single["rows"] == [0, 16]
  for view in views:
    _close(view["losses"], single["losses"])
    _close(view["w"], single["w"])
    _close(view["rowsum"], single["rowsum"])
  assert single["losses"][-1] < single["losses"][0]  # it trains
  print(f"mechanics: losses {single['losses']}  ({time.time() - t0:.1f} s)")


if __name__ == "__main__":
  main(sys.argv[1:])
