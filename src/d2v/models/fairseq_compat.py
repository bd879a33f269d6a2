"""Map fairseq ``data2vec_multi`` configs and state dicts onto this project's model.

Pure data mapping, no fairseq import. Used by the conformance tests against
``shared/fixtures/fairseq`` and by the checkpoint converter.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import torch

from .config import DecoderConfig, ImageConfig, ModelConfig, SpeechConfig, TextConfig

FAIRSEQ_MODALITY = {"IMAGE": "image", "AUDIO": "speech", "TEXT": "text"}
_SECTION = {"image": "image", "speech": "audio", "text": "text"}

_TOP_KEYS = [
    "embed_dim", "depth", "num_heads", "mlp_ratio", "norm_eps", "encoder_dropout", "attention_dropout",
    "activation_dropout", "post_mlp_drop", "dropout_input", "layerdrop", "start_drop_path_rate",
    "end_drop_path_rate", "average_top_k_layers", "instance_norm_target_layer", "layer_norm_target_layer",
    "layer_norm_targets", "instance_norm_targets", "loss_beta", "loss_scale", "cls_loss", "clone_batch",
    "ema_decay", "ema_end_decay", "ema_anneal_end_step", "min_target_var", "min_pred_var",
]
_MOD_KEYS = [
    "prenet_depth", "prenet_dropout", "prenet_layerdrop", "num_extra_tokens", "mask_prob", "mask_prob_adjust",
    "mask_length", "inverse_mask", "mask_noise_std", "encoder_zero_mask", "local_grad_mult",
]
_DEC_KEYS = [
    "decoder_dim", "decoder_groups", "decoder_kernel", "decoder_layers", "input_dropout", "decoder_residual",
    "projection_layers", "projection_ratio",
]


class ConversionError(ValueError):
    pass


def config_from_fairseq(
    cfg: Mapping[str, Any], modalities: list[str] | None = None, vocab_size: int | None = None
) -> ModelConfig:
    """Build a ``ModelConfig`` from fairseq's ``cfg.model`` (a plain dict).

    ``modalities`` defaults to ``supported_modality``. ``vocab_size`` (text) is not in fairseq's
    model config (it comes from the task's dictionary): pass it, or read it off the embedding.
    Unsupported switches are refused.
    """
    if cfg.get("layer_norm_first"):
        raise ConversionError("layer_norm_first=True (pre-LN) is not supported")
    if modalities is None:
        sm = cfg.get("supported_modality")
        if sm not in FAIRSEQ_MODALITY:
            raise ConversionError(f"cannot tell the modality: supported_modality={sm!r}")
        modalities = [FAIRSEQ_MODALITY[sm]]
    top = {k: cfg[k] for k in _TOP_KEYS if k in cfg}
    out = ModelConfig(**top)
    ema_encoder_only = bool(cfg.get("ema_encoder_only", False))
    for m in modalities:
        sec = cfg["modalities"][_SECTION[m]]
        dec = DecoderConfig(**{k: sec["decoder"][k] for k in _DEC_KEYS if k in sec["decoder"]})
        kw = {k: sec[k] for k in _MOD_KEYS if k in sec}
        if ema_encoder_only:
            kw["teacher_encoder"] = "none"
        else:
            kw["teacher_encoder"] = "full" if sec.get("ema_local_encoder", False) else "no_local"
        if m == "image":
            mc: Any = ImageConfig(decoder=dec, input_size=sec["input_size"], in_chans=sec["in_chans"],
                                  patch_size=sec["patch_size"], **kw)
            if sec.get("embed_dim", cfg["embed_dim"]) != cfg["embed_dim"]:
                raise ConversionError("image embed_dim != model embed_dim (extra projection) is not supported")
        elif m == "speech":
            mc = SpeechConfig(
                decoder=dec, feature_encoder_spec=sec["feature_encoder_spec"], conv_pos_width=sec["conv_pos_width"],
                conv_pos_groups=sec["conv_pos_groups"], conv_pos_depth=sec["conv_pos_depth"],
                use_alibi=sec.get("use_alibi_encoder", True), learned_alibi_scale=sec.get("learned_alibi_scale", True),
                **kw,
            )
            if sec.get("learned_alibi_scale_per_layer"):
                raise ConversionError("learned_alibi_scale_per_layer is not supported")
        else:
            if vocab_size is None:
                raise ConversionError("text needs vocab_size (the dictionary size)")
            mc = TextConfig(decoder=dec, vocab_size=vocab_size, max_source_positions=sec["max_source_positions"],
                            dropout=sec["dropout"], **kw)
        setattr(out, m, mc)
    return out.validate()


def _map_key(key: str) -> str:
    for fs, ours in FAIRSEQ_MODALITY.items():
        key = key.replace(f"modality_encoders.{fs}.", f"modality_encoders.{ours}.")
    return key.replace("fixed_positional_encoder.positions", "pos_embed")


def state_dict_from_fairseq(
    sd: Mapping[str, Any], ema_encoder_only: bool
) -> dict[str, torch.Tensor]:
    """fairseq ``model.state_dict()`` (with the nested ``_ema`` dict) -> this model's keys."""
    out: dict[str, torch.Tensor] = {}
    for k, v in sd.items():
        if k == "_ema":
            continue
        out[_map_key(k)] = v
    ema = sd.get("_ema")
    if ema is not None:
        for k, v in ema.items():
            k = f"blocks.{k}" if ema_encoder_only else k
            out["teacher." + _map_key(k)] = v
    return out


def load_fairseq_weights(model: torch.nn.Module, sd: Mapping[str, Any], ema_encoder_only: bool) -> None:
    """Load fairseq weights strictly; unknown or missing keys and shape mismatches are an error."""
    mapped = state_dict_from_fairseq(sd, ema_encoder_only)
    own = model.state_dict()
    ignore = {"ema_updates"}
    missing = sorted(k for k in own if k not in mapped and k.split(".")[-1] not in ignore)
    unknown = sorted(k for k in mapped if k not in own)
    bad = sorted(
        f"{k}: checkpoint {tuple(mapped[k].shape)} vs model {tuple(own[k].shape)}"
        for k in mapped if k in own and tuple(mapped[k].shape) != tuple(own[k].shape)
    )
    if missing or unknown or bad:
        raise ConversionError(
            "checkpoint does not match the model:"
            + (f"\n  missing: {missing}" if missing else "")
            + (f"\n  unknown: {unknown}" if unknown else "")
            + (f"\n  shape: {bad}" if bad else "")
        )
    model.load_state_dict(mapped, strict=False)


# =============================================================================================
# Reading fairseq checkpoint files without fairseq (and without executing anything they name)
# =============================================================================================
#
# fairseq training writes ``cfg`` as a plain dict: such a file loads with plain
# ``torch.load(weights_only=True)``. After fairseq's own load-and-resave (or from fairseq of
# 2020-21) ``cfg`` is a pickled omegaconf ``DictConfig``. Those few omegaconf classes are admitted
# under their pickled names, but bound to inert stand-ins defined here: unpickling only fills in
# their ``__dict__`` (torch's weights-only unpickler, BUILD without ``__setstate__``), no omegaconf
# code runs, and ``_plain`` then turns them into dicts, lists and scalars. Any other global
# (``os.system``, ``subprocess.Popen``, a fairseq class, an enum ...) is refused by torch before
# it is called.


class _OmegaStub:
    """State of a pickled omegaconf object; never called, only filled by BUILD."""

    _kind = "?"


class _DictConfigStub(_OmegaStub):
    _kind = "dict"


class _ListConfigStub(_OmegaStub):
    _kind = "list"


class _ValueNodeStub(_OmegaStub):
    _kind = "value"


class _MetadataStub(_OmegaStub):
    _kind = "meta"


class _TypeRef:
    """Stands for a type named in omegaconf metadata (``typing.Any``, ``dict``, ``list``, ``int``)."""

    def __init__(self, name: str):
        self.name = name

    def __repr__(self) -> str:
        return f"<type {self.name}>"


def _plain_dict(*_args: Any) -> dict:
    """Stands for ``collections.defaultdict`` (omegaconf's resolver cache): an empty plain dict."""
    return {}


class _NpDtypeStub:
    """Stands for ``numpy.dtype(name, align, copy)`` as pickled; records the name only."""

    def __init__(self, name: Any = None, *_args: Any):
        self.name = name

    def __setstate__(self, state: Any) -> None:
        self.state = state


def _np_scalar(dtype: Any, data: Any = None) -> Any:
    """Stands for ``numpy.core.multiarray.scalar``: a numeric numpy scalar -> a Python number.

    Training metrics in ``extra_state`` can hold numpy scalars; only numeric kinds are decoded,
    from raw bytes (nothing the file names is called).
    """
    import numpy as np

    if not isinstance(dtype, _NpDtypeStub) or not isinstance(dtype.name, str) or not isinstance(data, (bytes, bytearray)):
        raise ConversionError("malformed numpy scalar in the checkpoint")
    dt = np.dtype(dtype.name)
    if dt.kind not in "biufc":
        raise ConversionError(f"numpy scalar of dtype {dtype.name!r} refused (only numeric scalars are read)")
    state = getattr(dtype, "state", None)
    if isinstance(state, tuple) and len(state) > 1 and state[1] in ("<", ">", "|", "="):
        dt = dt.newbyteorder(state[1]) if state[1] in ("<", ">") else dt
    return np.frombuffer(bytes(data), dtype=dt, count=1)[0].item()


FAIRSEQ_SAFE_GLOBALS: list[tuple[Any, str]] = [
    (_DictConfigStub, "omegaconf.dictconfig.DictConfig"),
    (_ListConfigStub, "omegaconf.listconfig.ListConfig"),
    (_ValueNodeStub, "omegaconf.nodes.AnyNode"),
    (_ValueNodeStub, "omegaconf.nodes.StringNode"),
    (_ValueNodeStub, "omegaconf.nodes.IntegerNode"),
    (_ValueNodeStub, "omegaconf.nodes.FloatNode"),
    (_ValueNodeStub, "omegaconf.nodes.BooleanNode"),
    (_MetadataStub, "omegaconf.base.ContainerMetadata"),
    (_MetadataStub, "omegaconf.base.Metadata"),
    (_TypeRef("typing.Any"), "typing.Any"),
    (_TypeRef("dict"), "builtins.dict"),
    (_TypeRef("list"), "builtins.list"),
    (_TypeRef("int"), "builtins.int"),
    (_TypeRef("str"), "builtins.str"),
    (_TypeRef("float"), "builtins.float"),
    (_TypeRef("bool"), "builtins.bool"),
    (_plain_dict, "collections.defaultdict"),
    (_NpDtypeStub, "numpy.dtype"),
    (_np_scalar, "numpy.core.multiarray.scalar"),
    (_np_scalar, "numpy._core.multiarray.scalar"),
]
_MISSING = "???"  # omegaconf's marker of a mandatory value that was never set


def _plain(obj: Any, where: str, depth: int = 0) -> Any:
    """omegaconf stand-ins (and containers of them) -> plain dicts, lists and scalars."""
    if depth > 200:
        raise ConversionError(f"{where}: config nested too deeply")
    if isinstance(obj, _DictConfigStub):
        content = obj.__dict__.get("_content")
        if content is None or isinstance(content, str):
            return None if content is None or content == _MISSING else content
        return {str(k): _plain(v, f"{where}.{k}", depth + 1) for k, v in content.items()}
    if isinstance(obj, _ListConfigStub):
        content = obj.__dict__.get("_content")
        if content is None or isinstance(content, str):
            return None if content is None or content == _MISSING else content
        return [_plain(v, f"{where}[{i}]", depth + 1) for i, v in enumerate(content)]
    if isinstance(obj, _ValueNodeStub):
        return _plain(obj.__dict__.get("_val"), where, depth + 1)
    if isinstance(obj, (_MetadataStub, _TypeRef)):
        raise ConversionError(f"{where}: unexpected omegaconf metadata in a config value")
    if isinstance(obj, Mapping):
        return {k: _plain(v, f"{where}.{k}", depth + 1) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [_plain(v, f"{where}[{i}]", depth + 1) for i, v in enumerate(obj)]
    if obj is None or isinstance(obj, (str, int, float, bool)):
        return obj
    raise ConversionError(f"{where}: unexpected value of type {type(obj).__name__} in the config")


def load_fairseq_checkpoint(path) -> dict[str, Any]:
    """Read a fairseq checkpoint as plain data: ``cfg`` a plain dict, ``model`` a dict of tensors.

    ``torch.load(weights_only=True)`` with the omegaconf stand-ins admitted; anything else a pickle
    names is refused. Errors are ``InputError`` naming the file.
    """
    from pathlib import Path

    from d2v.errors import InputError
    from d2v.io import torch_load_checked

    path = Path(path)
    if path.is_dir():
        raise InputError(f"{path}: is a folder, expected a fairseq checkpoint file (.pt)")
    with torch.serialization.safe_globals(FAIRSEQ_SAFE_GLOBALS):
        obj = torch_load_checked(path)
    if not is_fairseq_checkpoint(obj) or not isinstance(obj.get("model"), Mapping):
        got = sorted(map(str, obj.keys()))[:12] if isinstance(obj, Mapping) else type(obj).__name__
        raise InputError(f"{path}: not a fairseq checkpoint (expected a dict with 'model' and 'cfg', got {got})")
    return plain_fairseq_checkpoint(obj, str(path))


# Switches of fairseq's data2vec_multi config that change what the weights compute. Anything not
# listed here either has no effect on the forward pass, or is mapped by ``config_from_fairseq``.
_MUST_EQUAL_TOP = {"layer_norm_first": False, "end_of_block_targets": False, "norm_affine": True,
                   "batch_norm_target_layer": False, "shared_decoder": None}
_MUST_EQUAL_MOD = {"use_alibi_encoder": {"image": False, "text": False}, "learned_alibi": False,
                   "add_masks": False, "remove_masks": False, "transformer_decoder": False,
                   "enc_dec_transformer": False, "fixed_positions": True, "learned_pos": True,
                   "no_scale_embedding": True, "layernorm_embedding": True,
                   "no_token_positional_embeddings": False, "extractor_mode": "layer_norm",
                   "conv_pos_pre_ln": False, "alibi_max_pos": None}
_MUST_EQUAL_DEC = {"add_positions_masked": False, "add_positions_all": False}


def check_fairseq_model_cfg(m: Mapping[str, Any]) -> str:
    """Validate fairseq's ``cfg.model`` for conversion; return our modality name. ``ConversionError`` else."""
    name = m.get("_name")
    if name != "data2vec_multi":
        hint = {
            "wav2vec2": " (a wav2vec 2.0 / data2vec 1.0 speech model)",
            "data2vec_audio": " (a data2vec 1.0 speech model)",
            "data2vec_text": " (a data2vec 1.0 text model)",
            "wav2vec_ctc": " (a fine-tuned CTC model; convert the pretrained checkpoint instead)",
            "mae_image_classification": " (a fine-tuned image classifier; convert the pretrained checkpoint instead)",
            "data2vec_text_classification": " (a fine-tuned text classifier; convert the pretrained checkpoint instead)",
        }.get(str(name), "")
        raise ConversionError(f"not a data2vec 2.0 checkpoint: cfg.model._name is {name!r}, expected 'data2vec_multi'{hint}")
    sm = m.get("supported_modality")
    if sm not in FAIRSEQ_MODALITY:
        raise ConversionError(f"cfg.model.supported_modality is {sm!r}, expected one of {sorted(FAIRSEQ_MODALITY)}")
    ours = FAIRSEQ_MODALITY[sm]
    bad = [f"model.{k}={m[k]!r}" for k, want in _MUST_EQUAL_TOP.items() if k in m and m[k] != want]
    sec = (m.get("modalities") or {}).get(_SECTION[ours]) or {}
    if not sec:
        raise ConversionError(f"cfg.model.modalities.{_SECTION[ours]} is missing")
    for k, want in _MUST_EQUAL_MOD.items():
        if isinstance(want, dict):
            if ours not in want:
                continue
            want = want[ours]
        if k in sec and sec[k] != want:
            bad.append(f"model.modalities.{_SECTION[ours]}.{k}={sec[k]!r}")
    for k, want in _MUST_EQUAL_DEC.items():
        if k in (sec.get("decoder") or {}) and sec["decoder"][k] != want:
            bad.append(f"model.modalities.{_SECTION[ours]}.decoder.{k}={sec['decoder'][k]!r}")
    if bad:
        raise ConversionError("unsupported data2vec_multi settings (this model cannot reproduce them): " + ", ".join(bad))
    return ours


def read_fairseq_dictionary(path) -> list[str]:
    """The symbols of a fairseq ``dict.txt`` in id order: 4 specials, the file's lines, ``<mask>``.

    ``Dictionary.load`` adds ``<s> <pad> </s> <unk>`` first; ``MaskedLMTask`` appends ``<mask>``.
    """
    from pathlib import Path

    from d2v.errors import InputError

    path = Path(path)
    try:
        lines = path.read_text(encoding="utf-8").splitlines()
    except (OSError, UnicodeDecodeError) as e:
        raise InputError(f"{path}: cannot read the dictionary: {e}") from e
    syms = ["<s>", "<pad>", "</s>", "<unk>"]
    for i, line in enumerate(lines, 1):
        line = line.rstrip()
        if not line:
            continue
        parts = line.rsplit(" ", 1)
        if len(parts) != 2:
            raise InputError(f"{path}:{i}: expected '<symbol> <count>', got {line!r}")
        sym, cnt = parts
        if sym == "#fairseq:overwrite" or cnt == "#fairseq:overwrite":
            sym = parts[0].replace(" #fairseq:overwrite", "")
        syms.append(sym)
    syms.append("<mask>")
    return syms


def model_from_fairseq_checkpoint(ckpt: Mapping[str, Any], where: str, teacher_from_student: bool = False):
    """A ``Data2Vec2`` holding a fairseq checkpoint's student and EMA teacher (plain data in).

    ``teacher_from_student``: when the file has no ``_ema`` (teacher), start the teacher as a copy
    of the student instead of refusing. Returns ``(model, meta)``.
    """
    from d2v.errors import InputError

    from .data2vec2 import Data2Vec2

    cfg = ckpt.get("cfg")
    if cfg is None:
        if ckpt.get("args") is not None:
            raise InputError(f"{where}: an argparse-era fairseq checkpoint ('args', no 'cfg'): not data2vec 2.0")
        raise InputError(f"{where}: no 'cfg' in the checkpoint: not a fairseq data2vec 2.0 checkpoint")
    if not isinstance(cfg, Mapping) or not isinstance(cfg.get("model"), Mapping):
        raise InputError(f"{where}: cfg.model is missing: not a fairseq data2vec 2.0 checkpoint")
    mcfg = cfg["model"]
    sd = ckpt["model"]
    try:
        ours = check_fairseq_model_cfg(mcfg)
        vocab = None
        if ours == "text":
            emb = sd.get("modality_encoders.TEXT.local_encoder.embed_tokens.weight")
            if not isinstance(emb, torch.Tensor):
                raise ConversionError("the text token embedding (modality_encoders.TEXT.local_encoder.embed_tokens.weight) is missing")
            vocab = int(emb.shape[0])
        model_cfg = config_from_fairseq(mcfg, vocab_size=vocab)
    except ConversionError as e:
        raise InputError(f"{where}: {e}") from e
    except Exception as e:  # noqa: BLE001 - malformed values in a foreign config
        raise InputError(f"{where}: cannot read cfg.model: {type(e).__name__}: {e}") from e
    # inference-time defaults are the checkpoint's, but the collapse guard is a training matter
    model = Data2Vec2(model_cfg)
    ema_only = bool(mcfg.get("ema_encoder_only", False))
    sd = dict(sd)
    if "_ema" not in sd and teacher_from_student:
        sd["_ema"] = _teacher_from_student(model, sd, ema_only)
    for k, v in sd.items():
        if k != "_ema" and not isinstance(v, torch.Tensor):
            raise InputError(f"{where}: model entry {k!r} is a {type(v).__name__}, not a tensor")
    try:
        load_fairseq_weights(model, sd, ema_encoder_only=ema_only)
    except ConversionError as e:
        msg = str(e)
        if "_ema" not in ckpt["model"]:
            msg += "\n  (the file has no EMA teacher '_ema'; pass teacher_from_student / --teacher-from-student to copy the student)"
        raise InputError(f"{where}: {msg}") from e
    meta = {"fairseq_model_cfg": mcfg, "modality": ours, "num_updates": _num_updates(ckpt),
            "teacher": "ema" if "_ema" in ckpt["model"] else "copied from student"}
    return model.eval(), meta


def _num_updates(ckpt: Mapping[str, Any]) -> Any:
    hist = ckpt.get("optimizer_history")
    if isinstance(hist, list) and hist and isinstance(hist[-1], Mapping):
        return hist[-1].get("num_updates")
    return None


def _teacher_from_student(model: torch.nn.Module, sd: Mapping[str, Any], ema_only: bool) -> dict[str, torch.Tensor]:
    """The fairseq-relative ``_ema`` dict a fresh teacher would hold: the student's entries for it."""
    inv = {v: k for k, v in FAIRSEQ_MODALITY.items()}
    out: dict[str, torch.Tensor] = {}
    for name in model.teacher.state_dict():
        fs = name
        for ours, fsm in inv.items():
            fs = fs.replace(f"modality_encoders.{ours}.", f"modality_encoders.{fsm}.")
        fs = fs.replace("pos_embed", "fixed_positional_encoder.positions")
        src = fs
        if src in sd:
            out[fs[len("blocks."):] if ema_only and fs.startswith("blocks.") else fs] = sd[src]
    return out


def is_fairseq_checkpoint(obj: Any) -> bool:
    return isinstance(obj, Mapping) and "model" in obj and ("cfg" in obj or "args" in obj) and "config" not in obj


def plain_fairseq_checkpoint(obj: Mapping[str, Any], where: str) -> dict[str, Any]:
    from d2v.errors import InputError

    out = dict(obj)
    try:
        out["cfg"] = _plain(obj.get("cfg"), "cfg")
    except ConversionError as e:
        raise InputError(f"{where}: {e}") from e
    return out


IMAGENET_MEAN = [0.485, 0.456, 0.406]
IMAGENET_STD = [0.229, 0.224, 0.225]


def fairseq_preprocess(model_cfg: ModelConfig) -> dict[str, Any]:
    """How inputs are prepared for a converted model (what fairseq's data pipeline did)."""
    if model_cfg.image is not None:
        # MaeImageDataset / fine-tuning eval: resize 256 (= input_size / 0.875), centre crop, ImageNet mean/std
        return {"image": {"mean": IMAGENET_MEAN, "std": IMAGENET_STD,
                          "resize": int(round(model_cfg.image.input_size / 0.875)), "crop": "center"}}
    if model_cfg.speech is not None:
        return {"speech": {"normalize": True}}
    return {"text": {"append_eos": True}}


def _sha256(path) -> str:
    import hashlib

    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()
