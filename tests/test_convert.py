"""``d2v convert``: real fairseq checkpoint files -> model folder -> fairseq's own outputs.

``tests/fixtures/fairseq/checkpoints`` holds fairseq-written checkpoints of the set-A tiny models
(``cfg`` as training writes it, a plain dict, and after fairseq's load-and-resave, a pickled
omegaconf ``DictConfig``); ``tests/fixtures/fairseq/<modality>.pt`` the outputs of fairseq's code on
those weights. Converting a checkpoint and feeding the recorded inputs and masks must reproduce
targets, predictions, losses and features: tolerance 1e-5 relative (fp32, CPU).

Also: the file format of the model folder (``d2v.models.model_dir``) and every refusal: not
data2vec 2.0, truncated, a pickle naming a class outside the allowed set (refused, not run),
missing / unknown keys, bad shapes.
"""

from __future__ import annotations

import io
import json
import math
import os
import pickle
import shutil
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest
import torch

from d2v.errors import InputError
from d2v.models import Data2Vec2
from d2v.models.fairseq_compat import _map_key, load_fairseq_checkpoint, read_fairseq_dictionary
from d2v.models.model_dir import FORMAT, convert_fairseq, load_model_dir, save_model_dir

FX = Path(__file__).parent / "fixtures" / "fairseq"
CK = FX / "checkpoints"
NAMES = ["image", "audio", "text"]
FORMS = ["", "_cfg_dictconfig"]
TOL = 1e-5


pytestmark = pytest.mark.usefixtures("one_torch_thread")


@pytest.fixture(scope="module")
def refs():
    return {n: torch.load(FX / f"{n}.pt", weights_only=True) for n in NAMES}


def rel_err(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a.detach().float() - b.float()).abs().max()) / max(1.0, float(b.abs().max()))


def write_dict(ref: dict, path: Path) -> Path:
    """A fairseq dict.txt from the fixture's dictionary (fairseq adds the 4 specials and <mask>)."""
    syms = ref["dictionary"]["symbols"]
    assert syms[:4] == ["<s>", "<pad>", "</s>", "<unk>"] and syms[-1] == "<mask>"
    path.write_text("".join(f"{s} 1\n" for s in syms[4:-1]))
    return path


# ------------------------------------------------------------------------------------ conversion
@pytest.mark.parametrize("form", FORMS, ids=["cfg_dict", "cfg_dictconfig"])
@pytest.mark.parametrize("name", NAMES)
def test_converted_checkpoint_reproduces_fairseq(name, form, refs, tmp_path):
    ref = refs[name]
    kw = {"dictionary": write_dict(ref, tmp_path / "dict.txt")} if name == "text" else {}
    out = convert_fairseq(CK / f"{name}_set_a{form}.pt", tmp_path / "model", **kw)
    meta = json.loads((out / "config.json").read_text())
    assert meta["format"] == FORMAT and meta["source"] == f"fairseq:{name}_set_a{form}.pt"
    model, info = load_model_dir(out)
    assert not model.training

    # weights: bit-identical to fairseq's state_dict, student and EMA teacher
    sd = model.state_dict()
    ema_only = name == "text"
    for k, v in ref["state_dict"].items():
        if k == "_ema":
            for tk, tv in v.items():
                assert torch.equal(sd["teacher." + _map_key(f"blocks.{tk}" if ema_only else tk)], tv), tk
        else:
            assert torch.equal(sd[_map_key(k)], v), k

    # the deterministic training forwards (eval mode = the runs' dropout-0 overrides)
    ni = ref["net_input"]
    worst = 0.0
    for run_name in ("train_nodrop_nonoise", "train_nodrop"):
        run = ref["runs"][run_name]
        mask = run["mask_info"]["mask"].bool()
        di = run["decoder_input"]
        noise = di[mask].view(mask.shape[0], -1, di.shape[-1])
        if run_name.endswith("nonoise"):
            assert float(noise.abs().max()) == 0.0
        with torch.no_grad():
            o = model(ni["source"], mask=mask, padding_mask=ni.get("padding_mask"), mask_noise=noise)
        assert int(o.sample_size) == int(run["sample_size"])
        for got, want in ((o.target, run["target_masked"]), (o.pred, run["pred_masked"])):
            e = rel_err(got, want)
            assert e <= TOL, f"{run_name}: max rel diff {e:.3g}"
            worst = max(worst, e)
        for got, want in ((o.loss_sum, run["loss"]), (o.loss, run["loss_over_sample_size"])):
            assert math.isclose(float(got), float(want), rel_tol=TOL), (float(got), float(want))
            worst = max(worst, abs(float(got) - float(want)) / abs(float(want)))

    # feature extraction (fairseq extract_features(mask=False), eval mode)
    ev = ref["eval"]["remove_extra_tokens"]
    feats = model.extract_features(ni["source"], padding_mask=ni.get("padding_mask"))
    e = rel_err(feats["x"], ev["x"])
    assert e <= TOL
    worst = max(worst, e)
    for got, want in zip(feats["layer_results"], ev["layer_results"]):
        assert rel_err(got, want) <= TOL
    print(f"{name}{form or '_cfg_dict'}: worst relative difference {worst:.2e}")


def test_both_cfg_forms_give_the_same_plain_config(refs):
    for name in NAMES:
        a = load_fairseq_checkpoint(CK / f"{name}_set_a.pt")
        b = load_fairseq_checkpoint(CK / f"{name}_set_a_cfg_dictconfig.pt")
        assert a["cfg"] == b["cfg"]
        assert a["cfg"]["model"] == refs[name]["config"]
        assert type(b["cfg"]) is dict and type(b["cfg"]["model"]["modalities"]) is dict


def test_text_dictionary_is_copied_and_checked(refs, tmp_path):
    d = write_dict(refs["text"], tmp_path / "dict.txt")
    assert read_fairseq_dictionary(d) == refs["text"]["dictionary"]["symbols"]
    out = convert_fairseq(CK / "text_set_a.pt", tmp_path / "m", dictionary=d)
    _, info = load_model_dir(out)
    assert info["tokenizer"]["type"] == "fairseq_dict" and Path(info["tokenizer"]["path"]).is_file()
    short = tmp_path / "short.txt"
    short.write_text("w0 1\nw1 1\n")
    with pytest.raises(InputError, match="short.txt: 7 symbols.*50 rows"):
        convert_fairseq(CK / "text_set_a.pt", tmp_path / "m2", dictionary=short)


def test_load_model_dir_reads_a_fairseq_checkpoint_directly():
    model, info = load_model_dir(CK / "audio_set_a_cfg_dictconfig.pt")
    assert info["kind"] == "fairseq" and model.cfg.modalities == ["speech"]


# ------------------------------------------------------------------------------------ refusals
def _fairseq_like(tmp_path: Path, mutate) -> Path:
    ck = load_fairseq_checkpoint(CK / "image_set_a.pt")
    ck = {"cfg": ck["cfg"], "model": dict(ck["model"]), "args": None}
    ck["model"]["_ema"] = dict(ck["model"]["_ema"])
    mutate(ck)
    p = tmp_path / "ck.pt"
    torch.save(ck, p)
    return p


def test_not_a_data2vec2_checkpoint(tmp_path):
    def wav2vec(ck):
        ck["cfg"]["model"]["_name"] = "wav2vec2"

    p = _fairseq_like(tmp_path, wav2vec)
    with pytest.raises(InputError, match=r"ck\.pt: not a data2vec 2.0 checkpoint: cfg.model._name is 'wav2vec2'"):
        convert_fairseq(p, tmp_path / "out")
    q = tmp_path / "other.pt"
    torch.save({"weights": torch.zeros(2)}, q)
    with pytest.raises(InputError, match=r"other\.pt: not a fairseq checkpoint"):
        convert_fairseq(q, tmp_path / "out")
    legacy = tmp_path / "legacy.pt"
    torch.save({"args": {"arch": "x"}, "model": {}}, legacy)
    with pytest.raises(InputError, match=r"legacy\.pt: an argparse-era"):
        convert_fairseq(legacy, tmp_path / "out")
    assert not (tmp_path / "out").exists()


def test_unsupported_setting_is_refused(tmp_path):
    p = _fairseq_like(tmp_path, lambda ck: ck["cfg"]["model"].update(layer_norm_first=True))
    with pytest.raises(InputError, match="layer_norm_first"):
        convert_fairseq(p, tmp_path / "out")


@pytest.mark.parametrize("cut", [0.5, 0.97])
def test_truncated_file(tmp_path, cut):
    data = (CK / "image_set_a_cfg_dictconfig.pt").read_bytes()
    p = tmp_path / "trunc.pt"
    p.write_bytes(data[: int(len(data) * cut)])
    with pytest.raises(InputError, match=r"trunc\.pt: truncated or corrupt"):
        convert_fairseq(p, tmp_path / "out")
    p.write_bytes(b"")
    with pytest.raises(InputError, match=r"trunc\.pt: truncated or corrupt"):
        load_model_dir(p)


def test_missing_unknown_and_misshapen_keys_are_listed(tmp_path):
    def mutate(ck):
        del ck["model"]["blocks.1.mlp.fc1.bias"]
        ck["model"]["blocks.9.extra.weight"] = torch.zeros(3)
        ck["model"]["blocks.0.norm1.weight"] = torch.zeros(7)
        del ck["model"]["_ema"]["blocks.2.attn.qkv.weight"]

    p = _fairseq_like(tmp_path, mutate)
    with pytest.raises(InputError) as ei:
        convert_fairseq(p, tmp_path / "out")
    msg = str(ei.value)
    assert "ck.pt" in msg
    assert "missing: ['blocks.1.mlp.fc1.bias', 'teacher.blocks.2.attn.qkv.weight']" in msg
    assert "unknown: ['blocks.9.extra.weight']" in msg
    assert "blocks.0.norm1.weight: checkpoint (7,) vs model (32,)" in msg


def test_missing_teacher(tmp_path):
    p = _fairseq_like(tmp_path, lambda ck: ck["model"].pop("_ema"))
    with pytest.raises(InputError, match="no EMA teacher.*--teacher-from-student"):
        convert_fairseq(p, tmp_path / "out")
    out = convert_fairseq(p, tmp_path / "out", teacher_from_student=True)
    model, _ = load_model_dir(out)
    sd = model.state_dict()
    assert torch.equal(sd["teacher.blocks.0.attn.qkv.weight"], sd["blocks.0.attn.qkv.weight"])
    assert torch.equal(sd["teacher.modality_encoders.image.extra_tokens"], sd["modality_encoders.image.extra_tokens"])


class _Evil:
    """Unpickling this would run a shell command that creates ``marker``."""

    def __init__(self, call, marker: Path):
        self.call, self.marker = call, marker

    def __reduce__(self):
        if self.call == "os.system":
            return (os.system, (f"touch {self.marker}",))
        if self.call == "subprocess.call":
            return (subprocess.call, (["touch", str(self.marker)],))
        return (eval, (f"open({str(self.marker)!r}, 'w').close()",))


@pytest.mark.parametrize("call", ["os.system", "subprocess.call", "builtins.eval"])
def test_pickle_naming_a_disallowed_callable_is_refused_not_run(tmp_path, call):
    marker = tmp_path / "pwned"
    p = tmp_path / "evil.pt"
    ck = load_fairseq_checkpoint(CK / "image_set_a.pt")
    ck["cfg"]["model"]["_name"] = _Evil(call, marker)  # hidden deep inside the config
    torch.save(ck, p)
    names = torch.serialization.get_unsafe_globals_in_checkpoint(p)
    assert any(n.split(".")[-1] in ("system", "call", "eval") for n in names), names  # the payload is there
    for load in (lambda: convert_fairseq(p, tmp_path / "out"), lambda: load_model_dir(p)):
        with pytest.raises(InputError, match=r"evil\.pt: refused to load: the pickle names .*nothing from it was executed"):
            load()
    assert not marker.exists()
    assert not (tmp_path / "out").exists()


def test_pickle_naming_a_foreign_config_class_is_refused(tmp_path):
    """An omegaconf/fairseq class outside the admitted set (here EnumNode) is refused by name."""
    p = tmp_path / "enum.pt"
    src = (CK / "text_set_a_cfg_dictconfig.pt").read_bytes()
    zin = zipfile.ZipFile(io.BytesIO(src))
    buf = io.BytesIO()
    with zipfile.ZipFile(buf, "w", zipfile.ZIP_STORED) as zout:
        for it in zin.infolist():
            data = zin.read(it.filename)
            if it.filename.endswith("data.pkl"):
                old = b"comegaconf.nodes\nAnyNode\n"
                assert old in data
                data = data.replace(old, b"comegaconf.nodes\nEnumNode\n", 1)
            zout.writestr(it, data)
    p.write_bytes(buf.getvalue())
    with pytest.raises(InputError, match=r"enum\.pt: refused to load: the pickle names the global omegaconf.nodes.EnumNode"):
        load_fairseq_checkpoint(p)


def test_stand_ins_run_no_omegaconf_code(tmp_path, monkeypatch):
    """The DictConfig form loads with omegaconf unimportable: the admitted classes are inert stand-ins."""
    for mod in [m for m in list(sys.modules) if m == "omegaconf" or m.startswith("omegaconf.")]:
        monkeypatch.setitem(sys.modules, mod, None)  # any import of omegaconf now fails
    with pytest.raises(ImportError):
        import omegaconf.dictconfig  # noqa: F401
    ck = load_fairseq_checkpoint(CK / "audio_set_a_cfg_dictconfig.pt")
    assert type(ck["cfg"]) is dict and ck["cfg"]["model"]["_name"] == "data2vec_multi"


def test_cli_convert(tmp_path, capsys):
    from d2v.cli.main import main

    assert main(["convert", "--from-fairseq", str(CK / "audio_set_a.pt"), "--out", str(tmp_path / "a")]) == 0
    assert (tmp_path / "a" / "config.json").is_file() and (tmp_path / "a" / "weights.pt").is_file()
    assert json.loads(capsys.readouterr().out)["modality"] == ["speech"]
    bad = tmp_path / "bad.pt"
    bad.write_bytes(b"not a checkpoint at all")
    assert main(["convert", "--from-fairseq", str(bad), "--out", str(tmp_path / "b")]) == 2
    lines = capsys.readouterr().err.strip().splitlines()
    assert len(lines) == 1 and "bad.pt: truncated or corrupt" in lines[0], lines


# ------------------------------------------------------------------------------------ model folder
def test_model_folder_roundtrip_and_checkpoint(tiny_cfg, tmp_path):
    import dataclasses

    torch.manual_seed(1)
    model = Data2Vec2(tiny_cfg("image", "text", text={"vocab_size": 260}))
    out = save_model_dir(model, tmp_path / "m", tokenizer="bytes", source="pretrain", extra={"step": 7})
    assert sorted(p.name for p in out.iterdir()) == ["config.json", "weights.pt"]
    back, info = load_model_dir(out)
    assert info["source"] == "pretrain" and info["extra"] == {"step": 7} and info["tokenizer"] == {"type": "bytes"}
    assert back.cfg == model.cfg
    for (k, a), (_, b) in zip(model.state_dict().items(), back.state_dict().items()):
        assert torch.equal(a, b), k
    # replacing an existing folder is atomic and leaves no temp folders behind
    save_model_dir(back, out, source="again")
    assert json.loads((out / "config.json").read_text())["source"] == "again"
    assert [p.name for p in tmp_path.iterdir()] == ["m"]
    # weights.pt alone (its folder has the config) and a pretraining checkpoint file
    assert load_model_dir(out / "weights.pt")[1]["kind"] == "folder"
    ck = tmp_path / "checkpoint.pt"
    torch.save({"model": model.state_dict(), "config": {"model": dataclasses.asdict(model.cfg), "data": {"source": "sample"}},
                "optimizer": {}, "step": 3}, ck)
    m2, info2 = load_model_dir(ck)
    assert info2["kind"] == "checkpoint" and info2["tokenizer"] == {"type": "bytes"}
    assert torch.equal(m2.state_dict()["blocks.0.attn.qkv.weight"], model.state_dict()["blocks.0.attn.qkv.weight"])


def test_model_folder_errors(tiny_cfg, tmp_path):

    model = Data2Vec2(tiny_cfg("image"))
    with pytest.raises(InputError, match="nope: no such model folder"):
        load_model_dir(tmp_path / "nope")
    (tmp_path / "empty").mkdir()
    with pytest.raises(InputError, match="empty: not a d2v model folder"):
        load_model_dir(tmp_path / "empty")
    out = save_model_dir(model, tmp_path / "m")
    cfg = json.loads((out / "config.json").read_text())
    (out / "config.json").write_text(json.dumps({**cfg, "format": "other/9"}))
    with pytest.raises(InputError, match=r"config.json: not a d2v model config"):
        load_model_dir(out)
    (out / "config.json").write_text("{not json")
    with pytest.raises(InputError, match=r"config.json: not valid JSON"):
        load_model_dir(out)
    # config and weights disagree: depth 3 in the weights, 2 in the config
    cfg["model"]["depth"] = 2
    cfg["model"]["average_top_k_layers"] = 2
    (out / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(InputError, match=r"weights.pt: weights do not match the model config:\n  unexpected keys: blocks.2"):
        load_model_dir(out)
    cfg["model"]["depth"] = 3
    cfg["model"]["embed_dim"] = 64
    cfg["model"]["num_heads"] = 4
    (out / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(InputError, match=r"shape mismatches: .*file \(32,\) vs config \(64,\)"):
        load_model_dir(out)
    cfg["model"]["embed_dim"] = 32
    cfg["model"]["bogus"] = 1
    (out / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(InputError, match="bogus"):
        load_model_dir(out)
    del cfg["model"]["bogus"]
    (out / "config.json").write_text(json.dumps(cfg))
    w = (out / "weights.pt").read_bytes()
    (out / "weights.pt").write_bytes(w[: len(w) // 3])
    with pytest.raises(InputError, match=r"weights.pt: truncated or corrupt"):
        load_model_dir(out)
    (out / "weights.pt").unlink()
    with pytest.raises(InputError, match="weights.pt is missing"):
        load_model_dir(out)
    other = tmp_path / "other.pt"
    torch.save({"state": 1}, other)
    with pytest.raises(InputError, match=r"other.pt: not a d2v model"):
        load_model_dir(other)
    pick = tmp_path / "plain.pkl"
    pick.write_bytes(pickle.dumps({"a": 1}, protocol=2))
    with pytest.raises(InputError, match=r"plain.pkl: truncated or corrupt"):
        load_model_dir(pick)
    shutil.rmtree(out)


def test_numpy_scalars_in_training_state_are_read_as_numbers(tmp_path):
    """fairseq's extra_state (metrics) may hold numpy scalars: read as numbers, nothing executed."""
    import numpy as np

    ck = load_fairseq_checkpoint(CK / "text_set_a.pt")
    ck["extra_state"]["metrics"] = {"wps": np.float64(1234.5), "n": np.int32(-7), "big": np.float32(2.5)}
    p = tmp_path / "np.pt"
    torch.save(ck, p)
    back = load_fairseq_checkpoint(p)
    assert back["extra_state"]["metrics"] == {"wps": 1234.5, "n": -7, "big": 2.5}
    assert type(back["extra_state"]["metrics"]["wps"]) is float
    ck["extra_state"]["metrics"] = {"arr": np.zeros(3)}
    torch.save(ck, p)
    with pytest.raises(InputError, match=r"np\.pt: refused to load: the pickle names the global numpy"):
        load_fairseq_checkpoint(p)
