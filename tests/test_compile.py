"""``train.compile`` (d2v.train.compile): the model step is one graph, compiled it gives the eager
numbers, and a failing compilation warns once and trains on eager."""

from __future__ import annotations

import copy
import pickle
import warnings

import pytest
import torch
from conftest import build_cfg, make_batch

from d2v.config import load_config
from d2v.models import Data2Vec2
from d2v.train.compile import CompiledCore, compile_model
from d2v.train.monitor import SpeechFrontEndMonitor

MODALITIES = ["image", "speech", "text"]


@pytest.fixture(autouse=True)
def _fresh_dynamo():
    """Each test compiles from scratch (no cache entries of another test's models count against the recompile limit)."""
    torch._dynamo.reset()
    yield
    torch._dynamo.reset()


def tiny_model(modality: str) -> Data2Vec2:
    """The pipeline's tiny model (experiment=tiny) with the one encoder."""
    cfg = load_config(["experiment=tiny", "data=sample", f"train.modalities=[{modality}]"]).model
    for m in MODALITIES:
        if m != modality:
            setattr(cfg, m, None)
    return Data2Vec2(cfg).train()


def tiny_batch(model: Data2Vec2, modality: str, batch_size: int = 2, pad: bool = False) -> torch.Tensor:
    if modality == "image":
        return torch.randn(batch_size, 1, 28, 28)
    if modality == "speech":
        return torch.randn(batch_size, 16000)
    ids = torch.randint(4, model.cfg.text.vocab_size, (batch_size, 64))
    if pad:
        ids[0, 50:] = model.cfg.text.pad_idx
    return ids


def step_args(model: Data2Vec2, modality: str, src: torch.Tensor, noise: bool = True) -> tuple:
    """``_step``'s arguments for ``src`` with a mask drawn here (and fixed decoder noise)."""
    enc = model.encoder(modality)
    T = enc.num_tokens(tuple(src.shape))
    mask = enc.make_mask(src.shape[0] * model.cfg.clone_batch, T, torch.device("cpu"))
    modality, mask, n_masked, pad = model._prelude(src, modality, mask, None, None)
    mask_noise = torch.randn(mask.shape[0], n_masked, model.cfg.embed_dim) * 0.01 if noise else None
    return modality, src, mask, n_masked, pad, mask_noise, model._layerdrop_keep()


# ------------------------------------------------------------------------------ one graph
@pytest.mark.parametrize("modality", MODALITIES)
def test_the_step_is_one_graph(modality):
    model = tiny_model(modality)
    monitor = SpeechFrontEndMonitor(model, enabled=modality == "speech")  # its hook is traced too
    try:
        args = step_args(model, modality, tiny_batch(model, modality), noise=False)
        ex = torch._dynamo.explain(Data2Vec2._step)(model, *args)
    finally:
        monitor.close()
    assert ex.graph_break_count == 0, ex.break_reasons
    assert ex.graph_count == 1


def test_padded_text_stays_one_graph():
    model = tiny_model("text")
    args = step_args(model, "text", tiny_batch(model, "text", pad=True), noise=False)
    assert args[4] is not None  # the padding path
    ex = torch._dynamo.explain(Data2Vec2._step)(model, *args)
    assert ex.graph_break_count == 0 and ex.graph_count == 1, ex.break_reasons


# ------------------------------------------------------------------------------ same numbers
def grads(model: Data2Vec2) -> dict[str, torch.Tensor]:
    return {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}


def compare(modality: str, backend: str, steps: int = 2) -> None:
    """Eager vs compiled on the same model and batches: loss, pred, target, variances, grads."""
    model = Data2Vec2(build_cfg(modality)).train()
    batches = [step_args(model, modality, make_batch(modality)) for _ in range(steps)]
    runs = []
    for compiled in (False, True):
        compile_model(model, compiled, backend=backend)
        res = []
        for modality_, src, mask, _, _, noise, _ in batches:
            model.zero_grad(set_to_none=True)
            out = model(src, modality_, mask=mask, mask_noise=noise)
            out.loss.backward()
            res.append((out, grads(model)))
        runs.append(res)
    core = model._compiled_core
    assert isinstance(core, CompiledCore) and core.active and core.compiled_calls == steps and core.eager_calls == 0
    for (a, ga), (b, gb) in zip(*runs):
        torch.testing.assert_close(b.loss, a.loss, rtol=1e-5, atol=1e-6)
        torch.testing.assert_close(b.loss_sum, a.loss_sum, rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(b.pred, a.pred, rtol=1e-4, atol=1e-5)
        torch.testing.assert_close(b.target, a.target, rtol=1e-4, atol=1e-5)
        torch.testing.assert_close(b.target_var, a.target_var, rtol=1e-5, atol=1e-6)
        torch.testing.assert_close(b.pred_var, a.pred_var, rtol=1e-5, atol=1e-6)
        assert torch.equal(b.sample_size, a.sample_size) and b.loss_terms.keys() == a.loss_terms.keys()
        assert ga.keys() == gb.keys() and len(ga) > 10
        for n in ga:
            scale = float(ga[n].abs().max()) + 1e-8
            torch.testing.assert_close(gb[n], ga[n], rtol=1e-4, atol=1e-5 * scale, msg=n)


@pytest.mark.slow  # inductor compiles forward and backward C++ kernels: 30-90 s per modality on 2 cores
@pytest.mark.parametrize("modality", MODALITIES)
def test_compiled_step_matches_eager_inductor(modality):
    compare(modality, "inductor")


@pytest.mark.parametrize("modality", [
    "image", pytest.param("speech", marks=pytest.mark.slow), pytest.param("text", marks=pytest.mark.slow),
])
def test_compiled_step_matches_eager_aot(modality):
    """AOTAutograd's joint forward/backward graph (functionalised, as inductor gets it), without inductor."""
    compare(modality, "aot_eager")


def test_layerdrop_decisions_are_the_eager_ones_and_a_skipping_step_runs_eager():
    """With layerdrop the compiled model draws the decisions before the step (the same draw), runs
    a step that keeps every block compiled and one that skips a block eager."""
    ref = Data2Vec2(build_cfg("image", layerdrop=0.5)).train()
    model = copy.deepcopy(ref)
    compile_model(model, True, backend="eager")
    core = model._compiled_core
    steps = [step_args(ref, "image", make_batch("image")) for _ in range(12)]  # P(all 3 kept) = 1/8
    for i, (modality, src, mask, _, _, noise, _) in enumerate(steps):
        outs = []
        for m in (ref, model):
            torch.manual_seed(i)  # the layerdrop draw is the only randomness of the step
            outs.append(m(src, modality, mask=mask, mask_noise=noise))
        torch.testing.assert_close(outs[1].loss, outs[0].loss, rtol=1e-6, atol=1e-7)
    assert core.active and core.eager_calls == 0 and 0 < core.compiled_calls < 12
    model.eval()  # no layerdrop in eval: compiled
    with torch.no_grad():
        n = core.compiled_calls
        model(steps[0][1], "image")
    assert core.compiled_calls == n + 1


# ------------------------------------------------------------------------------ fallback
def failing_backend(gm, example_inputs):
    raise RuntimeError("no working C++ compiler (simulated)")


def train(model: Data2Vec2, batches: list[tuple]) -> list[float]:
    opt = torch.optim.AdamW(model.param_groups(0.05), lr=1e-3)
    losses = []
    for step, (modality, src, mask, _, _, noise, _) in enumerate(batches):
        opt.zero_grad(set_to_none=True)
        out = model(src, modality, mask=mask, mask_noise=noise)
        out.loss.backward()
        opt.step()
        model.update_teacher(step + 1)
        losses.append(float(out.loss.detach()))
    return losses


def test_a_failing_compiler_warns_once_and_trains_eager():
    ref = Data2Vec2(build_cfg("image")).train()
    model = copy.deepcopy(ref)
    batches = [step_args(ref, "image", make_batch("image")) for _ in range(3)]
    want = train(ref, batches)
    compile_model(model, True, backend=failing_backend)
    with warnings.catch_warnings(record=True) as rec:
        warnings.simplefilter("always")
        got = train(model, batches)
    msgs = [str(w.message) for w in rec if "train.compile" in str(w.message)]
    assert len(msgs) == 1, msgs
    assert "no working C++ compiler" in msgs[0] and "eager" in msgs[0]
    assert got == want  # the eager numbers, bit for bit
    core = model._compiled_core
    assert not core.active and core.eager_calls == 3 and core.compiled_calls == 0


def test_compile_flag_in_pretraining_falls_back_with_one_warning(tmp_path, monkeypatch):
    """``train.compile=true`` reaches the model; with a failing backend the run warns once and trains."""
    import d2v.train.compile as dc
    from d2v.train.pretrain import pretrain

    real = dc.CompiledCore.__init__

    def init(self, fn, backend="inductor", mode=None, fullgraph=True):
        real(self, fn, backend=failing_backend, mode=mode, fullgraph=fullgraph)

    monkeypatch.setattr(dc.CompiledCore, "__init__", init)
    cfg = load_config(["experiment=tiny", "data=sample", "data.num_samples=16", f"train.out_dir={tmp_path}",
                       "train.batch_size=2", "train.max_steps=3", "train.track=false", "train.compile=true"])
    assert cfg.train.compile == "true"
    with warnings.catch_warnings(record=True) as rec:
        warnings.simplefilter("always")
        res = pretrain(cfg, progress=False)
    assert len([w for w in rec if "train.compile" in str(w.message)]) == 1
    assert set(res.last_loss) == {"image", "speech", "text"}
    assert all(v == v for v in res.last_loss.values())  # finite, trained


def test_compile_setting_auto_means_cuda_only():
    """The base configs say ``auto`` (compiled on CUDA, eager on a CPU), the toy ``false``; YAML
    booleans and any case are accepted, anything else is refused with the key's name."""
    from d2v.models.config import ConfigError
    from d2v.train.compile import compile_enabled

    assert load_config(["experiment=image_base"]).train.compile == "auto"
    assert load_config(["experiment=tiny", "train.compile=TRUE"]).train.compile == "true"
    cpu, cuda = torch.device("cpu"), torch.device("cuda", 0)  # a device object needs no GPU
    assert [compile_enabled(s, cpu) for s in ("auto", "true", "false")] == [False, True, False]
    assert [compile_enabled(s, cuda) for s in ("auto", "true", "false")] == [True, True, False]
    with pytest.raises(ConfigError, match="train.compile: auto.true.false"):
        load_config(["train.compile=sometimes"])


def test_disabled_by_default_and_not_in_copies():
    assert load_config(["experiment=tiny"]).train.compile == "false"
    model = Data2Vec2(build_cfg("image"))
    assert compile_model(model, False) is model and model._compiled_core is None
    compile_model(model, True, backend="eager")
    assert isinstance(model._compiled_core, CompiledCore)
    assert copy.deepcopy(model)._compiled_core is None  # a copy runs eager on its own weights
    assert pickle.loads(pickle.dumps(model))._compiled_core is None
    assert "_compiled_core" not in "".join(model.state_dict())
    compile_model(model, False)
    assert model._compiled_core is None
