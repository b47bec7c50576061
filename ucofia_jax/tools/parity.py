"""Parity of the JAX head with the original PyTorch UCoFiA on golden fixtures.

    python -m ucofia_jax.tools.parity --fixtures DIR [--json OUT] [--failures-only]
        [--level3-kernel auto|xla|native]

Loads every ``case_*.npz`` in DIR (format: tests/fixtures/ucofia_reference/README.md), maps
``param.*`` to our parameters (models/ucofia_names.py), runs our code on ``in.*`` and prints,
for every compared key, max abs error, max relative error, the tolerance and pass/fail; exits
non-zero if any key fails (or a case cannot be run).

The head is reached only through its public methods (``encode_text``, ``encode_video``,
``select_tokens``, ``temporal_encoder``, ``pair_inputs``, ``__call__``) and the pure functions
of ``ops.similarity``. The loss and its gradients come from the head's training forward;
the evaluation paths score pairs with the pair function of ``--level3-kernel`` (as
``eval.level3_kernel``: the native CPU kernel after the GEMM where it builds).

Tolerances (float32 vs float32 references; see docs/head.md):
* values:      |Δ| <= atol·max(1, max|ref|) + rtol·|ref|, rtol 1e-4, atol 1e-5
* scalings a, b of Sinkhorn (span many decades): |Δ| <= rtol·|ref| + 1e-30
* indicators:  |Δ| <= 1e-6 (exact up to the float mean)
* ISA weights (train.pw_*_isa_weights): |Δ| <= 1e-4 — softmaxes at tau = 0.01 turn a float32
  rounding ε of the similarity into ~ε/tau of weight (observed <= 2.2e-5)
* gradients:   |Δ| <= grad_rtol·max|ref| + grad_atol, grad_rtol 5e-3 (float32 noise of the
  reference itself, visible in grad_f64.*), grad_atol 1e-6 — the absolute term is what
  checks the numerically-zero saturated ISA gradients of a case like case_1.
Selector gradients (and grad_in.patch_tokens, which includes the predictor path) are compared
only where ``train.tokensel_noise`` is stored: otherwise the stored indicator is fed in (JAX
and torch RNGs differ) and there is no path from the scores to the loss.
"""

from __future__ import annotations

import argparse
import glob
import json
import os
import sys
from dataclasses import asdict, dataclass, field
from functools import partial
from typing import Dict, List, Optional

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from ucofia_jax.kernels import native
from ucofia_jax.models.features import TextFeatures, VideoFeatures
from ucofia_jax.models.head import UCoFiAHead
from ucofia_jax.models.ucofia_names import load_original_head_state_dict, our_path
from ucofia_jax.ops import similarity as sim_ops
from ucofia_jax.ops.losses import cross_entropy_diag, symmetric_cross_entropy
from ucofia_jax.ops.sinkhorn import sinkhorn_knopp
from ucofia_jax.ops.token_shift import token_shift


@dataclass
class Result:
    case: str
    key: str
    max_abs: float
    max_rel: float
    tol: str
    passed: bool
    note: str = ""


@dataclass
class Tolerances:
    rtol: float = 1e-4
    atol: float = 1e-5
    grad_rtol: float = 5e-3
    grad_atol: float = 1e-6
    indicator_atol: float = 1e-6
    isa_atol: float = 1e-4


def _compare(case, key, ours, ref, kind, tol: Tolerances, note="") -> Result:
    ours = np.asarray(ours, np.float64)
    ref = np.asarray(ref, np.float64)
    if ours.shape != ref.shape:
        if ours.size == ref.size:
            ours = ours.reshape(ref.shape)
        else:
            return Result(
                case,
                key,
                float("inf"),
                float("inf"),
                "shape",
                False,
                f"shape {ours.shape} vs reference {ref.shape}",
            )
    diff = np.abs(ours - ref)
    finite = np.isfinite(ours).all() and np.isfinite(ref).all()
    scale = float(np.max(np.abs(ref))) if ref.size else 0.0
    rel = diff / np.maximum(np.abs(ref), 1e-30)
    if kind == "value":
        bound = tol.atol * max(1.0, scale) + tol.rtol * np.abs(ref)
        desc = f"atol {tol.atol:g}*max(1,|ref|max) + rtol {tol.rtol:g}"
    elif kind == "scaling":
        bound = tol.rtol * np.abs(ref) + 1e-30
        desc = f"rtol {tol.rtol:g}"
    elif kind == "isa_weights":
        bound = np.full(ref.shape, tol.isa_atol)
        desc = f"atol {tol.isa_atol:g}"
    elif kind == "indicator":
        bound = np.full(ref.shape, tol.indicator_atol)
        desc = f"atol {tol.indicator_atol:g}"
    elif kind == "grad":
        bound = np.full(ref.shape, tol.grad_rtol * scale + tol.grad_atol)
        desc = f"{tol.grad_rtol:g}*max|ref| + {tol.grad_atol:g}"
    else:
        raise ValueError(kind)
    ok = bool(finite and np.all(diff <= bound))
    return Result(
        case,
        key,
        float(diff.max(initial=0.0)),
        float(rel.max(initial=0.0)),
        desc,
        ok,
        note if finite else (note + " non-finite").strip(),
    )


def _load_npz(path) -> Dict[str, np.ndarray]:
    z = np.load(path, allow_pickle=False)
    return {k: z[k] for k in z.files}


def _f32(z, key):
    return jnp.asarray(z[key], jnp.float32)


def _head_params(z, prefix, template, predictor_prefix=None):
    sd = {k[len(prefix) :]: v for k, v in z.items() if k.startswith(prefix)}
    if predictor_prefix is not None:
        sel = "visual_token_selector."
        sd = {k: v for k, v in sd.items() if not k.startswith(sel)}
        sd.update(
            {k[len(predictor_prefix) :]: v for k, v in z.items() if k.startswith(predictor_prefix)}
        )
    return load_original_head_state_dict(sd, template)


def _param_template(m: UCoFiAHead, n_patches: int):
    """The shapes of ``m``'s parameter tree (an abstract init: nothing is computed)."""
    d, f = m.embed_dim, m.max_frames
    shapes = [(1, d), (1, m.max_words, d), (1, f, d), (1, n_patches, d), (1, f)]
    dummy = [jax.ShapeDtypeStruct(s, jnp.float32) for s in shapes]
    key = jax.random.PRNGKey(0)

    # The features go through eval_shape's own arguments: only those are made abstract
    # (arrays bound in a partial would be traced as values). 0.0 is the logit scale.
    def init(*features):
        return m.init(key, *features, 0.0, train=False, rng=key)

    return nn.unbox(jax.eval_shape(init, *dummy)["params"])  # plain shapes, no axis names


@dataclass
class _Case:
    """One golden case as its parts share it: the stored arrays, the results so far, and
    the training head with the parameters and inputs every path starts from."""

    name: str  # 'case_1': the Result.case of its keys
    z: Dict[str, np.ndarray]  # the npz: in.*, param.* and the reference keys
    tol: Tolerances
    head: UCoFiAHead  # the training head ('new' predictor); eval heads are clones of it
    params: dict  # param.* mapped onto the head's tree (jnp arrays)
    logit_scale: jax.Array  # param.clip.logit_scale (log of the scale)
    inputs: Dict[str, jax.Array]  # text_cls, text_tokens, frame_cls, patch_tokens
    video_mask: jax.Array
    # How the training selector picks: the stored noise where there is one, else the stored
    # indicator (JAX and torch RNGs differ, so we never draw our own).
    selection: Dict[str, jax.Array]
    results: List[Result] = field(default_factory=list)

    @property
    def has_noise(self) -> bool:
        return "train.tokensel_noise" in self.z

    def f32(self, key: str):
        return _f32(self.z, key)

    def cmp(self, key: str, ours, kind: str = "value", note: str = "") -> None:
        """Compares ``ours`` with the stored ``key`` and records the result."""
        self.results.append(_compare(self.name, key, ours, self.z[key], kind, self.tol, note))

    def params_for(self, m: UCoFiAHead, predictor_prefix: Optional[str] = None):
        """param.* mapped onto ``m`` (its predictor from ``predictor_prefix`` if given)."""
        template = _param_template(m, self.z["in.patch_tokens"].shape[1])
        return _head_params(self.z, "param.", template, predictor_prefix=predictor_prefix)


def _load_case(path: str, tol: Tolerances) -> _Case:
    """The case in ``path`` with the head its parameters describe."""
    z = _load_npz(path)
    name = os.path.splitext(os.path.basename(path))[0]
    _, f, d = z["in.frame_cls"].shape
    nw = z["in.text_tokens"].shape[1]
    layers = len({k.split(".")[3] for k in z if k.startswith("param.transformerClip.resblocks.")})
    p_orig = z["param.frame_logit_weight"].shape[0]
    if p_orig != f:
        raise ValueError(f"{name}: frame_logit_weight is {p_orig}x{p_orig} for {f} frames")
    npix = z["param.pixel_mat_weight"].shape[0]
    head = UCoFiAHead(
        embed_dim=d,
        max_frames=f,
        max_words=nw,
        topk=npix // f - 1,  # level 3 sees topk + 1 tokens per frame
        seq_layers=layers,
        predictor="new",
    )
    template = _param_template(head, z["in.patch_tokens"].shape[1])
    return _Case(
        name=name,
        z=z,
        tol=tol,
        head=head,
        params=jax.tree_util.tree_map(jnp.asarray, _head_params(z, "param.", template)),
        logit_scale=_f32(z, "param.clip.logit_scale"),
        inputs={
            k: _f32(z, "in." + k) for k in ("text_cls", "text_tokens", "frame_cls", "patch_tokens")
        },
        video_mask=jnp.asarray(z["in.video_mask"]),
        selection=(
            {"noise": _f32(z, "train.tokensel_noise")}
            if "train.tokensel_noise" in z
            else {"indicator": _f32(z, "train.tokensel_topk_indicator")}
        ),
    )


def run_case(
    path: str, tol: Optional[Tolerances] = None, level3_kernel: str = "auto"
) -> List[Result]:
    """Every comparable key of one case. ``level3_kernel`` ('auto' | 'xla' | 'native', as
    ``eval.level3_kernel``) picks how the evaluation paths run level 3 after its GEMM;
    training always runs the XLA code, as training does.

    Each part jits its own program(s); keep them apart: what shares one jitted program
    decides XLA's fusions, hence the float32 rounding of the compared keys."""
    case = _load_case(path, tol or Tolerances())
    (loss, aux), grads = _training_step(case)
    _training_keys(case, loss, aux)
    _check_call_matches_steps(case, aux["logits"])
    _gradient_keys(case, grads)
    eval_pairs = _eval_pair_scorer(case, level3_kernel)
    eval_paths = _eval_keys(case, eval_pairs)
    _sk_bank_keys(case, eval_pairs, eval_paths)
    _token_shift_keys(case)
    return case.results


# ------------------------------------------------------------------------- training path


def _training_step(case: _Case):
    """``((loss, intermediates), (d params, d logit scale, d inputs))`` of the training
    forward, forward and gradients in one jitted program as in training."""
    sel_kw, vmask = case.selection, case.video_mask

    def train_forward(m: UCoFiAHead, text_cls, text_tokens, frame_cls, patch_tokens, ls):
        # The head's training forward (``__call__``) step by step, exposing its intermediates;
        # that ``__call__`` computes the same logits is checked by _check_call_matches_steps.
        pixels, scores, ind = m.select_tokens(patch_tokens, train=True, **sel_kw)
        seq_out = m.temporal_encoder(frame_cls, vmask)
        t = m.encode_text(text_cls, text_tokens)
        v = m.encode_video(frame_cls, patch_tokens, vmask, train=True, **sel_kw)
        text_in, video_in, consts = m.pair_inputs(t, v, ls, train=True)
        lv = sim_ops.pair_levels(text_in, video_in, consts)
        s3, inter = sim_ops.pixel_word(
            text_in.words_l, video_in.pixels_l, consts.mats, consts.tau, return_intermediates=True
        )
        logits = sim_ops.combine_levels(lv.video_sentence, lv.sentence_frame, s3)
        aux = dict(
            scores=scores,
            indicator=ind,
            pixels=pixels,
            seq_out=seq_out,
            video=v.video,
            s1=lv.video_sentence,
            s2=lv.sentence_frame,
            s3=s3,
            logits=logits,
            **inter,
        )
        return symmetric_cross_entropy(logits), aux

    def loss_fn(params, ls, inp):
        return case.head.apply(
            {"params": params},
            inp["text_cls"],
            inp["text_tokens"],
            inp["frame_cls"],
            inp["patch_tokens"],
            ls,
            method=train_forward,
        )

    return jax.jit(jax.value_and_grad(loss_fn, argnums=(0, 1, 2), has_aux=True))(
        case.params, case.logit_scale, case.inputs
    )


# Patch-word intermediates: (our name in the training forward's intermediates, the reference
# key after "train.", the permutation from our layout to the reference's). Ours are
# 't v w p' / 't v p' / 't v w'; the original keeps 't w v p' / 't v p' / 't w v'.
_PATCH_WORD_VALUES = [
    ("fine_grained_sim", "pw_fine_grained_sim", (0, 2, 1, 3)),
    ("word_level_logit", "pw_word_level_logit", None),
    ("pixel_level_logit", "pw_pixel_level_logit", (0, 2, 1)),
    ("sent2pixel_logit", "pw_sent2pixel_logit", None),
    ("video2word_logit", "pw_video2word_logit", None),
]
_PATCH_WORD_ISA_WEIGHTS = [  # compared where stored
    ("word_isa_weights", "pw_word_isa_weights", (0, 2, 1, 3)),
    ("pixel_isa_weights", "pw_pixel_isa_weights", (0, 2, 1, 3)),
    ("sent2pixel_isa_weights", "pw_sent2pixel_isa_weights", None),
    ("video2word_isa_weights", "pw_video2word_isa_weights", (0, 2, 1)),
]


def _training_keys(case: _Case, loss, aux) -> None:
    """train.*: the training forward's intermediates, logits and losses."""
    cmp = case.cmp
    cmp("train.tokensel_pred_score", aux["scores"])
    if case.has_noise:  # otherwise the stored indicator was fed in
        cmp("train.tokensel_topk_indicator", aux["indicator"], "indicator")
    cmp("train.pixel_tokens", aux["pixels"])
    cmp("train.seqtransf_output", aux["seq_out"])
    cmp("train.video_feature", aux["video"])
    cmp("train.sim_video_sentence", aux["s1"])
    cmp("train.sim_sentence_frame", aux["s2"])
    for ours, ref, perm in _PATCH_WORD_VALUES:
        val = aux[ours] if perm is None else jnp.transpose(aux[ours], perm)
        cmp("train." + ref, val)
    for ours, ref, perm in _PATCH_WORD_ISA_WEIGHTS:
        if "train." + ref in case.z:
            val = aux[ours] if perm is None else jnp.transpose(aux[ours], perm)
            cmp("train." + ref, val, "isa_weights")
    cmp("train.sim_pixel_word", aux["s3"])
    cmp("train.logits", aux["logits"])
    cmp("train.loss", loss)
    cmp("train.loss_t2v", cross_entropy_diag(aux["logits"]))
    cmp("train.loss_v2t", cross_entropy_diag(aux["logits"].T))


def _check_call_matches_steps(case: _Case, step_logits) -> None:
    """The forward of _training_step is the head's own training forward (``__call__``).

    A separate program: one graph with both would change XLA's fusions, hence the float32
    rounding, of the compared keys."""
    inputs = case.inputs
    call_logits = jax.jit(partial(case.head.apply, train=True, **case.selection))(
        {"params": case.params},
        inputs["text_cls"],
        inputs["text_tokens"],
        inputs["frame_cls"],
        inputs["patch_tokens"],
        case.video_mask,
        case.logit_scale,
    )
    gap = float(jnp.max(jnp.abs(call_logits - step_logits)))
    if not gap <= case.tol.atol * max(1.0, float(jnp.max(jnp.abs(step_logits)))):
        raise RuntimeError(f"UCoFiAHead.__call__ differs from its steps by {gap:.3e} (logits)")


def _gradient_keys(case: _Case, grads) -> None:
    """grad.* (parameters, by their original names) and grad_in.* (inputs)."""
    g_params, g_ls, g_in = grads
    for key in sorted(k for k in case.z if k.startswith("grad.")):
        name = key[len("grad.") :]
        if name == "clip.logit_scale":
            case.cmp(key, g_ls, "grad")
            continue
        path, transposed = our_path(name)
        if path[0] == "selector" and not case.has_noise:
            continue  # a fed-in indicator leaves no path from the scores to the loss
        g = g_params
        for p in path:
            g = g[p]
        case.cmp(key, g.T if transposed else g, "grad")
    for key in sorted(k for k in case.z if k.startswith("grad_in.")):
        name = key[len("grad_in.") :]
        if name == "patch_tokens" and not case.has_noise:
            continue  # only the predictor path would differ, and it has no gradient then
        case.cmp(key, g_in[name], "grad")


# ------------------------------------------------------------------------- evaluation paths


@dataclass
class _EvalPath:
    """One evaluation direction as the SK-norm banks reuse it."""

    head: UCoFiAHead  # with this direction's predictor
    params: dict
    levels: sim_ops.SimilarityLevels  # test texts x test videos


# (tag, predictor, prefix of its stored predictor parameters): t2v evaluates with the
# original's old predictor (param_evalt2v.*), v2t with the training one.
_EVAL_DIRECTIONS = [("evalt2v", "old", "param_evalt2v."), ("evalv2t", "new", None)]


def _eval_pair_scorer(case: _Case, level3_kernel: str):
    """``(head, text, video) -> SimilarityLevels`` as the evaluator scores pairs
    (evaluation.evaluator.retrieval_fns): the pair function of eval.level3_kernel, i.e. the
    native kernel after the GEMM where it is chosen. Called inside the jitted eval programs;
    the logit scale is the case's, captured (a constant of those programs)."""
    pair_fn = native.pair_levels_for(level3_kernel, mask_padding=case.head.mask_padding)
    ls = case.logit_scale

    def eval_pairs(m: UCoFiAHead, text: TextFeatures, video: VideoFeatures):
        return sim_ops.SimilarityLevels(*pair_fn(*m.pair_inputs(text, video, ls, train=False)))

    return eval_pairs


def _eval_keys(case: _Case, eval_pairs) -> Dict[str, _EvalPath]:
    """evalt2v.* / evalv2t.*: predictor scores and the three levels on the test pairs, each
    direction with its stored selection. Returns the directions the case stores."""

    # ``ls`` is passed but unused: eval_pairs scales with the captured logit scale. Left as
    # is so that the jitted program (constants included) stays the one the guard was set on.
    def eval_levels(m, text_cls, text_tokens, frame_cls, patch_tokens, vmask, ls, indicator):
        t = m.encode_text(text_cls, text_tokens)
        _, scores, _ = m.select_tokens(patch_tokens, train=False, indicator=indicator)
        v = m.encode_video(frame_cls, patch_tokens, vmask, train=False, indicator=indicator)
        return scores, eval_pairs(m, t, v)

    paths: Dict[str, _EvalPath] = {}
    for tag, predictor, predictor_prefix in _EVAL_DIRECTIONS:
        if f"{tag}.sim_video_sentence" not in case.z:
            continue
        m = case.head.clone(predictor=predictor)
        prm = case.params_for(m, predictor_prefix)
        scores, lv = jax.jit(partial(m.apply, method=eval_levels))(
            {"params": prm},
            case.inputs["text_cls"],
            case.inputs["text_tokens"],
            case.inputs["frame_cls"],
            case.inputs["patch_tokens"],
            case.video_mask,
            case.logit_scale,
            case.f32(f"{tag}.tokensel_topk_indicator"),
        )
        case.cmp(f"{tag}.tokensel_pred_score", scores)
        for name, s in zip(("sim_video_sentence", "sim_sentence_frame", "sim_pixel_word"), lv):
            case.cmp(f"{tag}.{name}", s)
        case.cmp(f"{tag}.sim_mean_no_sk", sum(lv) / 3.0)
        paths[tag] = _EvalPath(m, prm, lv)
    return paths


# ------------------------------------------------------------------------- SK-norm banks


def _sk_bank_keys(case: _Case, eval_pairs, paths: Dict[str, _EvalPath]) -> None:
    """sk_t2v.* / sk_v2t.*, each on the levels of its evaluation direction."""
    if "sk_t2v.final_sim" in case.z and "evalt2v" in paths:
        bank = _t2v_bank(case, eval_pairs, paths["evalt2v"])
        _sk_norm_keys(case, "sk_t2v", bank, paths["evalt2v"].levels, "t2v")
    if "sk_v2t.final_sim" in case.z and "evalv2t" in paths:
        bank = _v2t_bank(case, eval_pairs, paths["evalv2t"])
        _sk_norm_keys(case, "sk_v2t", bank, paths["evalv2t"].levels, "v2t")


def _t2v_bank(case: _Case, eval_pairs, path: _EvalPath):
    """Levels of training texts x test videos (the evalt2v selection is reused)."""

    def bank_t2v(m, ttc, ttt):
        t = m.encode_text(ttc, ttt)
        v = m.encode_video(
            case.inputs["frame_cls"],
            case.inputs["patch_tokens"],
            case.video_mask,
            train=False,
            indicator=case.f32("evalt2v.tokensel_topk_indicator"),
        )
        return eval_pairs(m, t, v)

    return jax.jit(partial(path.head.apply, method=bank_t2v))(
        {"params": path.params},
        case.f32("sk_t2v.in.train_text_cls"),
        case.f32("sk_t2v.in.train_text_tokens"),
    )


def _v2t_bank(case: _Case, eval_pairs, path: _EvalPath):
    """Levels of test texts x training videos (transposed by _sk_norm_keys)."""

    def bank_v2t(m):
        t = m.encode_text(case.inputs["text_cls"], case.inputs["text_tokens"])
        v = m.encode_video(
            case.f32("sk_v2t.in.train_frame_cls"),
            case.f32("sk_v2t.in.train_patch_tokens"),
            jnp.asarray(case.z["sk_v2t.in.train_video_mask"]),
            train=False,
            indicator=case.f32("sk_v2t.train_tokensel_topk_indicator"),
        )
        return eval_pairs(m, t, v)

    return jax.jit(partial(path.head.apply, method=bank_v2t))({"params": path.params})


def _sk_norm_keys(case: _Case, tag, bank, test_levels, direction) -> None:
    """Sinkhorn on the *stored* bank (isolates SK), and the final matrix from our own chain."""
    priors = []
    for l in (1, 2, 3):
        case.cmp(f"{tag}.train_sim_{l}", bank[l - 1])
        ref_bank = jnp.asarray(case.z[f"{tag}.train_sim_{l}"])
        ref_bank = ref_bank if direction == "t2v" else ref_bank.T
        r = sinkhorn_knopp(ref_bank)
        case.cmp(f"{tag}.a_{l}", r.a, "scaling")
        case.cmp(f"{tag}.b_{l}", r.b, "scaling")
        rows, cols = (
            ("text_bias", "video_bias") if direction == "t2v" else ("video_bias", "text_bias")
        )
        case.cmp(f"{tag}.{rows}_{l}", r.row_log_prior)
        case.cmp(f"{tag}.{cols}_{l}", r.col_log_prior)
        ours_bank = bank[l - 1] if direction == "t2v" else bank[l - 1].T
        prior = sinkhorn_knopp(ours_bank).col_log_prior
        biased = (
            test_levels[l - 1] + prior[None, :]
            if direction == "t2v"
            else test_levels[l - 1] + prior[:, None]
        )
        case.cmp(f"{tag}.test_sim_biased_{l}", biased)
        priors.append(biased)
    case.cmp(f"{tag}.final_sim", sum(priors) / 3.0)


# ------------------------------------------------------------------------- token shift


def _token_shift_keys(case: _Case) -> None:
    """patchshift.out: TS2-Net token shift (CLIP visual blocks 10-11)."""
    if "patchshift.in" in case.z:
        x = np.asarray(case.z["patchshift.in"])  # 'n f c' (sequence first)
        y = token_shift(jnp.asarray(x.transpose(1, 0, 2)), num_frames=x.shape[1])
        case.cmp("patchshift.out", np.asarray(y).transpose(1, 0, 2))


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--fixtures", required=True, help="directory with case_*.npz")
    ap.add_argument("--json", default=None, help="write all results to this JSON file")
    ap.add_argument("--rtol", type=float, default=Tolerances.rtol)
    ap.add_argument("--atol", type=float, default=Tolerances.atol)
    ap.add_argument("--grad-rtol", type=float, default=Tolerances.grad_rtol)
    ap.add_argument("--grad-atol", type=float, default=Tolerances.grad_atol)
    ap.add_argument("--failures-only", action="store_true")
    ap.add_argument(
        "--no-fast-compile",
        action="store_true",
        help="keep XLA's default CPU backend optimisation (compiles ~4x slower on "
        "these tiny shapes; results agree within the tolerances either way)",
    )
    ap.add_argument(
        "--level3-kernel",
        default="auto",
        choices=native.LEVEL3_KERNELS,
        help="how the evaluation paths run level 3 after its GEMM, as eval.level3_kernel "
        "(auto: the native CPU kernel where it builds)",
    )
    args = ap.parse_args(argv)
    if not args.no_fast_compile:
        # Read when the XLA backend starts (importing jax does not start it; the first
        # computation does), so it has no effect in a process that already computed.
        # The cases are tiny: compiling dominates.
        flags = os.environ.get("XLA_FLAGS", "")
        if "xla_backend_optimization_level" not in flags:
            os.environ["XLA_FLAGS"] = (flags + " --xla_backend_optimization_level=0").strip()
    tol = Tolerances(args.rtol, args.atol, args.grad_rtol, args.grad_atol)
    paths = sorted(glob.glob(os.path.join(args.fixtures, "case_*.npz")))
    if not paths:
        print(f"no case_*.npz in {args.fixtures}", file=sys.stderr)
        return 2
    results: List[Result] = []
    errors: Dict[str, str] = {}
    for p in paths:
        try:
            results += run_case(p, tol, args.level3_kernel)
        except Exception as e:  # report and go on with the other cases
            errors[os.path.basename(p)] = f"{type(e).__name__}: {e}"
    w = max((len(r.key) for r in results), default=10)
    kernel = native.resolve_level3_kernel(args.level3_kernel)
    print(f"evaluation paths: level 3 after its GEMM in {kernel} (--level3-kernel)")
    print(f"{'case':8s} {'key':{w}s} {'max_abs':>10s} {'max_rel':>10s} result  tolerance")
    for r in results:
        if args.failures_only and r.passed:
            continue
        print(
            f"{r.case:8s} {r.key:{w}s} {r.max_abs:10.3e} {r.max_rel:10.3e} "
            f"{'pass' if r.passed else 'FAIL'}    {r.tol} {r.note}"
        )
    for c, e in errors.items():
        print(f"{c}: ERROR {e}")
    n_fail = sum(not r.passed for r in results)
    print(
        f"{len(results)} keys compared in {len(paths)} case(s): {n_fail} failed, "
        f"{len(errors)} case error(s)"
    )
    if args.json:
        with open(args.json, "w") as fh:
            json.dump({"results": [asdict(r) for r in results], "errors": errors}, fh, indent=1)
    return 1 if (n_fail or errors) else 0


if __name__ == "__main__":
    sys.exit(main())
