"""Parity with the original PyTorch UCoFiA on the three golden cases (forward, loss, every
stored gradient incl. the selector through the perturbed top-k custom VJP, eval paths,
SK-norm both ways, token shift), through the CLI as users run it."""

import json
import os
import subprocess
import sys

import numpy as np
import pytest
from _env import one_device_env

FIX = os.path.join(os.path.dirname(__file__), "fixtures", "ucofia_reference")
ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
# One run of the parity tool (~1 min on 2 cores) feeds every test here. The fast subset keeps
# parts of this parity in-process (test_similarity, test_sinkhorn, test_isa, test_topk).
pytestmark = pytest.mark.slow

REQUIRED = [
    "train.tokensel_pred_score",
    "train.pixel_tokens",
    "train.seqtransf_output",
    "train.video_feature",
    "train.sim_video_sentence",
    "train.sim_sentence_frame",
    "train.pw_word_level_logit",
    "train.pw_pixel_level_logit",
    "train.sim_pixel_word",
    "train.logits",
    "train.loss",
    "evalt2v.sim_mean_no_sk",
    "evalv2t.sim_mean_no_sk",
    "sk_t2v.final_sim",
    "patchshift.out",
]


@pytest.fixture(scope="module")
def report(tmp_path_factory):
    out = tmp_path_factory.mktemp("parity") / "parity.json"
    env = one_device_env()  # one CPU device is enough; the tool sets its flags
    env["PYTHONPATH"] = ROOT + os.pathsep + env.get("PYTHONPATH", "")
    proc = subprocess.run(
        [sys.executable, "-m", "ucofia_jax.tools.parity", "--fixtures", FIX, "--json", str(out)],
        capture_output=True,
        text=True,
        env=env,
        cwd=ROOT,
        timeout=900,
    )
    data = json.loads(out.read_text()) if out.exists() else {"results": [], "errors": {}}
    return proc, data


def test_all_keys_pass(report):
    proc, data = report
    assert proc.returncode == 0, proc.stdout[-4000:] + proc.stderr[-4000:]
    assert not data["errors"]
    assert all(r["passed"] for r in data["results"])


@pytest.mark.parametrize("case", ["case_1", "case_2", "case_3"])
def test_every_case_covers_the_required_keys(report, case):
    _, data = report
    z = np.load(os.path.join(FIX, case + ".npz"))
    keys = {r["key"] for r in data["results"] if r["case"] == case}
    assert set(REQUIRED) <= keys, set(REQUIRED) - keys
    expect = {
        k
        for k in z.files
        if k.startswith(("grad.", "grad_in.", "sk_v2t.", "sk_t2v.", "evalt2v.", "evalv2t."))
        and not k.startswith("sk_v2t.in.")
        and not k.startswith("sk_t2v.in.")
        and not k.endswith("_seed")
    }
    if "train.tokensel_noise" not in z.files:  # no path from the scores to the loss then
        expect = {
            k for k in expect if "visual_token_selector" not in k and k != "grad_in.patch_tokens"
        }
    else:
        expect.add("train.tokensel_topk_indicator")
    expect.discard("sk_v2t.train_tokensel_topk_indicator")
    for tag in ("evalt2v", "evalv2t"):
        expect.discard(f"{tag}.tokensel_topk_indicator")  # an input, not an output
    assert expect <= keys, sorted(expect - keys)


def test_selector_gradient_through_the_custom_vjp(report):
    _, data = report
    sel = [
        r
        for r in data["results"]
        if r["case"] == "case_3" and r["key"].startswith("grad.visual_token_selector")
    ]
    assert len(sel) == 5 and all(r["passed"] for r in sel)
    assert any(
        r["key"] == "grad_in.patch_tokens" and r["passed"]
        for r in data["results"]
        if r["case"] == "case_3"
    )
