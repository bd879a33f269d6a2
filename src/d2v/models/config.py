"""Typed configuration of the data2vec 2.0 model.

Field names follow fairseq's ``Data2VecMultiConfig`` where one exists, so that the released
configs (fairseq ``examples/data2vec/config/v2/*.yaml``) can be written down one to one. Every config is validated by
``validate()`` so that a malformed value fails with a message naming the field, before any
tensor is built.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from d2v.errors import ConfigError

MODALITIES = ("image", "speech", "text")
# Pretraining objectives over the same encoder code (d2v.models.baselines): MAE is image-only, BERT text-only.
OBJECTIVES = ("data2vec2", "data2vec1", "mae", "bert")


def need(cond: bool, name: str, msg: str) -> None:
    """Raise ``ConfigError("<name>: <msg>")`` unless ``cond``: every ``validate()`` names the full key."""
    if not cond:
        raise ConfigError(f"{name}: {msg}")


@dataclass
class DecoderConfig:
    """The light convolutional decoder (fairseq ``Decoder1d``/``Decoder2d``). Defaults are fairseq's ``D2vDecoderConfig``."""

    decoder_dim: int = 384
    decoder_groups: int = 16
    decoder_kernel: int = 5
    decoder_layers: int = 5
    input_dropout: float = 0.1
    decoder_residual: bool = True
    projection_layers: int = 1
    projection_ratio: float = 2.0

    def validate(self, key: str, embed_dim: int) -> DecoderConfig:
        """``key``: the section's full name (``model.<modality>.decoder``)."""
        need(self.decoder_layers >= 1, f"{key}.decoder_layers", "must be >= 1")
        need(self.decoder_dim >= 1 and self.decoder_kernel >= 1, f"{key}.decoder_dim", "decoder_dim and decoder_kernel must be >= 1")
        need(self.decoder_groups >= 1, f"{key}.decoder_groups", f"must be >= 1, got {self.decoder_groups}")
        need(self.decoder_dim % self.decoder_groups == 0 and embed_dim % self.decoder_groups == 0, f"{key}.decoder_groups",
             f"decoder_dim={self.decoder_dim} and embed_dim={embed_dim} must be divisible by groups={self.decoder_groups}")
        return self


@dataclass
class ModalityConfig:
    """What every modality encoder shares: prenet, masking, decoder, teacher contents."""

    prenet_depth: int = 0
    prenet_dropout: float = 0.0
    prenet_layerdrop: float = 0.0
    num_extra_tokens: int = 0
    # Masking: 1 = masked. ``inverse_mask`` means the blocks mark the *kept* tokens (images).
    mask_prob: float = 0.5
    mask_prob_adjust: float = 0.0
    mask_length: int = 1
    inverse_mask: bool = False
    mask_noise_std: float = 0.01
    encoder_zero_mask: bool = True
    # Gradient scale for the local encoder (patch embed / speech CNN / token embedding) in
    # pretraining, fairseq's ``local_grad_mult``: 1 trains it normally, 0 keeps it at its
    # initialisation (no backward through it), in between scales its gradient. The speech
    # projection (LN + Linear after the CNN) always trains, as in fairseq.
    local_grad_mult: float = 1.0
    decoder: DecoderConfig = field(default_factory=DecoderConfig)
    # What the EMA teacher holds for this modality (fairseq ``Data2VecMultiModel.make_ema_teacher``):
    #   "full"     - its own copy of the whole modality encoder, fed the raw input (images)
    #   "no_local" - everything but the local encoder, fed the student's local features (speech)
    #   "none"     - nothing: the student's contextualized features feed the teacher blocks (text)
    teacher_encoder: str = "full"

    def validate(self, key: str, embed_dim: int) -> ModalityConfig:
        """``key``: the section's full name (``model.<modality>``); ``embed_dim``: the blocks' width."""
        need(0.0 < self.mask_prob < 1.0, f"{key}.mask_prob", f"must be in (0, 1), got {self.mask_prob}")
        need(self.mask_length >= 1, f"{key}.mask_length", f"must be >= 1, got {self.mask_length}")
        need(self.teacher_encoder in ("full", "no_local", "none"), f"{key}.teacher_encoder",
             f"must be one of full/no_local/none, got {self.teacher_encoder!r}")
        need(isinstance(self.local_grad_mult, (int, float)) and self.local_grad_mult >= 0, f"{key}.local_grad_mult",
             f"must be a number >= 0, got {self.local_grad_mult!r}")
        self.decoder.validate(f"{key}.decoder", embed_dim)
        return self


@dataclass
class ImageConfig(ModalityConfig):
    input_size: int = 224
    in_chans: int = 3
    patch_size: int = 16
    num_extra_tokens: int = 1
    prenet_depth: int = 2
    mask_prob: float = 0.8
    mask_prob_adjust: float = 0.07
    mask_length: int = 3
    inverse_mask: bool = True
    teacher_encoder: str = "full"
    decoder: DecoderConfig = field(
        default_factory=lambda: DecoderConfig(
            decoder_dim=768, decoder_groups=16, decoder_kernel=3, decoder_layers=6, input_dropout=0.0
        )
    )

    def validate(self, key: str, embed_dim: int) -> ImageConfig:
        super().validate(key, embed_dim)
        need(self.patch_size >= 1 and self.input_size >= 1, f"{key}.patch_size", "patch_size and input_size must be >= 1")
        need(self.in_chans >= 1, f"{key}.in_chans", f"must be >= 1, got {self.in_chans}")
        need(self.input_size % self.patch_size == 0, f"{key}.input_size",
             f"input_size={self.input_size} is not a multiple of patch_size={self.patch_size}")
        need(embed_dim % 4 == 0, "model.embed_dim", "2-D sin-cos positions need embed_dim divisible by 4")
        need(self.mask_length >= 2, f"{key}.mask_length", f"block masking needs mask_length >= 2, got {self.mask_length}")
        n = (self.input_size // self.patch_size) ** 2
        kept = int(n * (1 - self.mask_prob)) if self.inverse_mask else n - int(n * self.mask_prob)
        need(1 <= kept < n, f"{key}.mask_prob", f"mask_prob={self.mask_prob} keeps {kept} of {n} patches; need 1..{n - 1}")
        return self


@dataclass
class SpeechConfig(ModalityConfig):
    # wav2vec 2.0 conv feature extractor: (channels, kernel, stride) per layer; total stride 320.
    feature_encoder_spec: str = "[(512, 10, 5)] + [(512, 3, 2)] * 4 + [(512, 2, 2)] * 2"
    conv_pos_width: int = 95
    conv_pos_groups: int = 16
    conv_pos_depth: int = 5
    prenet_dropout: float = 0.1
    prenet_layerdrop: float = 0.05
    mask_prob: float = 0.5
    mask_prob_adjust: float = 0.05
    mask_length: int = 5
    use_alibi: bool = True
    learned_alibi_scale: bool = True
    teacher_encoder: str = "no_local"
    sample_rate: int = 16000
    decoder: DecoderConfig = field(
        default_factory=lambda: DecoderConfig(
            decoder_dim=384, decoder_groups=16, decoder_kernel=7, decoder_layers=4, input_dropout=0.1
        )
    )

    def validate(self, key: str, embed_dim: int) -> SpeechConfig:
        super().validate(key, embed_dim)
        try:
            spec = parse_conv_spec(self.feature_encoder_spec)
        except Exception as e:  # noqa: BLE001 - re-raised with the field name
            raise ConfigError(f"{key}.feature_encoder_spec: cannot parse {self.feature_encoder_spec!r}: {e}") from e
        need(len(spec) > 0, f"{key}.feature_encoder_spec", "needs at least one conv layer")
        need(all(c >= 1 and k >= 1 and st >= 1 for c, k, st in spec), f"{key}.feature_encoder_spec",
             "channels, kernels and strides must be >= 1")
        need(self.conv_pos_groups >= 1 and self.conv_pos_depth >= 1, f"{key}.conv_pos_groups",
             "conv_pos_groups and conv_pos_depth must be >= 1")
        need(embed_dim % self.conv_pos_groups == 0, f"{key}.conv_pos_groups",
             f"embed_dim={embed_dim} is not divisible by conv_pos_groups={self.conv_pos_groups}")
        return self


@dataclass
class TextConfig(ModalityConfig):
    vocab_size: int = 50265
    pad_idx: int = 1
    max_source_positions: int = 512
    dropout: float = 0.1
    mask_prob: float = 0.48
    mask_length: int = 1
    teacher_encoder: str = "none"
    decoder: DecoderConfig = field(
        default_factory=lambda: DecoderConfig(
            decoder_dim=768,
            decoder_groups=1,
            decoder_kernel=9,
            decoder_layers=5,
            input_dropout=0.1,
            decoder_residual=False,
            projection_layers=2,
            projection_ratio=2.0,
        )
    )

    def validate(self, key: str, embed_dim: int) -> TextConfig:
        super().validate(key, embed_dim)
        need(self.vocab_size > self.pad_idx, f"{key}.vocab_size", "must exceed pad_idx")
        return self


@dataclass
class ModelConfig:
    """The unified model: any subset of the three modality encoders over one block stack."""

    embed_dim: int = 768
    depth: int = 12
    num_heads: int = 12
    mlp_ratio: float = 4.0
    norm_eps: float = 1e-5
    encoder_dropout: float = 0.1
    attention_dropout: float = 0.1
    activation_dropout: float = 0.0
    post_mlp_drop: float = 0.1
    dropout_input: float = 0.0
    layerdrop: float = 0.0
    start_drop_path_rate: float = 0.0
    end_drop_path_rate: float = 0.0
    # Targets (fairseq ``Data2VecMultiModel.make_targets``)
    average_top_k_layers: int = 8
    instance_norm_target_layer: bool = True
    layer_norm_target_layer: bool = False
    layer_norm_targets: bool = False
    instance_norm_targets: bool = False
    # Loss (fairseq ``Data2VecMultiModel.d2v_loss``): loss_scale None means 1/sqrt(D)
    loss_beta: float = 0.0
    loss_scale: float | None = None
    cls_loss: float = 0.0
    clone_batch: int = 8
    # EMA teacher (fairseq ``Data2VecMultiModel.set_num_updates``)
    ema_decay: float = 0.999
    ema_end_decay: float = 0.99999
    ema_anneal_end_step: int = 75000
    # Collapse guard (fairseq ``Data2VecMultiModel.forward``): checked from this update on
    min_target_var: float = 0.1
    min_pred_var: float = 0.01
    collapse_check_after: int = 5000
    image: ImageConfig | None = None
    speech: SpeechConfig | None = None
    text: TextConfig | None = None

    @property
    def modalities(self) -> list[str]:
        return [m for m in MODALITIES if getattr(self, m) is not None]

    def validate(self) -> ModelConfig:
        """Raise ``ConfigError`` naming the first bad field; return self when all is well. Each
        modality section checks itself (given ``embed_dim``, which its decoder and positions share)."""

        def need_(cond: bool, name: str, msg: str) -> None:
            need(cond, f"model.{name}", msg)

        need_(isinstance(self.embed_dim, int) and self.embed_dim > 0, "embed_dim", f"must be a positive int, got {self.embed_dim!r}")
        need_(isinstance(self.num_heads, int) and self.num_heads > 0, "num_heads", f"must be a positive int, got {self.num_heads!r}")
        need_(self.embed_dim % self.num_heads == 0, "embed_dim",
              f"embed_dim={self.embed_dim} is not divisible by num_heads={self.num_heads}")
        need_(isinstance(self.depth, int) and self.depth >= 1, "depth", f"must be >= 1, got {self.depth!r}")
        need_(1 <= self.average_top_k_layers <= self.depth, "average_top_k_layers",
              f"must be in [1, depth={self.depth}], got {self.average_top_k_layers}")
        need_(isinstance(self.clone_batch, int) and self.clone_batch >= 1, "clone_batch", f"must be an int >= 1, got {self.clone_batch!r}")
        need_(0.0 <= self.ema_decay <= 1.0, "ema_decay", f"must be in [0, 1], got {self.ema_decay}")
        need_(0.0 <= self.ema_end_decay <= 1.0, "ema_end_decay", f"must be in [0, 1], got {self.ema_end_decay}")
        need_(self.ema_anneal_end_step >= 0, "ema_anneal_end_step", "must be >= 0")
        for name in ("encoder_dropout", "attention_dropout", "activation_dropout", "post_mlp_drop", "dropout_input", "layerdrop"):
            v = getattr(self, name)
            need_(0.0 <= v < 1.0, name, f"must be in [0, 1), got {v}")
        need_(not (self.instance_norm_target_layer and self.layer_norm_target_layer), "layer_norm_target_layer",
              "instance_norm_target_layer and layer_norm_target_layer are exclusive")
        need_(len(self.modalities) > 0, "image/speech/text", "at least one modality must be configured")
        for m in self.modalities:
            getattr(self, m).validate(f"model.{m}", self.embed_dim)
        return self


def parse_conv_spec(spec: str) -> list[tuple[int, int, int]]:
    """Parse fairseq's ``"[(512, 10, 5)] + [(512, 3, 2)] * 4"`` without ``eval`` on arbitrary code."""
    import ast

    tree = ast.parse(spec, mode="eval")

    def ev(node: ast.AST):  # a tiny evaluator: lists, tuples, ints, + and *
        if isinstance(node, ast.Expression):
            return ev(node.body)
        if isinstance(node, ast.List):
            return [ev(e) for e in node.elts]
        if isinstance(node, ast.Tuple):
            return tuple(ev(e) for e in node.elts)
        if isinstance(node, ast.Constant) and isinstance(node.value, int):
            return node.value
        if isinstance(node, ast.BinOp) and isinstance(node.op, (ast.Add, ast.Mult)):
            a, b = ev(node.left), ev(node.right)
            return a + b if isinstance(node.op, ast.Add) else a * b
        raise ValueError(f"unsupported syntax {ast.dump(node)[:60]}")

    out = ev(tree)
    if not isinstance(out, list) or not all(isinstance(t, tuple) and len(t) == 3 for t in out):
        raise ValueError("expected a list of (channels, kernel, stride) tuples")
    return [tuple(int(v) for v in t) for t in out]  # type: ignore[misc]

