"""Transformer building blocks shared by the CLIP towers and the UCoFiA temporal encoder.

Parameter names mirror OpenAI CLIP's ``state_dict`` so that weight import is a rename:
``ln_1``, ``attn/in_proj`` (packed q|k|v, kernel ``[D, 3D]`` = ``in_proj_weight.T``),
``attn/out_proj``, ``ln_2``, ``mlp/c_fc``, ``mlp/c_proj``; a ``Transformer`` holds
``resblocks_{i}``. The temporal encoder (seqTransf) reuses these blocks with a TF-style
LayerNorm epsilon of 1e-12, which is why ``ln_eps`` is a field.

Rematerialisation (``remat``, one of ``REMAT_POLICIES``; ``config.model.remat``): each block is
wrapped in ``nn.remat``, so its backward recomputes the block's forward instead of keeping
its activations. ``nn.remat`` keeps the module's name, so the parameter tree is the same with
and without it (checkpoints, the importer and parity read those names).

Logical axis names: every parameter declares the names of its dims where it is created
(``nn.with_logical_partitioning``, kept as Flax ``LogicallyPartitioned`` metadata in the
boxed init); ``declared_axes`` reads them and ``config.mesh.logical_axis_rules`` maps them to
mesh axes (runtime/sharding.py; docs/train.md, "FSDP"). The names of a block's weights:
'embed' the residual width, 'mlp' the 4x hidden width, 'qkv' the packed q|k|v outputs,
'heads' the concatenated head outputs, 'norm' small vectors (replicated by the rules).
"""

from __future__ import annotations

import dataclasses
from typing import Any, Callable, Optional

import flax.linen as nn
import jax
import jax.numpy as jnp

Dtype = Any

# "none": keep every activation (fastest). "full" (``nothing_saveable``): keep only each
# block's input and recompute the whole block in the backward -- the least memory (the
# attention probabilities 'b h l l' and the 4x MLP hidden are never kept) for one more
# forward of the towers (~1/3 more step FLOPs). "dots" (``dots_with_no_batch_dims_saveable``):
# keep the outputs of the weight matmuls and recompute the rest (LayerNorm, GELU, softmax,
# the attention einsums, which have batch dims): less recompute, less saving.
REMAT_POLICIES = {
    "none": None,
    "full": jax.checkpoint_policies.nothing_saveable,
    "dots": jax.checkpoint_policies.dots_with_no_batch_dims_saveable,
}


def named(init: Callable, *names: Optional[str]) -> Callable:
    """``init`` declaring the logical axis names of the parameter it creates, one per dim."""
    return nn.with_logical_partitioning(init, names)


def declared_axes(boxed: Any, prefix: str = "") -> dict:
    """{prefix + 'a/b/kernel': PartitionSpec of logical names} of every parameter in ``boxed``
    (a module's ``init`` params, or their ``jax.eval_shape``, before ``nn.unbox``). A parameter
    created without names (``named``) is a ValueError naming it: it would silently stay
    whole on every mesh."""
    out, unnamed = {}, []
    leaves = jax.tree_util.tree_flatten_with_path(
        boxed, is_leaf=lambda x: isinstance(x, nn.LogicallyPartitioned)
    )[0]
    for path, leaf in leaves:
        name = prefix + "/".join(str(getattr(k, "key", k)) for k in path)
        if not isinstance(leaf, nn.LogicallyPartitioned):
            unnamed.append(name)
            continue
        if len(leaf.names) != len(leaf.value.shape):
            raise ValueError(
                f"layers.py: parameter {name} has shape {tuple(leaf.value.shape)} but logical "
                f"axes {leaf.names}"
            )
        out[name] = leaf.get_partition_spec()
    if unnamed:
        raise ValueError(
            f"layers.py: parameters {unnamed} were created without logical axis names; "
            "declare them where they are created (layers.named(init, *names))"
        )
    return out


def quick_gelu(x: jax.Array) -> jax.Array:
    return x * jax.nn.sigmoid(1.702 * x)


def gelu(x: jax.Array) -> jax.Array:
    return jax.nn.gelu(x, approximate=False)  # erf form, as torch's (HF hidden_act='gelu')


# The MLP's activation, by the name HF config.json gives it (hidden_act): OpenAI's CLIPs use
# quick_gelu; OpenCLIP's ViT-H/14 and bigG the exact gelu.
ACTIVATIONS = {"quick_gelu": quick_gelu, "gelu": gelu}


class LayerNorm(nn.Module):
    """LayerNorm computed in float32 whatever the input dtype (CLIP casts up, then back)."""

    epsilon: float = 1e-5

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        dim = x.shape[-1]
        scale = self.param("scale", named(nn.initializers.ones, "norm"), (dim,), jnp.float32)
        bias = self.param("bias", named(nn.initializers.zeros, "norm"), (dim,), jnp.float32)
        x32 = x.astype(jnp.float32)
        mean = jnp.mean(x32, axis=-1, keepdims=True)
        var = jnp.mean(jnp.square(x32 - mean), axis=-1, keepdims=True)
        y = (x32 - mean) * jax.lax.rsqrt(var + self.epsilon) * scale + bias
        return y.astype(x.dtype)


class MultiHeadAttention(nn.Module):
    """``torch.nn.MultiheadAttention`` semantics (packed in-projection, scale 1/sqrt(head_dim))."""

    width: int
    heads: int
    dtype: Dtype = jnp.float32
    kernel_init: Callable = nn.initializers.normal(0.02)

    @nn.compact
    def __call__(self, x: jax.Array, mask: Optional[jax.Array] = None) -> jax.Array:
        # x: 'b l d'; mask: additive, broadcastable to 'b h lq lk'.
        if self.width % self.heads:
            raise ValueError(f"width {self.width} is not divisible by heads {self.heads}")
        head_dim = self.width // self.heads
        qkv = nn.Dense(
            3 * self.width,
            dtype=self.dtype,
            param_dtype=jnp.float32,
            kernel_init=named(self.kernel_init, "embed", "qkv"),
            bias_init=named(nn.initializers.zeros, "qkv"),
            name="in_proj",
        )(x)
        q, k, v = jnp.split(qkv, 3, axis=-1)
        b, l = x.shape[0], x.shape[1]
        q = q.reshape(b, l, self.heads, head_dim)
        k = k.reshape(b, l, self.heads, head_dim)
        v = v.reshape(b, l, self.heads, head_dim)
        logits = jnp.einsum("bqhd,bkhd->bhqk", q, k).astype(jnp.float32) * (head_dim**-0.5)
        if mask is not None:
            logits = logits + mask.astype(jnp.float32)
        weights = jax.nn.softmax(logits, axis=-1).astype(self.dtype)
        out = jnp.einsum("bhqk,bkhd->bqhd", weights, v).reshape(b, l, self.width)
        return nn.Dense(
            self.width,
            dtype=self.dtype,
            param_dtype=jnp.float32,
            kernel_init=named(self.kernel_init, "heads", "embed"),
            bias_init=named(nn.initializers.zeros, "norm"),
            name="out_proj",
        )(out)


class MLP(nn.Module):
    width: int
    dtype: Dtype = jnp.float32
    activation: str = dataclasses.field(kw_only=True)  # one of ACTIVATIONS

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        init = nn.initializers.normal(0.02)
        x = nn.Dense(
            4 * self.width,
            dtype=self.dtype,
            param_dtype=jnp.float32,
            kernel_init=named(init, "embed", "mlp"),
            bias_init=named(nn.initializers.zeros, "mlp"),
            name="c_fc",
        )(x)
        x = ACTIVATIONS[self.activation](x)
        return nn.Dense(
            self.width,
            dtype=self.dtype,
            param_dtype=jnp.float32,
            kernel_init=named(init, "mlp", "embed"),
            bias_init=named(nn.initializers.zeros, "norm"),
            name="c_proj",
        )(x)


class ResidualAttentionBlock(nn.Module):
    """Pre-LN block: ``x += attn(ln_1(x)); x += mlp(ln_2(x))``.

    ``attn_input_fn`` (optional) transforms the LayerNormed attention input only (the
    residual keeps the unshifted x): this is where the TS2-Net token shift plugs in.
    """

    width: int
    heads: int
    ln_eps: float = 1e-5
    dtype: Dtype = jnp.float32
    attn_input_fn: Optional[Callable[[jax.Array], jax.Array]] = None
    activation: str = dataclasses.field(kw_only=True)  # the MLP's, one of ACTIVATIONS

    @nn.compact
    def __call__(self, x: jax.Array, mask: Optional[jax.Array] = None) -> jax.Array:
        h = LayerNorm(self.ln_eps, name="ln_1")(x)
        if self.attn_input_fn is not None:
            h = self.attn_input_fn(h)
        x = x + MultiHeadAttention(self.width, self.heads, self.dtype, name="attn")(h, mask)
        mlp = MLP(self.width, self.dtype, activation=self.activation, name="mlp")
        x = x + mlp(LayerNorm(self.ln_eps, name="ln_2")(x))
        return x


class Transformer(nn.Module):
    """A stack of ``ResidualAttentionBlock`` named ``resblocks_{i}``.

    ``attn_input_fns``: optional tuple with one entry per block, each ``None`` or the
    attention-input transform of that block (token shift).
    """

    width: int
    layers: int
    heads: int
    ln_eps: float = 1e-5
    dtype: Dtype = jnp.float32
    attn_input_fns: Optional[tuple] = None
    # Required, keyword-only: the caller's (CLIPConfig.activation, config.model.remat).
    remat: str = dataclasses.field(kw_only=True)  # one of REMAT_POLICIES
    activation: str = dataclasses.field(kw_only=True)  # the MLPs', one of ACTIVATIONS

    @nn.compact
    def __call__(self, x: jax.Array, mask: Optional[jax.Array] = None) -> jax.Array:
        fns = self.attn_input_fns or (None,) * self.layers
        if len(fns) != self.layers:
            raise ValueError(f"attn_input_fns has {len(fns)} entries for {self.layers} layers")
        if self.remat not in REMAT_POLICIES:
            raise ValueError(f"remat must be one of {tuple(REMAT_POLICIES)}, got {self.remat!r}")
        block = ResidualAttentionBlock
        if self.remat != "none":
            # prevent_cse=True (the default) since the blocks are not under a scan.
            block = nn.remat(block, policy=REMAT_POLICIES[self.remat])
        for i in range(self.layers):
            x = block(
                self.width,
                self.heads,
                self.ln_eps,
                self.dtype,
                attn_input_fn=fns[i],
                activation=self.activation,
                name=f"resblocks_{i}",
            )(x, mask)
        return x
