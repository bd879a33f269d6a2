"""The model is data2vec 2.0, not a look-alike: the real fairseq code's outputs, reproduced.

``tests/fixtures/fairseq`` holds the outputs of fairseq's ``data2vec_multi`` on tiny configs
(copied from ``shared/fixtures/fairseq``, whose README documents every tensor). Loading the same
weights and feeding the same inputs and masks must give the same targets, predictions, losses,
gradients, features and EMA step. Tolerance: the fixtures' recommended 1e-5 relative (fp32, CPU).
"""

from __future__ import annotations

import math
from pathlib import Path

import pytest
import torch

from d2v.models import Data2Vec2
from d2v.models.fairseq_compat import _map_key, config_from_fairseq, load_fairseq_weights

FX = Path(__file__).parent / "fixtures" / "fairseq"
NAMES = ["image", "audio", "text"]
TOL = 1e-5


@pytest.fixture(scope="module", params=NAMES)
def fixture(request):
    return request.param, torch.load(FX / f"{request.param}.pt", weights_only=True)


def build(d: dict, run: str = "train_nodrop_nonoise", step1: bool = False) -> Data2Vec2:
    cfg_dict = d["runs"]["train_nodrop_nonoise"]["config"] if run != "train_nodrop" else d["runs"]["train_nodrop"]["config"]
    vocab = len(d["dictionary"]["symbols"]) if "dictionary" in d else None
    model = Data2Vec2(config_from_fairseq(cfg_dict, vocab_size=vocab))
    sd = d["state_dict"]
    if step1:
        sd = dict(d["ema_step"]["student_after_update"])
        sd["_ema"] = d["ema_step"]["teacher_after"]
    load_fairseq_weights(model, sd, ema_encoder_only=bool(cfg_dict.get("ema_encoder_only")))
    return model.train()


def close(a: torch.Tensor, b: torch.Tensor, tol: float = TOL) -> float:
    err = float((a.detach().float() - b.float()).abs().max())
    scale = max(1.0, float(b.abs().max()))
    assert err <= tol * scale, f"max |diff| {err:.3g} > {tol} x {scale:.3g}"
    return err / scale


def forward(model: Data2Vec2, d: dict, run: dict, noise: bool = False):
    ni = d["net_input"]
    mask = run["mask_info"]["mask"].bool()
    kw = {}
    if noise:  # inject fairseq's N(0, 0.01) draws, in positional order of the masked tokens
        di = run["decoder_input"]
        kw["mask_noise"] = di[mask].view(mask.shape[0], -1, di.shape[-1])
    return model(ni["source"], mask=mask, padding_mask=ni.get("padding_mask"), **kw)


@pytest.mark.parametrize("run_name", ["train_nodrop_nonoise", "train_nodrop_nonoise_step1", "train_nodrop"])
def test_forward_matches_fairseq(fixture, run_name):
    name, d = fixture
    run = d["runs"][run_name]
    model = build(d, run_name, step1=run_name.endswith("step1"))
    out = forward(model, d, run, noise=run_name == "train_nodrop")
    assert int(out.sample_size) == int(run["sample_size"])
    close(out.target, run["target_masked"])
    close(out.pred, run["pred_masked"])
    assert math.isclose(float(out.loss_sum), float(run["loss"]), rel_tol=TOL)
    assert math.isclose(float(out.loss), float(run["loss_over_sample_size"]), rel_tol=TOL)
    reg_key = next(k for k in run["loss_terms"] if k.endswith("_regression"))
    assert math.isclose(float(out.loss_terms["regression"]), float(run["loss_terms"][reg_key]), rel_tol=TOL)
    if name == "image":
        assert math.isclose(float(out.loss_terms["cls"]), float(run["loss_terms"]["cls"]), rel_tol=TOL)
    assert math.isclose(float(out.target_var), float(run["result"]["target_var"]), rel_tol=1e-4)
    assert math.isclose(float(out.pred_var), float(run["result"]["pred_var"]), rel_tol=1e-4)


def test_step1_catches_teacher_with_student_weights(fixture):
    """After one step teacher != student: targets from the student's weights must *not* match."""
    _, d = fixture
    run = d["runs"]["train_nodrop_nonoise_step1"]
    model = build(d, step1=True)
    with torch.no_grad():  # overwrite the teacher with the student's weights
        own = dict(model.named_parameters())
        for n, p in model.teacher.named_parameters():
            p.copy_(own[n])
    out = forward(model, d, run)
    err = float((out.target - run["target_masked"]).abs().max())
    assert err > 1e-3, "targets do not depend on the teacher's weights"


def test_gradients_match_fairseq(fixture):
    name, d = fixture
    run = d["runs"]["train_nodrop_nonoise"]
    model = build(d)
    out = forward(model, d, run)
    out.loss_sum.backward()  # fixtures store d(summed loss)/d(param)
    ref = {_map_key(k): v for k, v in run["grads"].items()}
    checked = 0
    for n, p in model.named_parameters():
        if n.startswith("teacher."):
            assert p.grad is None, f"teacher parameter {n} got a gradient"
            continue
        assert n in ref, f"{n} has no reference gradient"
        assert p.grad is not None, f"{n} got no gradient"
        close(p.grad, ref[n])
        checked += 1
    assert checked == len(ref)


def test_eval_features_match_fairseq(fixture):
    name, d = fixture
    model = build(d).eval()
    for key, remove in [("remove_extra_tokens", True), ("keep_extra_tokens", False)]:
        if key not in d["eval"]:
            continue
        ref = d["eval"][key]
        feats = model.extract_features(d["net_input"]["source"], padding_mask=d["net_input"].get("padding_mask"),
                                       remove_extra_tokens=remove)
        close(feats["x"], ref["x"])
        assert len(feats["layer_results"]) == len(ref["layer_results"])
        for a, b in zip(feats["layer_results"], ref["layer_results"]):
            close(a, b)


def test_ema_step_matches_fairseq(fixture):
    name, d = fixture
    es = d["ema_step"]
    model = build(d)
    cfg_dict = d["runs"]["train_nodrop_nonoise"]["config"]
    # student after the optimiser step, teacher as before it
    sd = dict(es["student_after_update"])
    sd["_ema"] = es["teacher_before"]
    load_fairseq_weights(model, sd, ema_encoder_only=bool(cfg_dict.get("ema_encoder_only")))
    decay = model.update_teacher(es["num_updates"])
    assert math.isclose(decay, es["decay"], rel_tol=0, abs_tol=1e-12)
    prefix = "blocks." if cfg_dict.get("ema_encoder_only") else ""
    own = dict(model.teacher.state_dict())
    for k, v in es["teacher_after"].items():
        mine = own[_map_key(prefix + k)]
        assert float((mine - v).abs().max()) <= 1e-7, k
    # a second call with the same update count is a no-op (overflow / resume semantics)
    before = {k: v.clone() for k, v in model.teacher.state_dict().items()}
    model.update_teacher(es["num_updates"])
    assert all(torch.equal(before[k], v) for k, v in model.teacher.state_dict().items())
