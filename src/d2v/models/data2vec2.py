"""data2vec 2.0: one student, one EMA teacher, any subset of image / speech / text.

One training step for a batch of B samples of one modality (fairseq ``Data2VecMultiModel.forward``):

1. the student's modality encoder makes local features ``(B, T, D)``;
2. they are cloned M times (sample-major) and each clone drops its own masked tokens, so the
   shared blocks see only ``K`` visible tokens per row, ``(B*M, E+K, D)``;
3. the encoder output is scattered back to ``T`` positions with N(0, 0.01²) noise at the masked
   ones and the convolutional decoder predicts every position;
4. the teacher encodes the *unmasked* sample once (B rows) under ``no_grad``; the targets are the
   mean of its last K blocks' FFN outputs, instance-normalised per layer, repeated M times;
5. loss = Σ_d (pred − y)² · scale, averaged over masked tokens (+ the image CLS term).

``model(source, modality) -> Data2VecOutput(loss, pred, target, mask, ...)``;
``model.features(source, modality) -> Features(x, padding_mask, ...)``: the student encoder's
token features of unmasked input, the one feature path of fine-tuning, probes and ``d2v encode``.
"""

from __future__ import annotations

import copy
import math
from collections.abc import Callable
from dataclasses import dataclass, field

import torch
import torch.nn as nn
import torch.nn.functional as F

from d2v.errors import CollapseError  # defined there, so the CLI catches it without importing torch

from .blocks import make_blocks, run_blocks
from .config import MODALITIES, ModelConfig
from .ema import EMAUpdater, ema_decay_at
from .encoders import ENCODERS, InputError, ModalityEncoder


@dataclass
class Data2VecOutput:
    loss: torch.Tensor  # scalar: per-masked-token mean (what to backpropagate)
    pred: torch.Tensor  # (N_masked, D) student predictions at masked positions
    target: torch.Tensor  # (N_masked, D) teacher targets at the same positions (fp32)
    mask: torch.Tensor  # (B*M, T) bool, True = masked
    sample_size: torch.Tensor  # number of masked positions that enter the loss
    loss_sum: torch.Tensor  # fairseq's criterion loss (sum of all terms), = loss * sample_size
    loss_terms: dict[str, torch.Tensor] = field(default_factory=dict)  # summed, unnormalised terms
    target_var: torch.Tensor | None = None
    pred_var: torch.Tensor | None = None


@dataclass
class Features:
    """The student encoder's output for unmasked input (``Data2Vec2.features``)."""

    x: torch.Tensor  # (B, T, D) per-token output of the chosen block, extra (CLS) tokens dropped
    padding_mask: torch.Tensor | None  # (B, T) True = pad, on x's device; None when nothing is padded
    extra: torch.Tensor  # (B, E, D) the extra tokens' output (E = num_extra_tokens, may be 0)
    layer_results: list[torch.Tensor] = field(default_factory=list)  # every block's FFN output (all_layers=True)


def layer_index(layer: int, depth: int) -> int:
    """Block ``layer`` (0-based; negative counts from the end) as an index in ``0..depth-1``."""
    if not isinstance(layer, int) or not -depth <= layer < depth:
        raise InputError(f"layer {layer!r} out of range: the model has {depth} blocks (0..{depth - 1}, or -1..-{depth})")
    return layer % depth


def token_padding_mask(enc: ModalityEncoder, source: torch.Tensor,
                       padding_mask: torch.Tensor | None) -> torch.Tensor | None:
    """The key padding mask (True = pad) of ``source``'s tokens, or None when nothing is padded.

    ``padding_mask`` (B, tokens) is checked; when None it is derived from the source (text pads).
    Deciding "nothing is padded" needs a look at the values; that is free on the CPU, so it is
    only done there (pass a CPU padding mask from the loader to keep the GPU unsynced).
    """
    if padding_mask is None:
        padding_mask = enc.padding_from_source(source)
    if padding_mask is None:
        return None
    want = (source.shape[0], enc.num_tokens(tuple(source.shape)))
    if tuple(padding_mask.shape) != want:
        raise InputError(f"padding_mask must have shape (B, tokens) = {want}, got {tuple(padding_mask.shape)}")
    if padding_mask.device.type == "cpu":
        if not bool(padding_mask.any()):
            return None
        padding_mask = padding_mask.to(source.device, non_blocking=True)
    return padding_mask.bool()


def encoder_features(enc: ModalityEncoder, blocks: nn.ModuleList, source: torch.Tensor,
                     padding_mask: torch.Tensor | None = None, layer: int = -1, layerdrop: float = 0.0,
                     all_layers: bool = False, local_out: torch.Tensor | None = None,
                     local_mask: Callable[[torch.Tensor], torch.Tensor] | None = None) -> Features:
    """Unmasked ``source`` through ``enc`` (local + context encoder) and ``blocks[:layer + 1]``.

    The body of ``Data2Vec2.features``, for modules that hold a model's encoder and blocks without
    the rest (the fine-tuning heads). ``layerdrop`` applies in training mode only. ``local_out``:
    ``enc.local_encoder(source)`` computed earlier with the same weights (the online probe keeps the
    frozen speech CNN's output), so the local encoder is not run again. ``local_mask``: applied to
    the projected local features ``(B, T, D)`` before the positional encoder and the context
    encoder see them (fine-tuning-time time/channel masking, ``d2v.models.heads.FrameMasks``; the
    fairseq ``ModalitySpecificEncoder.contextualized_features`` path with ``mask=True,
    remove_masked=False``); None: unmasked, as everywhere else.
    """
    if not isinstance(source, torch.Tensor):
        raise InputError(f"source must be a torch.Tensor, got {type(source).__name__}")
    enc.check_input(source)
    li = layer_index(layer, len(blocks))
    local = enc.local_features(source) if local_out is None else enc.project_local(local_out)
    if local_mask is not None:
        local = local_mask(local)
    padding_mask = token_padding_mask(enc, source, padding_mask)
    ctx = enc.contextualize(local, padding_mask=padding_mask)
    run = blocks if li == len(blocks) - 1 else blocks[: li + 1]
    x, layers = run_blocks(run, ctx.x, ctx.bias, layerdrop, collect_from=0 if all_layers else None)
    e = enc.num_extra_tokens
    return Features(x[:, e:], padding_mask, x[:, :e], layers)


def _init_bert_params(module: nn.Module) -> None:
    if isinstance(module, nn.Linear):
        nn.init.normal_(module.weight, mean=0.0, std=0.02)
        if module.bias is not None:
            nn.init.zeros_(module.bias)
    elif isinstance(module, nn.Embedding):
        nn.init.normal_(module.weight, mean=0.0, std=0.02)
        if module.padding_idx is not None:
            module.weight.data[module.padding_idx].zero_()


def compute_var(y: torch.Tensor) -> torch.Tensor:
    """Mean over channels of the std across rows (fairseq ``compute_var``, single process)."""
    y = y.reshape(-1, y.shape[-1]).float()
    return torch.sqrt(y.var(dim=0) + 1e-6).mean()


class Data2Vec2(nn.Module):
    # Set by ``d2v.train.compile.compile_model``: a callable ``core(model, *args)`` that runs
    # ``_step`` compiled. Not part of the state: copies and pickles run eager (``__getstate__``).
    _compiled_core = None

    def __init__(self, cfg: ModelConfig):
        super().__init__()
        cfg.validate()
        self.cfg = cfg
        self.modality_encoders = nn.ModuleDict(
            {m: ENCODERS[m](cfg, getattr(cfg, m)) for m in cfg.modalities}
        )
        n = max(cfg.depth - 1, 1)
        dpr = [cfg.start_drop_path_rate + (cfg.end_drop_path_rate - cfg.start_drop_path_rate) * i / n for i in range(cfg.depth)]
        blocks = make_blocks(
            cfg.depth, cfg.embed_dim, cfg.num_heads, cfg.mlp_ratio, cfg.norm_eps,
            cfg.attention_dropout, cfg.encoder_dropout, cfg.activation_dropout, cfg.post_mlp_drop, dpr,
        )
        self.blocks = nn.ModuleList(blocks)
        self.dropout_input = nn.Dropout(cfg.dropout_input)

        self.apply(_init_bert_params)
        for enc in self.modality_encoders.values():
            enc.reset_parameters()

        self.teacher = self._make_teacher()
        # Number of the last update the teacher was moved at; saved with the model so that a
        # resumed run does not update twice.
        self.register_buffer("ema_updates", torch.zeros((), dtype=torch.long))
        self._ema: EMAUpdater | None = None
        # ``ema_updates`` mirrored on the host: reading the buffer every step would sync a GPU
        # with the host (None: read it once at the next update, after construction or a load).
        self._ema_count: int | None = None

    # ------------------------------------------------------------------ teacher
    def _make_teacher(self) -> nn.Module:
        """An exact copy of what the teacher holds per modality (fairseq ``Data2VecMultiModel.make_ema_teacher``), frozen."""
        teacher = nn.Module()
        teacher.blocks = copy.deepcopy(self.blocks)
        encs = nn.ModuleDict()
        for m, enc in self.modality_encoders.items():
            kind = enc.mcfg.teacher_encoder
            if kind == "none":
                continue
            t = copy.deepcopy(enc)
            t.decoder = None
            if kind == "no_local":
                t.local_encoder = None
                if hasattr(t, "project_features"):
                    t.project_features = None
            encs[m] = t
        teacher.modality_encoders = encs
        for p in teacher.parameters():
            p.requires_grad_(False)
        teacher.eval()
        return teacher

    def train(self, mode: bool = True) -> Data2Vec2:
        super().train(mode)
        self.teacher.eval()  # the teacher never uses dropout or layerdrop
        return self

    def __getstate__(self):
        state = super().__getstate__()
        state.pop("_compiled_core", None)  # a compiled function: neither copied nor pickled
        return state

    def _load_from_state_dict(self, state_dict, prefix, *args, **kwargs):
        self._ema_count = None  # ema_updates may change: re-read it at the next update
        super()._load_from_state_dict(state_dict, prefix, *args, **kwargs)

    def _apply(self, fn, *args, **kwargs):  # .to()/.cuda() may swap tensors: re-pair lazily
        self._ema = None
        return super()._apply(fn, *args, **kwargs)

    def ema_decay(self, num_updates: int) -> float:
        c = self.cfg
        return ema_decay_at(num_updates, c.ema_decay, c.ema_end_decay, c.ema_anneal_end_step)

    @torch.no_grad()
    def update_teacher(self, num_updates: int) -> float:
        """Move the teacher towards the student; call after each optimizer step.

        Skipped when ``num_updates`` did not increase (an overflow step, or the first call after
        a resume) and once the decay reaches 1.0 (frozen teacher). Returns the decay used.
        """
        decay = self.ema_decay(num_updates)
        done = self._ema_count
        if done is None:
            done = self._ema_count = int(self.ema_updates)
        if num_updates <= done or decay >= 1.0:
            self._ema_count = max(num_updates, done)
            self.ema_updates.fill_(self._ema_count)
            return decay
        if self._ema is None:
            self._ema = EMAUpdater(self.teacher, self)
        self._ema.step(decay)
        self.ema_updates.fill_(num_updates)
        self._ema_count = num_updates
        return decay

    # ------------------------------------------------------------------ helpers
    def encoder(self, modality: str) -> ModalityEncoder:
        if modality not in MODALITIES:
            raise InputError(f"unknown modality {modality!r}; expected one of {', '.join(MODALITIES)}")
        if modality not in self.modality_encoders:
            raise InputError(
                f"this model has no {modality!r} encoder; it was built for {', '.join(self.modality_encoders)}"
            )
        return self.modality_encoders[modality]  # type: ignore[return-value]

    def _modality(self, modality: str | None) -> str:
        if modality is None:
            if len(self.modality_encoders) != 1:
                raise InputError(f"modality is required: this model has {', '.join(self.modality_encoders)}")
            modality = next(iter(self.modality_encoders))
        return modality

    def make_mask(self, modality: str, batch_size: int, length: int, device=None, generator=None) -> torch.Tensor:
        """Draw ``batch_size * clone_batch`` masks (sample-major), True = masked."""
        return self.encoder(modality).make_mask(batch_size * self.cfg.clone_batch, length, device, generator)

    def _check_mask(self, mask: torch.Tensor, rows: int, length: int) -> tuple[torch.Tensor, int]:
        if mask.ndim != 2 or tuple(mask.shape) != (rows, length):
            raise InputError(
                f"mask must have shape (B*clone_batch, T) = ({rows}, {length}), got {tuple(mask.shape)}"
            )
        if mask.dtype != torch.bool:
            if not bool(((mask == 0) | (mask == 1)).all()):
                raise InputError("a mask must hold only 0 and 1 (1 = masked)")
            mask = mask.bool()
        counts = mask.sum(1)
        n_masked = int(counts[0])
        if not bool((counts == n_masked).all()):
            raise InputError(
                f"every mask row must mask the same number of tokens; got counts from "
                f"{int(counts.min())} to {int(counts.max())}"
            )
        if n_masked >= length:
            raise InputError(f"the mask leaves no visible token ({n_masked} of {length} masked)")
        if n_masked == 0:
            raise InputError("the mask masks nothing: there is nothing to predict")
        return mask, n_masked

    # ------------------------------------------------------------------ targets
    @torch.no_grad()
    def make_targets(self, modality: str, source: torch.Tensor, local: torch.Tensor,
                     padding_mask: torch.Tensor | None) -> torch.Tensor:
        """Teacher targets ``(B, T, D)`` in fp32 from the unmasked sample (fairseq ``Data2VecMultiModel.make_targets``)."""
        enc = self.encoder(modality)
        kind = enc.mcfg.teacher_encoder
        if kind == "full":
            tenc = self.teacher.modality_encoders[modality]
            ctx = tenc.contextualize(tenc.local_features(source), padding_mask=padding_mask)
        elif kind == "no_local":
            ctx = self.teacher.modality_encoders[modality].contextualize(local.detach(), padding_mask=padding_mask)
        else:
            ctx = enc.contextualize(local.detach(), padding_mask=padding_mask)
        k = self.cfg.average_top_k_layers
        _, ffn = run_blocks(self.teacher.blocks, ctx.x, ctx.bias, collect_from=self.cfg.depth - k)
        e = enc.num_extra_tokens
        return self._normalise_targets([t[:, e:] for t in ffn])

    def _normalise_targets(self, layers: list[torch.Tensor]) -> torch.Tensor:
        c = self.cfg
        ys = []
        for t in layers:
            t = t.float()
            if c.instance_norm_target_layer:
                t = F.instance_norm(t.transpose(1, 2)).transpose(1, 2)
            elif c.layer_norm_target_layer:
                t = F.layer_norm(t, t.shape[-1:])
            ys.append(t)
        y = ys[0].clone()
        for t in ys[1:]:
            y.add_(t)
        y = y.div_(len(ys))
        if c.layer_norm_targets:
            y = F.layer_norm(y, y.shape[-1:])
        if c.instance_norm_targets:
            y = F.instance_norm(y.transpose(1, 2)).transpose(1, 2)
        return y

    def _regression(self, pred: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        c = self.cfg
        pred = pred.float()
        if c.loss_beta == 0:
            loss = F.mse_loss(pred, y, reduction="none")
        else:
            loss = F.smooth_l1_loss(pred, y, reduction="none", beta=c.loss_beta)
        scale = c.loss_scale if c.loss_scale is not None else 1 / math.sqrt(pred.shape[-1])
        return loss * scale

    # ------------------------------------------------------------------ forward
    def forward(
        self,
        source: torch.Tensor,
        modality: str | None = None,
        mask: torch.Tensor | None = None,
        padding_mask: torch.Tensor | None = None,
        mask_noise: torch.Tensor | None = None,
    ) -> Data2VecOutput:
        """One pretraining forward.

        ``mask``: optional ``(B*M, T)`` (True/1 = masked, rows sample-major, same count per row);
        drawn here when None. ``mask_noise``: optional ``(B*M, T-K, D)`` values for the decoder's
        masked positions (default N(0, mask_noise_std²)), for exact comparisons.

        Two parts: :meth:`_prelude` (eager: input checks, the mask, anything that reads values on
        the host) and :meth:`_step` (tensor work only: local features, student, decoder, teacher
        targets, loss, variances), which ``train.compile`` compiles as one graph
        (:mod:`d2v.train.compile`).
        """
        modality, mask, n_masked, padding_mask = self._prelude(source, modality, mask, padding_mask, mask_noise)
        core = self._compiled_core
        keep = None  # eager: layerdrop is drawn inside the student's run_blocks, as always
        if core is not None:
            keep = self._layerdrop_keep()
            if (keep is not None and not all(keep)) or not self._compilable(modality):
                core = None  # this step skips a block (or uses prenet layerdrop): eager, see d2v.train.compile
        if core is None:
            res = self._step(modality, source, mask, n_masked, padding_mask, mask_noise, keep)
        else:
            res = core(self, modality, source, mask, n_masked, padding_mask, mask_noise, keep)
        loss, pred, target, sample_size, loss_sum, terms, target_var, pred_var = res
        return Data2VecOutput(
            loss=loss, pred=pred, target=target, mask=mask, sample_size=sample_size,
            loss_sum=loss_sum, loss_terms=terms, target_var=target_var, pred_var=pred_var,
        )

    def _prelude(
        self,
        source: torch.Tensor,
        modality: str | None,
        mask: torch.Tensor | None,
        padding_mask: torch.Tensor | None,
        mask_noise: torch.Tensor | None,
    ) -> tuple[str, torch.Tensor, int, torch.Tensor | None]:
        """The eager part of :meth:`forward`: checks, the token padding mask, the mask and its count.

        Everything that needs a value on the host (``int()``, ``.any()``, a Python branch on data)
        is here, so that :meth:`_step` has none. Returns ``(modality, mask, n_masked, padding_mask)``
        with ``mask`` a bool tensor on ``source``'s device.
        """
        modality = self._modality(modality)
        enc = self.encoder(modality)
        if not isinstance(source, torch.Tensor):
            raise InputError(f"source must be a torch.Tensor, got {type(source).__name__}")
        enc.check_input(source)
        B = source.shape[0]
        if B == 0:
            raise InputError("empty batch")
        M = self.cfg.clone_batch
        d = self.cfg.embed_dim

        T = enc.num_tokens(tuple(source.shape))
        padding_mask = token_padding_mask(enc, source, padding_mask)
        if mask is None:
            n_masked = enc.num_masked(T)
            if not 1 <= n_masked < T:
                raise InputError(
                    f"{modality} input of {T} tokens is too short to mask with mask_prob="
                    f"{enc.mcfg.mask_prob}: it gives {n_masked} masked; need 1..{T - 1}"
                )
            mask = enc.make_mask(B * M, T, source.device)
        else:
            # Checked where it was made (the loader's CPU: no device sync), then moved.
            mask, n_masked = self._check_mask(mask, B * M, T)
            mask = mask.to(source.device, non_blocking=True)
        if mask_noise is not None and tuple(mask_noise.shape) != (B * M, n_masked, d):
            raise InputError(f"mask_noise must have shape {(B * M, n_masked, d)}, got {tuple(mask_noise.shape)}")
        return modality, mask, n_masked, padding_mask

    def _layerdrop_keep(self) -> tuple[bool, ...] | None:
        """The student blocks' layerdrop decisions for one step (as ``run_blocks`` draws them), or
        None when layerdrop does not apply (0, or eval mode). For the compiled step only: drawn
        before the step, they are Python constants to the graph instead of a ``.tolist()`` in it."""
        p = self.cfg.layerdrop
        if p > 0 and len(self.blocks) and self.blocks[0].training:
            return tuple(bool(k) for k in (torch.rand(len(self.blocks)) > p).tolist())
        return None

    def _compilable(self, modality: str) -> bool:
        """False when the step of ``modality`` would draw layerdrop inside the graph (prenet layerdrop
        in training mode; no released config uses it with prenet blocks)."""
        ctx_enc = self.modality_encoders[modality].context_encoder
        return not (ctx_enc.layerdrop > 0 and len(ctx_enc.blocks) and ctx_enc.training)

    def _step(
        self,
        modality: str,
        source: torch.Tensor,
        mask: torch.Tensor,
        n_masked: int,
        padding_mask: torch.Tensor | None,
        mask_noise: torch.Tensor | None,
        keep: tuple[bool, ...] | None = None,
    ) -> tuple:
        """The tensor work of :meth:`forward` on checked inputs (see :meth:`_prelude`): no host reads,
        no branch on data, so ``torch.compile`` traces it as one graph (shapes are static: every
        mask row masks ``n_masked`` tokens). ``keep``: the student blocks' layerdrop decisions
        (None: drawn here when layerdrop applies, the eager behaviour).

        Returns ``(loss, pred, target, sample_size, loss_sum, loss_terms, target_var, pred_var)``.
        """
        enc = self.modality_encoders[modality]
        B = source.shape[0]
        M = self.cfg.clone_batch
        d = self.cfg.embed_dim
        T = mask.shape[1]

        local = enc.local_features(source)  # (B, T, D)
        n_keep = T - n_masked
        # Stable sort puts kept positions first, each group in ascending order.
        order = torch.argsort(mask.to(torch.uint8), dim=1, stable=True)
        keep_idx, masked_idx = order[:, :n_keep], order[:, n_keep:]

        # ---- student: visible tokens only
        ctx = enc.contextualize(local, M, mask, keep_idx, padding_mask)
        x = self.dropout_input(ctx.x)
        if keep is None:
            x, _ = run_blocks(self.blocks, x, ctx.bias, self.cfg.layerdrop)
        else:  # decisions drawn before the step (compiled); the same draw run_blocks makes
            x, _ = run_blocks([b for b, k in zip(self.blocks, keep) if k], x, ctx.bias)

        # ---- decoder on the full length: encoder output back in place, noise at masked tokens
        e = enc.num_extra_tokens
        visible = F.dropout(x[:, e:], enc.mcfg.decoder.input_dropout, self.training)
        if mask_noise is None:
            std = enc.mcfg.mask_noise_std
            mask_noise = visible.new_empty(B * M, n_masked, d)
            mask_noise = mask_noise.normal_(0, std) if std > 0 else mask_noise.zero_()
        packed = torch.cat([visible, mask_noise.to(visible.dtype)], dim=1)
        dec_in = torch.empty_like(packed).scatter(1, order.unsqueeze(-1).expand(-1, -1, d), packed)
        dec_out = enc.decoder(dec_in)

        # ---- teacher targets, once per original sample
        y = self.make_targets(modality, source, local, padding_mask)  # (B, T, D) fp32

        # ---- loss at masked positions (pads, if any, are not regressed)
        gather = masked_idx.unsqueeze(-1).expand(-1, -1, d)
        pred = dec_out.gather(1, gather).reshape(-1, d)
        target = y.repeat_interleave(M, 0).gather(1, gather).reshape(-1, d)
        reg = self._regression(pred, target).sum(-1)
        if padding_mask is not None:
            weight = (~padding_mask.repeat_interleave(M, 0).gather(1, masked_idx)).reshape(-1).float()
            reg = reg * weight
            sample_size = weight.sum()  # a batch of pure padding gives 0: the loss is then 0
        else:
            sample_size = pred.new_full((), float(pred.shape[0]), dtype=torch.float32)  # a fill, not a host copy
        terms = {"regression": reg.sum()}
        loss_sum = terms["regression"]
        if self.cfg.cls_loss > 0 and e > 0:
            cls_pred = x[:, 0]
            cls_target = y.mean(dim=1).repeat_interleave(M, 0)
            # fairseq multiplies by sample_size so that, after the trainer divides by it, the term
            # is 0.01 x the sum over the B*M instances (fairseq ``Data2VecMultiModel.forward``, ``cls_loss``).
            terms["cls"] = self._regression(cls_pred, cls_target).sum() * (self.cfg.cls_loss * sample_size)
            loss_sum = loss_sum + terms["cls"]
        loss = loss_sum / sample_size.clamp_min(1)

        with torch.no_grad():
            target_var = compute_var(target)
            pred_var = compute_var(pred.detach())
        return loss, pred, target, sample_size, loss_sum, terms, target_var, pred_var

    # ------------------------------------------------------------------ guard & features
    def check_collapse(self, out: Data2VecOutput, step: int) -> None:
        """Collapse guard (fairseq ``Data2VecMultiModel.forward``: ``min_target_var`` / ``min_pred_var``) and NaN/Inf
        guard; raises ``CollapseError`` with the cause."""
        if not bool(torch.isfinite(out.loss)):
            raise CollapseError(f"step {step}: loss is {float(out.loss)} (not finite)")
        tv, pv = float(out.target_var), float(out.pred_var)
        for name, v in (("target variance", tv), ("prediction variance", pv)):
            if not math.isfinite(v):
                raise CollapseError(f"step {step}: {name} is {v} (not finite)")
        if step < self.cfg.collapse_check_after:
            return
        if tv < self.cfg.min_target_var:
            raise CollapseError(
                f"step {step}: target variance {tv:.4g} < min_target_var={self.cfg.min_target_var} (teacher collapsed)"
            )
        if pv < self.cfg.min_pred_var:
            raise CollapseError(
                f"step {step}: prediction variance {pv:.4g} < min_pred_var={self.cfg.min_pred_var} (student collapsed)"
            )

    def features(self, source: torch.Tensor, modality: str | None = None, padding_mask: torch.Tensor | None = None,
                 layer: int = -1, all_layers: bool = False, local_out: torch.Tensor | None = None) -> Features:
        """The student encoder's token features of unmasked ``source``: no mask, no decoder, no teacher.

        ``padding_mask``: optional (B, tokens), True = pad (text: derived from the pad id when None).
        ``layer``: the block whose output is ``x`` (0-based; negative counts from the end; -1 = the
        final output). ``all_layers``: also return every block's FFN output (``layer_results``).
        ``local_out``: this modality's ``local_encoder(source)``, when the caller kept it (see ``encoder_features``).
        Gradients flow (wrap in ``torch.no_grad()`` for inference); layerdrop applies in training
        mode, as in ``forward``.
        """
        enc = self.encoder(self._modality(modality))
        return encoder_features(enc, self.blocks, source, padding_mask, layer, self.cfg.layerdrop, all_layers, local_out)

    @torch.no_grad()
    def extract_features(
        self,
        source: torch.Tensor,
        modality: str | None = None,
        padding_mask: torch.Tensor | None = None,
        remove_extra_tokens: bool = True,
    ) -> dict[str, object]:
        """fairseq's ``extract_features(mask=False)``: ``x`` (B, T, D), every block's FFN output
        (``layer_results``) and the padding mask (see ``features``)."""
        enc = self.encoder(self._modality(modality))
        f = encoder_features(enc, self.blocks, source, padding_mask, all_layers=True)  # no layerdrop, as before
        x = f.x if remove_extra_tokens else torch.cat([f.extra, f.x], dim=1)
        return {"x": x, "layer_results": f.layer_results, "padding_mask": f.padding_mask}

    # ------------------------------------------------------------------ optimiser groups
    def param_groups(self, weight_decay: float) -> list[dict]:
        """Student parameters split into decayed and non-decayed groups (fairseq's ``optim_overrides``: no decay for 1-D parameters).

        No decay for 1-D tensors, biases and the ALiBi scale. The teacher is never included.
        """
        decay, no_decay = [], []
        for name, p in self.named_parameters():
            if not p.requires_grad or name.startswith("teacher."):
                continue
            if p.ndim <= 1 or name.endswith(".bias") or "alibi_scale" in name:
                no_decay.append(p)
            else:
                decay.append(p)
        return [
            {"params": decay, "weight_decay": weight_decay},
            {"params": no_decay, "weight_decay": 0.0},
        ]

    def num_parameters(self, modality: str | None = None, encoder_only: bool = True) -> int:
        """Trainable student parameters of one modality's encoder path (blocks included)."""
        seen = set()
        total = 0
        mods = [modality] if modality else list(self.modality_encoders)
        for name, p in self.named_parameters():
            if name.startswith("teacher.") or id(p) in seen:
                continue
            if name.startswith("modality_encoders."):
                m = name.split(".")[1]
                if m not in mods or (encoder_only and ".decoder." in name):
                    continue
            seen.add(id(p))
            total += p.numel()
        return total
