"""Logical axis names declared on the parameters where they are created (layers.named), read
back by Model.logical_axes, and mapped to the mesh by config.mesh.logical_axis_rules."""

import json

import flax.linen as nn
import jax
import jax.numpy as jnp
import pytest
from _tiny import tiny_config, tiny_model
from jax.sharding import PartitionSpec as P

from ucofia_jax import config as cv
from ucofia_jax import preflight
from ucofia_jax.models import layers
from ucofia_jax.runtime import sharding

C_FC = "clip/visual/transformer/resblocks_0/mlp/c_fc/kernel"


def _flat(tree) -> dict:
    return {
        "/".join(str(getattr(k, "key", k)) for k in path): leaf
        for path, leaf in jax.tree_util.tree_flatten_with_path(
            tree, is_leaf=lambda x: isinstance(x, P)
        )[0]
    }


@pytest.fixture(scope="module")
def tiny():
    c = tiny_config()
    model = tiny_model(c)
    return c, model, jax.eval_shape(model.init, jax.random.PRNGKey(0))


def test_every_parameter_has_its_declared_names(tiny):
    _, model, shapes = tiny
    axes = _flat(model.logical_axes(shapes))
    assert set(axes) == set(_flat(shapes))
    assert axes[C_FC] == P("embed", "mlp")
    assert axes["clip/transformer/resblocks_0/attn/in_proj/bias"] == P("qkv")
    assert axes["clip/token_embedding/embedding"] == P("vocab", "embed")
    assert axes["clip/visual/conv1/kernel"] == P(None, None, None, "embed")
    assert axes["clip/logit_scale"] == P()
    assert axes["head/temporal/resblocks_0/mlp/c_proj/kernel"] == P("mlp", "embed")
    assert axes["head/selector/out_fc1/kernel"] == P(None, "mlp")
    assert axes["head/global_mat_weight"] == P("embed", "joint")
    assert axes["head/pixel_mat_weight"] == P(None, None)


def test_init_returns_plain_arrays(tiny):
    _, model, shapes = tiny
    leaves = jax.tree.leaves(shapes, is_leaf=lambda x: isinstance(x, nn.LogicallyPartitioned))
    assert leaves and not any(isinstance(x, nn.LogicallyPartitioned) for x in leaves)


class _HalfNamed(nn.Module):
    @nn.compact
    def __call__(self, x):
        w = self.param("named_kernel", layers.named(nn.initializers.ones, "embed", "mlp"), (2, 3))
        v = self.param("plain_vector", nn.initializers.zeros, (3,))
        return x @ w + v


def test_a_parameter_created_without_names_is_reported():
    variables = jax.eval_shape(_HalfNamed().init, jax.random.PRNGKey(0), jnp.zeros((1, 2)))
    with pytest.raises(ValueError, match=r"plain_vector.*without logical axis names"):
        layers.declared_axes(variables["params"])


def test_a_parameter_the_model_does_not_create_is_reported(tiny):
    _, model, shapes = tiny
    extra = dict(shapes, head=dict(shapes["head"], stray=jax.ShapeDtypeStruct((4,), jnp.float32)))
    with pytest.raises(KeyError, match=r"head/stray"):
        model.logical_axes(extra)
    wrong_rank = dict(
        shapes, head=dict(shapes["head"], global_mat_weight=shapes["clip"]["logit_scale"])
    )
    with pytest.raises(ValueError, match=r"head/global_mat_weight"):
        model.logical_axes(wrong_rank)


def _specs(c, model, shapes, rules) -> dict:
    mesh = sharding.make_mesh(c.mesh, jax.devices()[:4])
    out = sharding.param_shardings(shapes, model.logical_axes(shapes), mesh, rules)
    return {k: v.spec for k, v in _flat(out).items()}


def test_the_rules_in_config_decide_the_layout(tiny):
    c, model, shapes = tiny
    c = c.copy_and_resolve_references()
    c.mesh.update(dict(data=1, fsdp=2, model=2))
    default = _specs(c, model, shapes, c.mesh.logical_axis_rules)
    assert default[C_FC] == P("fsdp", "model")
    assert default["clip/token_embedding/embedding"] == P("model", "fsdp")
    assert default["clip/visual/ln_post/scale"] == P(None)
    # One rule changed in the config: the MLP hidden no longer split over 'model', and the
    # residual width split over 'model' (fsdp then unused by that leaf).
    rules = dict(c.mesh.logical_axis_rules)
    rules.update(mlp=None, embed="model")
    c.mesh.logical_axis_rules = tuple(rules.items())
    cv.validate(c)
    changed = _specs(c, model, shapes, c.mesh.logical_axis_rules)
    assert changed[C_FC] == P("model", None)
    # A config.json round trip (tuples become lists) keeps the layout.
    from_json = json.loads(c.to_json_best_effort())["mesh"]["logical_axis_rules"]
    assert _specs(c, model, shapes, from_json) == changed


@pytest.mark.parametrize(
    "rules, why",
    [
        ((("embed", "tensor"),), "mesh axes are"),
        ((("embed", "fsdp"), ("embed", None)), "two rules"),
        ((("embed",),), "pair"),
    ],
)
def test_bad_rules_name_the_config_key(rules, why):
    c = tiny_config()
    c.mesh.logical_axis_rules = rules
    with pytest.raises(cv.ConfigError, match=rf"config\.mesh\.logical_axis_rules.*{why}"):
        preflight.check_config(c)


def test_a_declared_name_without_a_rule_is_refused(tiny):
    c, model, shapes = tiny
    rules = tuple(r for r in c.mesh.logical_axis_rules if r[0] != "qkv")
    with pytest.raises(ValueError, match=r"logical_axis_rules: no rule.*'qkv'"):
        _specs(c, model, shapes, rules)
