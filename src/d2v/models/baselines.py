"""Baseline objectives over the *same* encoder code as data2vec 2.0, for the efficiency benchmarks.

* ``Data2Vec1Style``: a data2vec 1.0-style step. Each of the M masked copies of a sample goes
  through the encoder at full length, masked positions replaced by a learned mask embedding (no
  token dropping); the teacher runs once *per copy* (M teacher passes for M copies), and a linear
  head regresses the same targets (mean of the top-K FFN outputs, instance-normalised) at the
  masked positions. No convolutional decoder.
* ``MAE``: visible tokens only through the shared image encoder and blocks, a small transformer
  decoder (mask tokens + fixed 2-D sin-cos positions) reconstructing per-patch normalised pixels;
  the loss is the per-patch MSE averaged over masked patches only.
* ``BERTStyle``: RoBERTa's masked-LM objective on the shared text encoder. 15% of the real tokens
  of each sequence are chosen (80% -> mask id, 10% -> a random ordinary token, 10% unchanged), the
  *full* corrupted sequence goes through the text encoder and the blocks (the same full-length path
  as ``Data2Vec1Style``), and an LM head (dense, GELU, LayerNorm, output projection tied to the
  token embedding, plus a bias) predicts the original ids at the chosen positions (cross-entropy).
  No teacher: the backbone's EMA teacher is never run nor moved.

All wrap a ``Data2Vec2`` backbone (its modality encoders, blocks and EMA teacher) and leave its
numerics untouched; ``objective(...)`` builds any of ``data2vec2 | data2vec1 | mae | bert``.
Each ``forward`` returns an object with ``.loss`` (what to backpropagate).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn as nn
import torch.nn.functional as F

from d2v.tokens import BOS, EOS, PAD, UNK

from . import masking
from .blocks import make_blocks, run_blocks
from .config import OBJECTIVES, ModelConfig
from .data2vec2 import Data2Vec2, _init_bert_params, token_padding_mask
from .encoders import InputError, sincos_2d


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


class _Baseline(nn.Module):
    backbone: Data2Vec2

    def encoder(self, modality: str):
        """The backbone's modality encoder (the training loop checks a batch with it)."""
        return self.backbone.encoder(modality)


class Data2Vec1Style(_Baseline):
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

    def forward(self, source: torch.Tensor, modality: str, mask: torch.Tensor | None = None,
                padding_mask: torch.Tensor | None = None) -> BaselineOutput:
        bb = self.backbone
        enc = bb.encoder(modality)
        enc.check_input(source)
        B, M, d = source.shape[0], self.cfg.clone_batch, self.cfg.embed_dim
        T = enc.num_tokens(tuple(source.shape))
        padding_mask = token_padding_mask(enc, source, padding_mask)
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
        for _ in range(M):
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


class MAE(_Baseline):
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

    def forward(self, source: torch.Tensor, modality: str = "image", mask: torch.Tensor | None = None) -> BaselineOutput:
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


class BERTStyle(_Baseline):
    """RoBERTa-style masked-token prediction on the shared text encoder (see module docstring).

    Mask id: the project's sentencepiece vocabulary (``d2v.tokens``) has only ``<s>`` = 0,
    ``<pad>`` = 1, ``</s>`` = 2 and ``<unk>`` = 3 as specials and no ``<mask>`` (every other id is a
    real piece, ``vocab_size`` is the tokenizer's). So ``<unk>`` stands in for ``<mask>`` by default:
    the tokenizer is trained with full character coverage on the same training text, so ``<unk>``
    practically never occurs in the data and is free to mean "masked" (pass ``mask_idx`` to choose
    another id, e.g. one reserved past the tokenizer's vocabulary).

    Chosen positions: per sequence, ``round_random(mask_prob * n_real)`` (at least 1) of its real
    tokens, uniformly without replacement (fairseq ``MaskTokensDataset``); real = not ``<pad>``,
    ``<s>`` or ``</s>``. Random replacements are drawn uniformly from the ordinary ids
    ``[4, vocab_size)`` (fairseq gives the specials zero weight), so no corruption makes a pad.
    """

    def __init__(self, cfg: ModelConfig, mask_prob: float = 0.15, leave_unmasked_prob: float = 0.1,
                 random_token_prob: float = 0.1, mask_idx: int = UNK):
        super().__init__()
        if "text" not in cfg.modalities:
            raise InputError("the BERT-style objective needs a text encoder")
        if not 0 < mask_prob < 1 or leave_unmasked_prob < 0 or random_token_prob < 0 \
                or leave_unmasked_prob + random_token_prob > 1:
            raise InputError("BERTStyle: need 0 < mask_prob < 1 and leave_unmasked + random_token <= 1")
        self.backbone = Data2Vec2(cfg)
        self.cfg = cfg
        enc = self.backbone.encoder("text")
        self.vocab_size = enc.mcfg.vocab_size
        self.pad_idx = enc.mcfg.pad_idx
        self.specials = sorted({BOS, PAD, EOS, self.pad_idx})
        self.first_ordinary = max(self.specials + [UNK]) + 1
        if not 0 <= mask_idx < self.vocab_size or mask_idx == self.pad_idx:
            raise InputError(f"mask_idx {mask_idx} must be a non-pad id in [0, {self.vocab_size})")
        if self.first_ordinary >= self.vocab_size:
            raise InputError(f"vocab_size {self.vocab_size} leaves no ordinary token to predict")
        self.mask_idx = mask_idx
        self.mask_prob, self.leave_unmasked_prob, self.random_token_prob = mask_prob, leave_unmasked_prob, random_token_prob
        d = cfg.embed_dim
        # RoBERTa's LM head: dense -> GELU -> LayerNorm -> tied output projection + bias
        self.lm_dense = nn.Linear(d, d)
        self.lm_norm = nn.LayerNorm(d, eps=cfg.norm_eps)
        self.lm_bias = nn.Parameter(torch.zeros(self.vocab_size))
        self.lm_dense.apply(_init_bert_params)

    @property
    def embed_tokens(self) -> nn.Embedding:
        return self.backbone.encoder("text").local_encoder.embed_tokens

    def param_groups(self, weight_decay: float) -> list[dict]:
        return _student_param_groups(self, weight_decay)

    def update_teacher(self, num_updates: int) -> float:  # no teacher: nothing to move
        return 1.0

    def real_tokens(self, source: torch.Tensor) -> torch.Tensor:
        """True where a token may be chosen (not pad, <s> or </s>)."""
        real = torch.ones_like(source, dtype=torch.bool)
        for i in self.specials:
            real &= source.ne(i)
        return real

    def select(self, source: torch.Tensor, generator: torch.Generator | None = None) -> torch.Tensor:
        """(B, T) bool: the positions to predict, ~``mask_prob`` of each row's real tokens."""
        real = self.real_tokens(source)
        n_real = real.sum(1)
        u = torch.rand(source.shape[0], generator=generator, device=generator.device if generator else None)
        k = torch.floor(self.mask_prob * n_real.float() + u.to(source.device)).long()
        k = torch.minimum(k.clamp_min(1), n_real)
        score = torch.rand(source.shape, generator=generator, device=generator.device if generator else None)
        score = score.to(source.device).masked_fill(~real, 2.0)  # non-real positions sort last
        rank = score.argsort(1).argsort(1)
        return rank < k.unsqueeze(1)

    def corrupt(self, source: torch.Tensor, chosen: torch.Tensor,
                generator: torch.Generator | None = None) -> torch.Tensor:
        """The input ids: chosen positions become mask (80%) / random (10%) / themselves (10%)."""
        dev = generator.device if generator else None
        u = torch.rand(source.shape, generator=generator, device=dev).to(source.device)
        rnd = torch.randint(self.first_ordinary, self.vocab_size, source.shape, generator=generator,
                            device=dev).to(source.device, source.dtype)
        p_rand = self.random_token_prob
        p_keep = self.leave_unmasked_prob
        to_mask = chosen & (u < 1 - p_rand - p_keep)
        to_rand = chosen & (u >= 1 - p_rand - p_keep) & (u < 1 - p_keep)
        x = torch.where(to_mask, torch.full_like(source, self.mask_idx), source)
        return torch.where(to_rand, rnd, x)

    def lm_head(self, h: torch.Tensor) -> torch.Tensor:
        h = self.lm_norm(F.gelu(self.lm_dense(h)))
        return F.linear(h, self.embed_tokens.weight, self.lm_bias)

    def forward(self, source: torch.Tensor, modality: str = "text", mask: torch.Tensor | None = None,
                padding_mask: torch.Tensor | None = None,
                generator: torch.Generator | None = None) -> BaselineOutput:
        """``mask``: optional (B, T) bool of the positions to predict (default: ``select``); the
        80/10/10 corruption is drawn here from ``generator``. ``pred``: (N, vocab) logits and
        ``target``: (N,) original ids, N = chosen positions in row-major order."""
        if modality != "text":
            raise InputError("the BERT-style objective is text-only")
        bb = self.backbone
        enc = bb.encoder("text")
        enc.check_input(source)
        if mask is None:
            mask = self.select(source, generator)
        else:
            if tuple(mask.shape) != tuple(source.shape):
                raise InputError(f"mask must have the shape of the ids {tuple(source.shape)}, got {tuple(mask.shape)}")
            mask = mask.to(source.device).bool()
            if bool((mask & ~self.real_tokens(source)).any()):
                raise InputError("the mask chooses <pad>, <s> or </s> positions; choose real tokens only")
        inputs = self.corrupt(source, mask, generator)
        # ---- the full corrupted sequence through the shared path (as Data2Vec1Style's student); the
        # corruption neither makes nor removes a pad, so the inputs' padding is the source's
        h = bb.features(inputs, "text", padding_mask).x
        pred = self.lm_head(h[mask])  # only the chosen positions (fairseq's masked_tokens)
        target = source[mask]
        if target.numel():
            loss = F.cross_entropy(pred.float(), target.long())
        else:  # nothing to predict (e.g. a batch of padding): a zero that keeps the graph
            loss = pred.sum() * 0.0
        return BaselineOutput(loss, pred, target, mask)


def objective(name: str, cfg: ModelConfig) -> nn.Module:
    """``data2vec2`` (the project's model) | ``data2vec1`` | ``mae`` | ``bert``, all on the same encoder code."""
    if name == "data2vec2":
        return Data2Vec2(cfg)
    if name == "data2vec1":
        return Data2Vec1Style(cfg)
    if name == "mae":
        return MAE(cfg)
    if name == "bert":
        return BERTStyle(cfg)
    raise InputError(f"unknown objective {name!r}; expected one of {', '.join(OBJECTIVES)}")


def backbone_of(model: nn.Module) -> Data2Vec2:
    """The ``Data2Vec2`` holding the shared encoder (for probes / feature extraction)."""
    return model if isinstance(model, Data2Vec2) else model.backbone  # type: ignore[return-value]
