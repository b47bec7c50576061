"""FSDP / tensor-parallel layouts on 8 virtual CPU devices: meshes data=2 x fsdp=4 and
data=4 x model=2 really split the large parameters (and their optimizer moments), and three
train steps give the loss and parameters of the 1-device run. The same check must fail when
two shards of a parameter, or of the video frames, are exchanged.

tests/conftest.py gives the session 4 devices; this test runs its body in a subprocess with
8 (``XLA_FLAGS`` must be set before jax starts), unless the session already has 8.
"""

import json
import os
import subprocess
import sys

import jax
import numpy as np
import pytest
from _env import one_device_env

HERE = os.path.dirname(os.path.abspath(__file__))
MESHES = {
    "data2_fsdp4": dict(data=2, fsdp=4, model=1),
    "data4_model2": dict(data=4, fsdp=1, model=2),
}
STEPS = 3
# float32: sharding reorders reductions (all-gathers, reduce-scatters); after 3 BertAdam steps
# of lr 1e-3 the params agree to ~1e-6 absolute (as tests/test_train.py's data-parallel test).
LOSS_RTOL = 1e-5
PARAM_RTOL, PARAM_ATOL = 1e-5, 2e-5
# A large leaf per layout and the mesh axis it must be split on.
BIG_LEAVES = {
    "data2_fsdp4": {
        "clip/visual/transformer/resblocks_0/mlp/c_fc/kernel": ("fsdp", None),
        "clip/transformer/resblocks_0/attn/in_proj/kernel": ("fsdp", None),
        "clip/token_embedding/embedding": (None, "fsdp"),
        "head/global_mat_weight": ("fsdp", None),
    },
    "data4_model2": {
        "clip/visual/transformer/resblocks_0/mlp/c_fc/kernel": (None, "model"),
        "clip/visual/transformer/resblocks_0/mlp/c_proj/kernel": ("model", None),
        "clip/token_embedding/embedding": ("model", None),
        "head/temporal/resblocks_0/attn/in_proj/kernel": (None, "model"),
    },
}


def _path(path) -> str:
    return "/".join(str(getattr(k, "key", k)) for k in path)


def _run_layouts() -> dict:
    """Runs every layout and the 1-device reference; returns what the test asserts on."""
    from _tiny import random_arrays, tiny_config, tiny_model  # noqa: PLC0415 (after XLA_FLAGS)

    from ucofia_jax.runtime import sharding  # noqa: PLC0415
    from ucofia_jax.training import trainer as train  # noqa: PLC0415

    def run(mesh_sizes, devices, leaves=(), wrong=None):
        c = tiny_config()
        c.mesh.update(mesh_sizes)
        mesh = sharding.make_mesh(c.mesh, devices)
        model = tiny_model(c)
        state = train.create_train_state(model, 0)
        trainer = train.make_trainer(
            model, c.train, mesh, state, schedule_total=10, axis_rules=c.mesh.logical_axis_rules
        )
        state = train.place_state(trainer, state)
        specs = {
            _path(p): [list(a) if isinstance(a, tuple) else a for a in x.sharding.spec]
            + [None] * (x.ndim - len(x.sharding.spec))
            for p, x in jax.tree_util.tree_flatten_with_path(state["params"])[0]
        }
        local = {
            _path(p): list(x.addressable_shards[0].data.shape)
            for p, x in jax.tree_util.tree_flatten_with_path(state["params"])[0]
        }
        # The optimizer moments (BertAdam's m and v) follow their parameter.
        shapes = {
            _path(p): x.shape for p, x in jax.tree_util.tree_flatten_with_path(state["params"])[0]
        }
        moments = {}
        for p, x in jax.tree_util.tree_flatten_with_path(state["opt_state"])[0]:
            for leaf in leaves:
                if _path(p).endswith("/" + leaf) and x.shape == shapes[leaf]:
                    spec = [list(a) if isinstance(a, tuple) else a for a in x.sharding.spec]
                    moments.setdefault(leaf, []).append(spec + [None] * (x.ndim - len(spec)))
        data = random_arrays(c.train.batch_size * STEPS, c)

        def train_steps(state, change_params=None, change_batch=None):
            if change_params is not None:
                state["params"] = change_params(state["params"])
            losses = []
            for s in range(STEPS):
                b = {k: v[s * 8 : (s + 1) * 8] for k, v in data.items()}
                b = sharding.shard_batch(train.model_inputs(b), mesh)
                if change_batch is not None:
                    b = change_batch(b)
                state, m = trainer.train_step(state, b)
                losses.append(float(m["loss"]))
            params = {
                _path(p): np.asarray(x).tolist()
                for p, x in jax.tree_util.tree_flatten_with_path(jax.device_get(state["params"]))[0]
            }
            return dict(losses=losses, params=params)

        out = dict(specs=specs, local=local, moments=moments, **train_steps(state))
        print(f"layout {mesh_sizes}: losses {out['losses']}", file=sys.stderr, flush=True)
        # The wrong variants run the same compiled step from a fresh state.
        out["wrong"] = {}
        for variant, change in (wrong or {}).items():
            fresh = train.place_state(trainer, train.create_train_state(model, 0))
            out["wrong"][variant] = train_steps(fresh, **change)
        return out

    out = {"single": run(dict(data=1, fsdp=1, model=1), jax.devices()[:1])}
    for name, sizes in MESHES.items():
        # The layout's first big leaf (split on the axis this layout adds) gets its shards
        # swapped; the video frames get two batch shards swapped while the text keeps its own.
        swapped_leaf = next(iter(BIG_LEAVES[name]))
        wrong = {
            "swapped_param_shards": dict(
                change_params=lambda params, leaf=swapped_leaf: _swap_leaf_shards(params, leaf)
            ),
            "swapped_frame_shards": dict(
                change_batch=lambda b: {**b, "frames": _swap_two_shards(b["frames"])}
            ),
        }
        out[name] = run(sizes, jax.devices()[:8], tuple(BIG_LEAVES[name]), wrong)
    return out


def _swap_two_shards(x: jax.Array) -> jax.Array:
    """``x`` with the blocks of its first two distinct shards exchanged, on every device that
    holds them (replicas stay consistent): what a restore or an input pipeline that put a
    shard on the wrong device would give."""
    block = lambda shard: tuple((sl.start, sl.stop) for sl in shard.index)
    shards = x.addressable_shards
    first, second = sorted({block(s) for s in shards})[:2]
    data = {block(s): s.data for s in shards}
    swap = {first: second, second: first}
    arrays = [jax.device_put(data[swap.get(block(s), block(s))], s.device) for s in shards]
    return jax.make_array_from_single_device_arrays(x.shape, x.sharding, arrays)


def _swap_leaf_shards(params, leaf: str):
    return jax.tree_util.tree_map_with_path(
        lambda p, x: _swap_two_shards(x) if _path(p) == leaf else x, params
    )


@pytest.fixture(scope="module")
def layouts(tmp_path_factory):
    if jax.device_count() >= 8:
        return _run_layouts()
    out = tmp_path_factory.mktemp("fsdp") / "layouts.json"
    env = one_device_env()  # the suite's compile flags, 8 devices instead of its 4
    env["XLA_FLAGS"] += " --xla_force_host_platform_device_count=8"
    proc = subprocess.run(
        [sys.executable, __file__, str(out)],
        env=env,
        cwd=os.path.dirname(HERE),
        capture_output=True,
        text=True,
        timeout=3600,  # 3 sharded compiles; minutes on a loaded 2-core machine
    )
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-5000:]
    return json.loads(out.read_text())


@pytest.mark.slow
def test_fsdp_and_model_parallel_layouts(layouts):
    check_layouts(layouts)


@pytest.mark.slow
@pytest.mark.parametrize("variant", ["swapped_param_shards", "swapped_frame_shards"])
@pytest.mark.parametrize("name", list(MESHES))
def test_check_catches_swapped_shards(layouts, name, variant):
    """The same layout and compiled step with two shards exchanged (a parameter's, or the
    video frames' against the text's): the check must see the numbers differ."""
    wrong = {**layouts, name: {**layouts[name], **layouts[name]["wrong"][variant]}}
    with pytest.raises(AssertionError, match="Not equal to tolerance"):
        check_layouts(wrong)


def check_layouts(results: dict) -> None:
    single = results["single"]
    for name in MESHES:
        got = results[name]
        for leaf, spec in BIG_LEAVES[name].items():
            assert got["specs"][leaf] == list(spec), (name, leaf, got["specs"][leaf])
            full = np.shape(single["params"][leaf])
            assert np.prod(got["local"][leaf]) < np.prod(full), (name, leaf, "not split")
        for leaf, spec in BIG_LEAVES[name].items():
            if leaf == "clip/token_embedding/embedding":
                continue  # frozen: no moments
            assert len(got["moments"].get(leaf, [])) == 2, (name, leaf, got["moments"])
            assert all(s == list(spec) for s in got["moments"][leaf]), (name, leaf)
        np.testing.assert_allclose(got["losses"], single["losses"], rtol=LOSS_RTOL)
        for leaf, ref in single["params"].items():
            np.testing.assert_allclose(
                np.asarray(got["params"][leaf]),
                np.asarray(ref),
                rtol=PARAM_RTOL,
                atol=PARAM_ATOL,
                err_msg=f"{name}: {leaf}",
            )
    # the steps changed the params
    assert single["losses"][0] != single["losses"][-1]


if __name__ == "__main__":
    # The subprocess of the test above: 8 virtual devices set by the parent's XLA_FLAGS.
    sys.path.insert(0, HERE)
    assert jax.device_count() >= 8, jax.devices()
    with open(sys.argv[1], "w") as f:
        json.dump(_run_layouts(), f)
