"""The selector's out_fc1 splits its kernel by rows (context half once per frame): it must
equal a Dense over the concatenated [tokens, context] input, for both predictor versions."""

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from ucofia_jax.models.head import PredictorLG


def _concatenated_reference(params, x, num_frames, version):
    # The original's form, written out: concat then one matmul with the same kernels.
    p = params["params"]
    ln = lambda y, q: (
        (y - y.mean(-1, keepdims=True)) / np.sqrt(y.var(-1, keepdims=True) + 1e-5) * q["scale"]
        + q["bias"]
    )
    gelu = lambda y: jax.nn.gelu(y, approximate=False)
    if version == "new":
        h = gelu(ln(x, p["in_norm"]) @ p["in_proj"]["kernel"])
        ctx = jnp.broadcast_to(h[:, :1], h.shape)
    else:
        x2 = jnp.concatenate([x, jnp.broadcast_to(x[:, :1], x.shape)], -1)
        h = gelu(ln(x2, p["in_norm"]) @ p["in_proj"]["kernel"])
        hv = h.reshape(-1, num_frames, *h.shape[1:])
        ctx = jnp.broadcast_to(hv[:, :, :1].sum(1, keepdims=True), hv.shape).reshape(h.shape)
    h = gelu(jnp.concatenate([h, ctx], -1) @ p["out_fc1"]["kernel"])
    return jnp.tanh((h @ p["out_fc2"]["kernel"])[..., 0])


@pytest.mark.parametrize("version", ["new", "old"])
def test_split_out_fc1_equals_concatenated_dense(version):
    d, frames, n = 16, 3, 7
    x = jnp.asarray(np.random.RandomState(0).randn(2 * frames, n, d), jnp.float32)
    pred = PredictorLG(d, version)
    params = nn.unbox(pred.init(jax.random.PRNGKey(0), x, frames))  # plain arrays
    kernel = params["params"]["out_fc1"]["kernel"]
    assert kernel.shape == ((d if version == "new" else 2 * d), d // 2 if version == "new" else d)
    # scale the kernels up so the scores are not all ~0 after tanh
    params = jax.tree_util.tree_map(lambda a: a * 20 if a.ndim == 2 else a, params)
    got = pred.apply(params, x, frames)
    want = _concatenated_reference(params, x, frames, version)
    assert float(jnp.abs(want).max()) > 0.05
    np.testing.assert_allclose(np.asarray(got), np.asarray(want), rtol=1e-5, atol=1e-6)
