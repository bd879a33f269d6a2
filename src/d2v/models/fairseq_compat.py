"""Map fairseq ``data2vec_multi`` configs and state dicts onto this project's model.

Pure data mapping, no fairseq import. Used by the conformance tests against
``shared/fixtures/fairseq`` and by the checkpoint converter.
"""

from __future__ import annotations

from typing import Any, Mapping

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
    "mask_length", "inverse_mask", "mask_noise_std", "encoder_zero_mask",
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
