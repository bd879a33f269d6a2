"""Baseline objectives over the *same* encoder code as data2vec 2.0, for the efficiency benchmarks.

* ``Data2Vec1Style``: a data2vec 1.0-style step. Each of the M masked copies of a sample goes
  through the encoder at full length, masked positions replaced by a learned mask embedding (no
  token dropping); the teacher runs once *per copy* (M teacher passes for M copies), and a linear
  head regresses the same targets (mean of the top-K FFN outputs, instance-normalised) at the
  masked positions. No convolutional decoder.
* ``MAE``: visible tokens only through the shared image encoder and blocks, a small transformer
  decoder (mask tokens + fixed 2-D sin-cos positions) reconstructing per-patch normalised pixels;
  the loss is the per-patch MSE averaged over masked patches only.

Both wrap a ``Data2Vec2`` backbone (its modality encoders, blocks and EMA teacher) and leave its
numerics untouched; ``objective(...)`` builds any of ``data2vec2 | data2vec1 | mae``.
Each ``forward`` returns an object with ``.loss`` (what to backpropagate).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

import torch
import torch.nn as nn

from .blocks import make_blocks, run_blocks
from .config import ModelConfig
from .data2vec2 import Data2Vec2, _init_bert_params
from .encoders import InputError, sincos_2d
from . import masking

OBJECTIVES = ("data2vec2", "data2vec1", "mae")


@dataclass
class BaselineOutput:
    loss: torch.Tensor
    pred: torch.Tensor
    target: torch.Tensor
    mask: torch.Tensor


def _student_param_groups(module: nn.Module, weight_decay: float) -> list[dict]:
    """As ``Data2Vec2.param_groups``: no teacher, no decay on 1-D / bias / ALiBi scale."""
    decay, no_decay = [], []
    for name, p in module.named_parameters():
        if not p.requires_grad or "teacher." in name:
            continue
        (no_decay if p.ndim <= 1 or name.endswith(".bias") or "alibi_scale" in name else decay).append(p)
    return [{"params": decay, "weight_decay": weight_decay}, {"params": no_decay, "weight_decay": 0.0}]


class Data2Vec1Style(nn.Module):
    """data2vec 1.0-style objective on the shared backbone (see module docstring)."""

    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.backbone = Data2Vec2(cfg)
        self.cfg = cfg
        d = cfg.embed_dim
        self.mask_emb = nn.Parameter(torch.empty(d).uniform_())  # data2vec 1.0 / wav2vec 2.0 init
        self.heads = nn.ModuleDict({m: nn.Linear(d, d) for m in cfg.modalities})
        self.heads.apply(_init_bert_params)
        self.teacher_passes = 0  # how many times the teacher has run (tests: once per copy)

    def param_groups(self, weight_decay: float) -> list[dict]:
        return _student_param_groups(self, weight_decay)

    def update_teacher(self, num_updates: int) -> float:
        return self.backbone.update_teacher(num_updates)

    def make_mask(self, modality: str, batch_size: int, length: int, generator=None) -> torch.Tensor:
        return self.backbone.make_mask(modality, batch_size, length, generator=generator)

    def forward(self, source: torch.Tensor, modality: str, mask: Optional[torch.Tensor] = None,
                padding_mask: Optional[torch.Tensor] = None) -> BaselineOutput:
        bb = self.backbone
        enc = bb.encoder(modality)
        enc.check_input(source)
        B, M, d = source.shape[0], self.cfg.clone_batch, self.cfg.embed_dim
        T = enc.num_tokens(tuple(source.shape))
        padding_mask = bb._padding(enc, source, padding_mask)
        if mask is None:
            mask = enc.make_mask(B * M, T, source.device)
        mask, n_masked = bb._check_mask(mask, B * M, T)

        # ---- student: every copy at full length, masked tokens replaced by the mask embedding
        local = enc.local_features(source)  # (B, T, D)
        x = local.repeat_interleave(M, 0)
        x = torch.where(mask.unsqueeze(-1), self.mask_emb.to(x.dtype).expand_as(x), x)
        pad_rows = padding_mask.repeat_interleave(M, 0) if padding_mask is not None else None
        ctx = enc.contextualize(x, padding_mask=pad_rows)
        h, _ = run_blocks(bb.blocks, ctx.x, ctx.bias, self.cfg.layerdrop)
        h = h[:, enc.num_extra_tokens:]
        masked_idx = torch.argsort(mask.to(torch.uint8), dim=1, stable=True)[:, T - n_masked:]
        gather = masked_idx.unsqueeze(-1).expand(-1, -1, d)
        pred = self.heads[modality](h.gather(1, gather)).reshape(-1, d)

        # ---- teacher: once per masked copy (data2vec 1.0 has no sharing across copies)
        ys = []
        for c in range(M):
            ys.append(bb.make_targets(modality, source, local, padding_mask))
            self.teacher_passes += 1
        y = torch.stack(ys, 1).reshape(B * M, T, d)  # row b*M + c: copy c of sample b
        target = y.gather(1, gather).reshape(-1, d)
        reg = bb._regression(pred, target).sum(-1)
        if pad_rows is not None:
            w = (~pad_rows.gather(1, masked_idx)).reshape(-1).float()
            loss = (reg * w).sum() / w.sum().clamp_min(1)
        else:
            loss = reg.mean()
        return BaselineOutput(loss, pred, target, mask)


def patchify(imgs: torch.Tensor, p: int) -> torch.Tensor:
    """(B, C, H, W) -> (B, T, p*p*C), patches in row-major order (the PatchEmbed token order)."""
    B, C, H, W = imgs.shape
    h, w = H // p, W // p
    x = imgs.reshape(B, C, h, p, w, p)
    return torch.einsum("nchpwq->nhwpqc", x).reshape(B, h * w, p * p * C)


class MAE(nn.Module):
    """MAE-style objective on the shared image encoder (see module docstring)."""

    def __init__(self, cfg: ModelConfig, decoder_dim: int = 64, decoder_depth: int = 2, decoder_heads: int = 4,
                 mask_ratio: float = 0.75, norm_pix_loss: bool = True):
        super().__init__()
        if "image" not in cfg.modalities:
            raise InputError("the MAE objective needs an image encoder")
        self.backbone = Data2Vec2(cfg)
        self.cfg = cfg
        enc = self.backbone.encoder("image")
        self.patch = enc.mcfg.patch_size
        self.mask_ratio = mask_ratio
        self.norm_pix_loss = norm_pix_loss
        d, dd = cfg.embed_dim, decoder_dim
        self.decoder_embed = nn.Linear(d, dd)
        self.mask_token = nn.Parameter(torch.zeros(1, 1, dd))
        self.register_buffer("decoder_pos", sincos_2d(dd, enc.grid), persistent=True)
        self.decoder_blocks = nn.ModuleList(make_blocks(
            decoder_depth, dd, decoder_heads, cfg.mlp_ratio, cfg.norm_eps, 0.0, 0.0, 0.0, 0.0, [0.0] * decoder_depth))
        self.decoder_norm = nn.LayerNorm(dd, eps=cfg.norm_eps)
        self.decoder_pred = nn.Linear(dd, self.patch * self.patch * enc.mcfg.in_chans)
        for mod in (self.decoder_embed, self.decoder_blocks, self.decoder_norm, self.decoder_pred):
            mod.apply(_init_bert_params)
        nn.init.normal_(self.mask_token, std=0.02)

    def param_groups(self, weight_decay: float) -> list[dict]:
        return _student_param_groups(self, weight_decay)

    def update_teacher(self, num_updates: int) -> float:  # MAE has no teacher
        return 1.0

    def make_mask(self, batch_size: int, length: int, generator=None) -> torch.Tensor:
        return masking.random_mask(batch_size, length, self.mask_ratio, generator)

    def forward(self, source: torch.Tensor, modality: str = "image", mask: Optional[torch.Tensor] = None) -> BaselineOutput:
        if modality != "image":
            raise InputError("the MAE objective is image-only")
        bb = self.backbone
        enc = bb.encoder("image")
        enc.check_input(source)
        B, T = source.shape[0], enc.num_tokens(tuple(source.shape))
        if mask is None:
            mask = self.make_mask(B, T).to(source.device)
        mask, n_masked = bb._check_mask(mask, B, T)
        n_keep = T - n_masked
        order = torch.argsort(mask.to(torch.uint8), dim=1, stable=True)
        keep_idx = order[:, :n_keep]

        ctx = enc.contextualize(enc.local_features(source), 1, mask, keep_idx)
        x, _ = run_blocks(bb.blocks, ctx.x, ctx.bias, self.cfg.layerdrop)
        x = self.decoder_embed(x[:, enc.num_extra_tokens:])  # (B, K, dd), CLS dropped
        dd = x.shape[-1]
        packed = torch.cat([x, self.mask_token.to(x.dtype).expand(B, n_masked, -1)], dim=1)
        x = torch.empty_like(packed).scatter(1, order.unsqueeze(-1).expand(-1, -1, dd), packed)
        x, _ = run_blocks(self.decoder_blocks, x + self.decoder_pos.to(x.dtype))
        pred = self.decoder_pred(self.decoder_norm(x))  # (B, T, p*p*C)

        target = patchify(source, self.patch)
        if self.norm_pix_loss:
            mean, var = target.mean(-1, keepdim=True), target.var(-1, keepdim=True)
            target = (target - mean) / (var + 1e-6) ** 0.5
        per_patch = ((pred.float() - target) ** 2).mean(-1)  # (B, T)
        m = mask.float()
        loss = (per_patch * m).sum() / m.sum()
        return BaselineOutput(loss, pred, target, mask)


def objective(name: str, cfg: ModelConfig) -> nn.Module:
    """``data2vec2`` (the project's model) | ``data2vec1`` | ``mae``, all on the same encoder code."""
    if name == "data2vec2":
        return Data2Vec2(cfg)
    if name == "data2vec1":
        return Data2Vec1Style(cfg)
    if name == "mae":
        return MAE(cfg)
    raise InputError(f"unknown objective {name!r}; expected one of {', '.join(OBJECTIVES)}")


def backbone_of(model: nn.Module) -> Data2Vec2:
    """The ``Data2Vec2`` holding the shared encoder (for probes / feature extraction)."""
    return model if isinstance(model, Data2Vec2) else model.backbone  # type: ignore[return-value]
