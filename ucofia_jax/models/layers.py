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

Logical axis names of the parameters (``PARAM_AXES``): the FSDP / tensor-parallel layout is
declared beside the modules that own the weights and mapped to mesh axes by
``runtime.sharding.LOGICAL_AXIS_RULES`` (see docs/train.md, "FSDP").
"""

from __future__ import annotations

import re
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

# Logical axis names of every parameter a block owns, by its path inside the block.
# 'embed': the residual width; 'mlp': the 4x hidden width; 'qkv': the packed q|k|v outputs;
# 'heads': the concatenated head outputs; 'norm': small vectors (replicated by the rules).
BLOCK_PARAM_AXES = {
    "ln_1/scale": ("norm",),
    "ln_1/bias": ("norm",),
    "ln_2/scale": ("norm",),
    "ln_2/bias": ("norm",),
    "attn/in_proj/kernel": ("embed", "qkv"),
    "attn/in_proj/bias": ("qkv",),
    "attn/out_proj/kernel": ("heads", "embed"),
    "attn/out_proj/bias": ("norm",),
    "mlp/c_fc/kernel": ("embed", "mlp"),
    "mlp/c_fc/bias": ("mlp",),
    "mlp/c_proj/kernel": ("mlp", "embed"),
    "mlp/c_proj/bias": ("norm",),
}
_BLOCK_PATH = re.compile(r"(?:^|/)resblocks_\d+/(.+)$")


def param_axes(path: str, table: dict) -> tuple:
    """Logical axis names of the parameter at ``path`` ('a/b/c'): a residual block's from
    ``BLOCK_PARAM_AXES``, any other from ``table`` (the owning module's). KeyError if unnamed."""
    m = _BLOCK_PATH.search(path)
    if m:
        return BLOCK_PARAM_AXES[m.group(1)]
    return table[path]


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
        scale = self.param("scale", nn.initializers.ones, (dim,), jnp.float32)
        bias = self.param("bias", nn.initializers.zeros, (dim,), jnp.float32)
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
            kernel_init=self.kernel_init,
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
            kernel_init=self.kernel_init,
            name="out_proj",
        )(out)


class MLP(nn.Module):
    width: int
    dtype: Dtype = jnp.float32
    activation: str = "quick_gelu"  # one of ACTIVATIONS

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        init = nn.initializers.normal(0.02)
        x = nn.Dense(
            4 * self.width, dtype=self.dtype, param_dtype=jnp.float32, kernel_init=init, name="c_fc"
        )(x)
        x = ACTIVATIONS[self.activation](x)
        return nn.Dense(
            self.width, dtype=self.dtype, param_dtype=jnp.float32, kernel_init=init, name="c_proj"
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
    activation: str = "quick_gelu"  # the MLP's, one of ACTIVATIONS

    @nn.compact
    def __call__(self, x: jax.Array, mask: Optional[jax.Array] = None) -> jax.Array:
        h = LayerNorm(self.ln_eps, name="ln_1")(x)
        if self.attn_input_fn is not None:
            h = self.attn_input_fn(h)
        x = x + MultiHeadAttention(self.width, self.heads, self.dtype, name="attn")(h, mask)
        mlp = MLP(self.width, self.dtype, self.activation, name="mlp")
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
    remat: str = "none"  # one of REMAT_POLICIES
    activation: str = "quick_gelu"  # the MLPs', one of ACTIVATIONS

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
