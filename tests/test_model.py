"""The data2vec 2.0 model (fairseq ``Data2VecMultiModel``): shapes, targets, loss, EMA teacher, training behaviour.

Numbers are checked against independent straightforward computations written out here (explicit
mean/variance formulas, hand-built ALiBi, manual block loops), never against the code under
test. Tiny configs from ``conftest.build_cfg`` (D=32, 3 blocks, no dropout).
"""

from __future__ import annotations

import dataclasses
import math

import pytest
import torch
import torch.nn.functional as F

from d2v.models import CollapseError, Data2Vec2

MODALITIES = ["image", "speech", "text"]
T_OF = {"image": 49, "speech": 24, "text": 32}  # tokens of the conftest batches
MASKED_OF = {"image": 40, "speech": 12, "text": 16}  # 49 - int(49*0.2); int(24*0.5); 32 - int(32*0.52)
EXTRA_OF = {"image": 1, "speech": 0, "text": 0}


# ---------------------------------------------------------------------------------- references
def ref_layer_norm(x: torch.Tensor, eps: float = 1e-5, w=None, b=None) -> torch.Tensor:
    mu = x.mean(-1, keepdim=True)
    var = ((x - mu) ** 2).mean(-1, keepdim=True)  # biased
    y = (x - mu) / torch.sqrt(var + eps)
    return y if w is None else y * w + b


def ref_instance_norm(x: torch.Tensor, eps: float = 1e-5) -> torch.Tensor:
    """Per sample, per channel, over the token axis of ``(B, T, D)``; biased variance, no affine."""
    mu = x.mean(1, keepdim=True)
    var = ((x - mu) ** 2).mean(1, keepdim=True)
    return (x - mu) / torch.sqrt(var + eps)


def ref_alibi(heads: int, keep: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    """Press et al. slopes 2^(-8(h+1)/H) (H a power of two) times -|i-j|, scaled per head."""
    slopes = torch.tensor([2.0 ** (-8.0 * (h + 1) / heads) for h in range(heads)])
    pos = keep.float()
    dist = -(pos[:, None, :, None] - pos[:, None, None, :]).abs()
    return dist * slopes.view(1, -1, 1, 1) * scale.reshape(1, -1, 1, 1).clamp(min=0)


def ref_speech_local(enc, wav: torch.Tensor) -> torch.Tensor:
    """wav2vec 2.0 CNN (bias-free conv -> LN over channels -> GELU) and the feature projection."""
    x = wav[:, None]
    for layer in enc.local_encoder.conv_layers:
        conv, ln = layer[0], getattr(layer[2], "1")
        x = F.conv1d(x, conv.weight, stride=conv.stride[0])
        x = ref_layer_norm(x.transpose(1, 2), ln.eps, ln.weight, ln.bias).transpose(1, 2)
        x = F.gelu(x)
    x = x.transpose(1, 2)
    ln, lin = enc.project_features[1], enc.project_features[2]
    return ref_layer_norm(x, ln.eps, ln.weight, ln.bias) @ lin.weight.T + lin.bias


def ref_conv_pos(tenc, x: torch.Tensor) -> torch.Tensor:
    """Conv positional net: (conv, same-pad, channel LN without affine, GELU) per layer, no residual."""
    h = x.transpose(1, 2)
    for layer in list(tenc.relative_positional_encoder.children())[1:-1]:
        conv = layer[0]
        k = conv.kernel_size[0]
        h = F.conv1d(h, conv.weight, conv.bias, padding=k // 2, groups=conv.groups)
        if k % 2 == 0:
            h = h[..., :-1]
        h = F.gelu(ref_layer_norm(h.transpose(1, 2)).transpose(1, 2))
    return h.transpose(1, 2)


def ref_block(blk, x: torch.Tensor, bias=None) -> tuple[torch.Tensor, torch.Tensor]:
    """Post-LN block written out: returns the block output and the FFN output before the residual."""
    n, L, D = x.shape
    H = blk.attn.num_heads
    qkv = (x @ blk.attn.qkv.weight.T + blk.attn.qkv.bias).view(n, L, 3, H, D // H).permute(2, 0, 3, 1, 4)
    q, k, v = qkv[0], qkv[1], qkv[2]
    scores = q @ k.transpose(-1, -2) / math.sqrt(D // H)
    if bias is not None:
        scores = scores + bias
    a = (scores.softmax(-1) @ v).transpose(1, 2).reshape(n, L, D)
    x = x + a @ blk.attn.proj.weight.T + blk.attn.proj.bias
    r = ref_layer_norm(x, blk.norm1.eps, blk.norm1.weight, blk.norm1.bias)
    t = F.gelu(r @ blk.mlp.fc1.weight.T + blk.mlp.fc1.bias) @ blk.mlp.fc2.weight.T + blk.mlp.fc2.bias
    return ref_layer_norm(r + t, blk.norm2.eps, blk.norm2.weight, blk.norm2.bias), t


def teacher_layers(model: Data2Vec2, modality: str, source: torch.Tensor) -> list[torch.Tensor]:
    """FFN outputs of every teacher main block on the unmasked sample, extra tokens stripped."""
    cfg = model.cfg
    heads = cfg.num_heads
    bias = None
    with torch.no_grad():
        if modality == "image":
            t = model.teacher.modality_encoders["image"]
            conv = t.local_encoder.proj
            x = F.conv2d(source, conv.weight, conv.bias, stride=cfg.image.patch_size).flatten(2).transpose(1, 2)
            x = x + t.pos_embed
            x = torch.cat([t.extra_tokens.expand(x.shape[0], -1, -1), x], 1)
            n = t.context_encoder.norm
            x = ref_layer_norm(x, n.eps, n.weight, n.bias)
            for blk in t.context_encoder.blocks:  # prenet: run, but never a target
                x, _ = ref_block(blk, x)
        elif modality == "speech":
            t = model.teacher.modality_encoders["speech"]
            local = ref_speech_local(model.modality_encoders["speech"], source)  # the student's CNN
            x = local + ref_conv_pos(t, local)
            n = t.context_encoder.norm
            x = ref_layer_norm(x, n.eps, n.weight, n.bias)
            keep = torch.arange(x.shape[1]).expand(x.shape[0], -1)
            bias = ref_alibi(heads, keep, t.alibi_scale)
        else:
            le = model.modality_encoders["text"].local_encoder  # the student's embeddings
            pad = cfg.text.pad_idx
            pos = torch.arange(source.shape[1]) + pad + 1  # no padding in these batches
            x = le.embed_tokens.weight[source] + le.embed_positions.weight[pos]
            n = le.layernorm_embedding
            x = ref_layer_norm(x, n.eps, n.weight, n.bias)
        ffn = []
        for blk in model.teacher.blocks:
            x, out = ref_block(blk, x, bias)
            ffn.append(out[:, EXTRA_OF[modality]:])
    return ffn


def ref_targets(model: Data2Vec2, modality: str, source: torch.Tensor) -> torch.Tensor:
    c = model.cfg
    layers = teacher_layers(model, modality, source)[-c.average_top_k_layers:]
    if c.instance_norm_target_layer:
        layers = [ref_instance_norm(t.double()) for t in layers]
    elif c.layer_norm_target_layer:
        layers = [ref_layer_norm(t.double()) for t in layers]
    y = sum(layers) / len(layers)
    if c.layer_norm_targets:
        y = ref_layer_norm(y)
    if c.instance_norm_targets:
        y = ref_instance_norm(y)
    return y.float()


def perturb_(params, std: float = 0.05) -> None:
    with torch.no_grad():
        for p in params:
            p.add_(torch.randn_like(p) * std)


def zero_noise(model: Data2Vec2, B: int, modality: str) -> torch.Tensor:
    return torch.zeros(B * model.cfg.clone_batch, MASKED_OF[modality], model.cfg.embed_dim)


# ---------------------------------------------------------------------------------- shapes
@pytest.mark.parametrize("modality", MODALITIES)
def test_output_shapes_and_dtypes(tiny_cfg, batch, modality):
    model = Data2Vec2(tiny_cfg(modality, clone_batch=3))
    B, M, D = 2, 3, 32
    out = model(batch(modality, B), modality)
    T, n = T_OF[modality], MASKED_OF[modality]
    assert out.mask.shape == (B * M, T) and out.mask.dtype == torch.bool
    assert bool((out.mask.sum(1) == n).all())
    assert out.pred.shape == (B * M * n, D)
    assert out.target.shape == (B * M * n, D) and out.target.dtype == torch.float32
    assert int(out.sample_size) == B * M * n
    assert out.loss.ndim == 0 and bool(torch.isfinite(out.loss)) and out.loss.requires_grad
    assert not out.target.requires_grad
    assert torch.allclose(out.loss_sum, out.loss * out.sample_size, rtol=1e-6)


def test_modality_defaults_to_the_only_one(tiny_cfg, batch):
    model = Data2Vec2(tiny_cfg("text"))
    out = model(batch("text"))
    assert out.mask.shape == (4, 32)


# ---------------------------------------------------------------------------------- targets
TARGET_CASES = [
    ("image", {}),  # per-layer IN, final LN (image base)
    ("speech", {}),  # per-layer IN (audio base)
    ("text", {}),  # per-layer IN (text base)
    ("text", dict(instance_norm_target_layer=False, layer_norm_target_layer=True, instance_norm_targets=True)),  # text large
]


@pytest.mark.parametrize("modality,extra", TARGET_CASES, ids=["image", "speech", "text", "text_large_norms"])
def test_targets_match_independent_teacher(tiny_cfg, batch, modality, extra):
    model = Data2Vec2(tiny_cfg(modality, **extra))
    perturb_(model.teacher.parameters())  # teacher != student, so using the wrong one shows
    src = batch(modality)
    out = model(src, modality)
    y = ref_targets(model, modality, src)  # (B, T, D)
    want = y.repeat_interleave(model.cfg.clone_batch, 0)[out.mask]  # sample-major clones, row-major positions
    err = float((out.target - want).abs().max())
    assert err < 2e-5 * max(1.0, float(want.abs().max())), err
    if modality == "image":  # final LayerNorm: every target vector has zero mean, unit variance over D
        assert torch.allclose(out.target.mean(-1), torch.zeros(()), atol=1e-5)
        assert torch.allclose(out.target.var(-1, unbiased=False), torch.ones(()), atol=1e-3)


def test_targets_ignore_prenet_and_early_blocks(tiny_cfg, batch):
    """Using all blocks (or the student's blocks) would give different targets: the check bites."""
    model = Data2Vec2(tiny_cfg("image"))
    perturb_(model.teacher.parameters())
    src = batch("image")
    out = model(src, "image")
    layers = teacher_layers(model, "image", src)
    wrong_k = ref_layer_norm(sum(ref_instance_norm(t) for t in layers) / len(layers))
    wrong = wrong_k.repeat_interleave(2, 0)[out.mask]
    assert float((out.target - wrong).abs().max()) > 1e-2


def test_teacher_ignores_dropout_in_train_mode(tiny_cfg, batch):
    cfg = tiny_cfg("image", "speech", encoder_dropout=0.3, attention_dropout=0.3, post_mlp_drop=0.3, layerdrop=0.3)
    model = Data2Vec2(cfg).train()
    assert not model.teacher.training
    for m in ("image", "speech"):
        src = batch(m)
        mask = model.make_mask(m, 2, T_OF[m])
        noise = zero_noise(model, 2, m)
        a, b = model(src, m, mask=mask, mask_noise=noise), model(src, m, mask=mask, mask_noise=noise)
        assert torch.equal(a.target, b.target)
        assert not torch.equal(a.pred, b.pred)  # the student does use dropout


# ---------------------------------------------------------------------------------- student
@pytest.mark.parametrize("modality", MODALITIES)
def test_student_encodes_only_visible_tokens(tiny_cfg, batch, modality):
    model = Data2Vec2(tiny_cfg(modality))
    seen: dict[str, tuple] = {}

    def record(key):
        def hook(mod, args):
            seen.setdefault(key, tuple(args[0].shape))  # returns None: the input is left alone

        return hook

    model.blocks[0].register_forward_pre_hook(record("student"))
    model.teacher.blocks[0].register_forward_pre_hook(record("teacher"))
    model.modality_encoders[modality].decoder.register_forward_pre_hook(record("decoder"))
    B, M, T = 2, 2, T_OF[modality]
    model(batch(modality, B), modality)
    kept = T - MASKED_OF[modality]  # image: 9 of the 7x7 grid
    assert seen["student"] == (B * M, EXTRA_OF[modality] + kept, 32)
    assert seen["teacher"] == (B, EXTRA_OF[modality] + T, 32)  # once per sample, full length
    assert seen["decoder"] == (B * M, T, 32)


def test_image_prediction_blind_to_masked_patches(tiny_cfg, batch):
    cfg = tiny_cfg("image", clone_batch=1)
    model = Data2Vec2(cfg)
    src = batch("image", 1)
    mask = model.make_mask("image", 1, 49)
    noise = zero_noise(model, 1, "image")
    a = model(src, "image", mask=mask, mask_noise=noise)
    masked_patch = int(mask[0].nonzero()[0])
    r, c = divmod(masked_patch, 7)
    src2 = src.clone()
    src2[0, 0, 4 * r:4 * r + 4, 4 * c:4 * c + 4] += 5.0
    b = model(src2, "image", mask=mask, mask_noise=noise)
    assert torch.allclose(a.pred, b.pred, atol=1e-6, rtol=0)  # the student never saw the patch
    assert not torch.allclose(a.target, b.target)  # the teacher did
    kept_patch = int((~mask[0]).nonzero()[0])
    r, c = divmod(kept_patch, 7)
    src3 = src.clone()
    src3[0, 0, 4 * r:4 * r + 4, 4 * c:4 * c + 4] += 5.0
    assert not torch.allclose(model(src3, "image", mask=mask, mask_noise=noise).pred, a.pred)


@pytest.mark.parametrize("zero_mask", [True, False])
def test_speech_masked_frames_zeroed_before_conv_positions(tiny_cfg, batch, zero_mask):
    """fairseq ``contextualized_features``: masked frames are zeroed before the full-length conv positional net."""
    model = Data2Vec2(tiny_cfg("speech", clone_batch=1, speech=dict(encoder_zero_mask=zero_mask)))
    src = batch("speech", 1)
    mask = model.make_mask("speech", 1, 24)
    noise = zero_noise(model, 1, "speech")
    a = model(src, "speech", mask=mask, mask_noise=noise)
    junk = torch.randn(1, 24, 32) * 3
    hook = model.modality_encoders["speech"].project_features.register_forward_hook(
        lambda mod, args, out: torch.where(mask[..., None], junk, out)
    )
    b = model(src, "speech", mask=mask, mask_noise=noise)
    hook.remove()
    assert torch.allclose(a.pred, b.pred, atol=1e-6, rtol=0) == zero_mask


# ---------------------------------------------------------------------------------- loss
def capture_final_x(model: Data2Vec2) -> dict:
    box = {}
    model.blocks[-1].register_forward_hook(lambda mod, args, out: box.__setitem__("x", out[0]) and None)
    return box


@pytest.mark.parametrize("modality", MODALITIES)
def test_loss_is_per_masked_token_mean(tiny_cfg, batch, modality):
    extra = {"loss_scale": 1.0} if modality == "text" else {}  # text base: scale 1, others 1/sqrt(D)
    model = Data2Vec2(tiny_cfg(modality, **extra))
    box = capture_final_x(model)
    src = batch(modality)
    out = model(src, modality)
    D, M = 32, model.cfg.clone_batch
    scale = 1.0 if modality == "text" else 1 / math.sqrt(D)
    per_token = ((out.pred.detach().double() - out.target.double()) ** 2).sum(-1) * scale
    want = per_token.sum() / out.pred.shape[0]
    if modality == "image":
        y = ref_targets(model, "image", src).double()
        cls_target = y.mean(1).repeat_interleave(M, 0)
        cls_pred = box["x"][:, 0].detach().double()
        want = want + 0.01 * (((cls_pred - cls_target) ** 2).sum(-1) * scale).sum()
        assert float(out.loss_terms["cls"].detach()) > 0
    assert math.isclose(float(out.loss.detach()), float(want), rel_tol=1e-5)
    # a mean over dims instead of a sum would be D x smaller
    assert float(out.loss.detach()) > 5 * float(((out.pred.detach() - out.target) ** 2).mean())


def test_smooth_l1_loss(tiny_cfg, batch):
    model = Data2Vec2(tiny_cfg("speech", loss_beta=0.5))
    out = model(batch("speech"), "speech")
    d = (out.pred.detach().double() - out.target.double()).abs()
    per_elem = torch.where(d < 0.5, 0.5 * d**2 / 0.5, d - 0.25)
    want = per_elem.sum() / math.sqrt(32) / d.shape[0]
    assert math.isclose(float(out.loss.detach()), float(want), rel_tol=1e-5)


def test_text_padding_not_regressed(tiny_cfg, batch):
    model = Data2Vec2(tiny_cfg("text", loss_scale=1.0))
    src = batch("text")
    src[1, 20:] = model.cfg.text.pad_idx
    out = model(src, "text")
    pad = src.eq(1).repeat_interleave(2, 0)[out.mask]
    assert int(out.sample_size) == int((~pad).sum()) < out.pred.shape[0]
    per_token = ((out.pred.detach().double() - out.target.double()) ** 2).sum(-1)
    want = per_token[~pad].sum() / (~pad).sum()
    assert math.isclose(float(out.loss.detach()), float(want), rel_tol=1e-5)


@pytest.mark.parametrize("modality", MODALITIES)
def test_more_clones_keep_a_per_token_mean(tiny_cfg, batch, modality):
    """Doubling every clone (same masks, no noise) leaves the regression loss unchanged;
    the image CLS term is a sum over the B*M instances (fairseq ``cls_loss``), so it doubles."""
    m1 = Data2Vec2(tiny_cfg(modality, clone_batch=1))
    m2 = Data2Vec2(tiny_cfg(modality, clone_batch=2))
    m2.load_state_dict(m1.state_dict())
    src = batch(modality)
    mask1 = m1.make_mask(modality, 2, T_OF[modality])
    o1 = m1(src, modality, mask=mask1, mask_noise=zero_noise(m1, 2, modality))
    o2 = m2(src, modality, mask=mask1.repeat_interleave(2, 0), mask_noise=zero_noise(m2, 2, modality))
    assert int(o2.sample_size) == 2 * int(o1.sample_size)
    reg1 = o1.loss_terms["regression"] / o1.sample_size
    reg2 = o2.loss_terms["regression"] / o2.sample_size
    assert torch.allclose(reg1, reg2, rtol=1e-5)
    if modality == "image":
        assert torch.allclose(o2.loss_terms["cls"] / o2.sample_size, 2 * o1.loss_terms["cls"] / o1.sample_size, rtol=1e-5)
    else:
        assert torch.allclose(o1.loss, o2.loss, rtol=1e-5)


def test_clone_order_is_sample_major(tiny_cfg, batch):
    """Rows of the mask are s0c0, s0c1, s1c0, ...: targets of row r come from sample r // M."""
    model = Data2Vec2(tiny_cfg("text", clone_batch=3))
    src = batch("text", 2)
    mask = model.make_mask("text", 2, 32)
    mask[:3] = mask[0]  # all clones of sample 0 share one mask, likewise sample 1
    mask[3:] = mask[3]
    out = model(src, "text", mask=mask, mask_noise=zero_noise(model, 2, "text"))
    t = out.target.view(6, 16, 32)
    assert torch.equal(t[0], t[1]) and torch.equal(t[0], t[2]) and torch.equal(t[3], t[5])
    assert not torch.allclose(t[0], t[3])


# ---------------------------------------------------------------------------------- gradients
def test_gradients_student_only_multimodal(tiny_cfg, batch):
    model = Data2Vec2(tiny_cfg("image", "speech", "text"))
    assert all(not p.requires_grad for p in model.teacher.parameters())
    loss = sum(model(batch(m), m).loss for m in MODALITIES)
    loss.backward()
    assert all(p.grad is None for p in model.teacher.parameters())
    missing = [
        n for n, p in model.named_parameters()
        if p.requires_grad and not n.startswith("teacher.") and (p.grad is None or not bool(p.grad.abs().sum() > 0))
    ]
    assert missing == []


# ---------------------------------------------------------------------------------- multimodal
def test_multimodal_shares_blocks(tiny_cfg, batch):
    model = Data2Vec2(tiny_cfg("image", "speech", "text"))
    calls: list[int] = []
    model.blocks[0].register_forward_pre_hook(lambda mod, args: calls.append(args[0].shape[1]) and None)
    outs = {m: model(batch(m), m) for m in MODALITIES}
    assert calls == [1 + 9, 12, 16]  # one stack, visible tokens of each modality
    for m, o in outs.items():
        assert o.target.shape == (2 * 2 * MASKED_OF[m], 32)
    # one set of block parameters, counted once, for every modality
    blocks = sum(p.numel() for p in model.blocks.parameters())
    per_mod = [model.num_parameters(m) for m in MODALITIES]
    assert model.num_parameters() == sum(per_mod) - 2 * blocks
    # a speech-only backward reaches the shared blocks but not the image encoder
    outs["speech"].loss.backward()
    assert model.blocks[0].attn.qkv.weight.grad is not None
    assert model.modality_encoders["image"].local_encoder.proj.weight.grad is None


# ---------------------------------------------------------------------------------- EMA
def test_ema_ramp(tiny_cfg):
    model = Data2Vec2(tiny_cfg("image", ema_decay=0.9, ema_end_decay=0.99, ema_anneal_end_step=10))

    def hand(n):
        return 0.9 + (0.99 - 0.9) * min(n, 10) / 10

    for n in (0, 1, 5, 9, 10, 11, 1000):
        assert math.isclose(model.ema_decay(n), hand(n), rel_tol=1e-12), n
    assert math.isclose(model.ema_decay(5), 0.945, rel_tol=1e-12)


def test_ema_update_formula_and_copies(tiny_cfg):
    cfg = tiny_cfg("image", "speech", ema_decay=0.9, ema_end_decay=0.99, ema_anneal_end_step=10,
                   speech=dict(learned_alibi_scale=False))
    model = Data2Vec2(cfg)
    teacher_names = [n for n, _ in model.teacher.named_parameters()]
    assert not any(".decoder." in n for n in teacher_names)
    assert not any(n.startswith("modality_encoders.speech.local_encoder") or ".project_features" in n for n in teacher_names)
    assert any(n.startswith("modality_encoders.image.local_encoder") for n in teacher_names)  # image: full copy

    student = dict(model.named_parameters())
    perturb_([p for n, p in student.items() if not n.startswith("teacher.")], 0.1)
    with torch.no_grad():
        student["modality_encoders.speech.alibi_scale"].mul_(0.5)  # frozen param: copied, not averaged
        model.modality_encoders["image"].pos_embed.add_(1.0)  # buffer: copied
    t0 = {n: p.detach().clone() for n, p in model.teacher.named_parameters()}
    s = {n: student[n].detach().clone() for n in t0}

    d = model.update_teacher(5)
    assert math.isclose(d, 0.945, rel_tol=1e-12)
    for n, p in model.teacher.named_parameters():
        want = s[n] if n.endswith("alibi_scale") else d * t0[n] + (1 - d) * s[n]
        assert torch.allclose(p, want, atol=1e-7, rtol=3e-7), n
    assert torch.equal(model.teacher.modality_encoders["image"].pos_embed, model.modality_encoders["image"].pos_embed)

    # no increase of num_updates: skipped
    t1 = {n: p.detach().clone() for n, p in model.teacher.named_parameters()}
    model.update_teacher(5)
    model.update_teacher(3)
    assert all(torch.equal(p, t1[n]) for n, p in model.teacher.named_parameters())
    model.update_teacher(6)
    assert not torch.equal(model.teacher.blocks[0].attn.qkv.weight, t1["blocks.0.attn.qkv.weight"])


def test_ema_count_is_read_from_the_device_once(tiny_cfg):
    """update_teacher keeps the update count on the host: after the first call it never reads the
    ``ema_updates`` buffer (on a GPU each read stalls the host; here a meta tensor, which cannot be
    read, stands in), and a loaded state dict's count is honoured (the mirror is re-read)."""
    model = Data2Vec2(tiny_cfg("image", ema_decay=0.9, ema_end_decay=0.99, ema_anneal_end_step=100))
    perturb_([p for n, p in model.named_parameters() if not n.startswith("teacher.")], 0.1)
    model.update_teacher(1)
    state = {k: v.clone() for k, v in model.state_dict().items()}
    model.ema_updates = torch.zeros((), dtype=torch.long, device="meta")  # int() of it would raise
    w = model.teacher.blocks[0].mlp.fc1.weight.clone()
    model.update_teacher(2)
    model.update_teacher(3)
    assert not torch.equal(model.teacher.blocks[0].mlp.fc1.weight, w)

    model.ema_updates = torch.zeros((), dtype=torch.long)  # a readable buffer again
    state["ema_updates"] = torch.tensor(7)  # a checkpoint saved after update 7
    model.load_state_dict(state)
    w = model.teacher.blocks[0].mlp.fc1.weight.clone()
    model.update_teacher(5)  # not past the loaded count: skipped
    assert torch.equal(model.teacher.blocks[0].mlp.fc1.weight, w)
    model.update_teacher(8)
    assert not torch.equal(model.teacher.blocks[0].mlp.fc1.weight, w) and int(model.ema_updates) == 8


def test_ema_frozen_at_end_decay_one(tiny_cfg):
    model = Data2Vec2(tiny_cfg("image", ema_decay=0.9, ema_end_decay=1.0, ema_anneal_end_step=10))
    perturb_([p for n, p in model.named_parameters() if not n.startswith("teacher.")], 0.1)
    before = {n: p.detach().clone() for n, p in model.teacher.named_parameters()}
    assert model.update_teacher(11) == 1.0
    assert model.update_teacher(50) == 1.0
    assert all(torch.equal(p, before[n]) for n, p in model.teacher.named_parameters())
    # but while annealing it still moves: decay at step 5 is 0.95 < 1
    model2 = Data2Vec2(tiny_cfg("image", ema_decay=0.9, ema_end_decay=1.0, ema_anneal_end_step=10))
    perturb_([p for n, p in model2.named_parameters() if not n.startswith("teacher.")], 0.1)
    w = model2.teacher.blocks[0].mlp.fc1.weight.clone()
    assert math.isclose(model2.update_teacher(5), 0.95)
    assert not torch.equal(model2.teacher.blocks[0].mlp.fc1.weight, w)


def test_teacher_starts_as_exact_copy(tiny_cfg):
    model = Data2Vec2(tiny_cfg("image", "speech", "text"))
    student = dict(model.named_parameters())
    for n, p in model.teacher.named_parameters():
        assert torch.equal(p, student[n]), n
    assert not model.teacher.training


# ---------------------------------------------------------------------------------- training
@pytest.mark.parametrize("modality,steps", [("image", 40), ("speech", 40), ("text", 60)])
def test_loss_falls_on_fixed_batch(tiny_cfg, batch, modality, steps):
    model = Data2Vec2(tiny_cfg(modality)).train()
    src = batch(modality, 2)
    mask = model.make_mask(modality, 2, T_OF[modality])
    opt = torch.optim.AdamW(model.param_groups(0.01), lr=2e-3, betas=(0.9, 0.98))
    losses = []
    for step in range(steps):
        out = model(src, modality, mask=mask)
        opt.zero_grad()
        out.loss.backward()
        opt.step()
        model.update_teacher(step + 1)
        losses.append(float(out.loss.detach()))
    assert all(math.isfinite(v) for v in losses)
    first, last = losses[0], sum(losses[-3:]) / 3
    assert last < 0.7 * first, f"{modality}: loss {first:.3f} -> {last:.3f}"


def test_param_groups(tiny_cfg):
    model = Data2Vec2(tiny_cfg("image", "speech", "text"))
    decay, no_decay = model.param_groups(0.05)
    assert decay["weight_decay"] == 0.05 and no_decay["weight_decay"] == 0.0
    ids_d = {id(p) for p in decay["params"]}
    ids_n = {id(p) for p in no_decay["params"]}
    assert not ids_d & ids_n
    assert not (ids_d | ids_n) & {id(p) for p in model.teacher.parameters()}
    student = {n: p for n, p in model.named_parameters() if not n.startswith("teacher.")}
    assert ids_d | ids_n == {id(p) for p in student.values()}
    name_of = {id(p): n for n, p in student.items()}
    nd_names = {name_of[i] for i in ids_n}
    assert "modality_encoders.speech.alibi_scale" in nd_names and student["modality_encoders.speech.alibi_scale"].ndim == 5
    for n, p in student.items():
        if p.ndim == 1:  # biases and norm weights
            assert n in nd_names, n
        elif n != "modality_encoders.speech.alibi_scale":  # matrices, convs, embeddings, CLS
            assert n not in nd_names, n
    assert "modality_encoders.image.extra_tokens" not in nd_names
    assert "blocks.0.norm1.weight" in nd_names and "blocks.0.attn.qkv.bias" in nd_names


def test_param_groups_skip_frozen_alibi(tiny_cfg):
    model = Data2Vec2(tiny_cfg("speech", speech=dict(learned_alibi_scale=False)))
    scale = model.modality_encoders["speech"].alibi_scale
    assert not scale.requires_grad
    assert all(p is not scale for g in model.param_groups(0.1) for p in g["params"])


# ---------------------------------------------------------------------------------- collapse guard
def test_collapse_guard(tiny_cfg, batch):
    model = Data2Vec2(tiny_cfg("speech", min_target_var=1e6, collapse_check_after=10))
    out = model(batch("speech"), "speech")
    # target_var: mean over channels of the (unbiased) std across the masked tokens
    want = torch.sqrt(out.target.double().var(0) + 1e-6).mean()
    assert math.isclose(float(out.target_var), float(want), rel_tol=1e-5)
    model.check_collapse(out, 9)  # not checked yet
    with pytest.raises(CollapseError, match="target variance"):
        model.check_collapse(out, 10)
    model.cfg.min_target_var, model.cfg.min_pred_var = 0.0, 1e6
    with pytest.raises(CollapseError, match="prediction variance"):
        model.check_collapse(out, 5000)
    model.cfg.min_pred_var = 0.0
    model.check_collapse(out, 5000)
    for bad in (float("nan"), float("inf")):
        with pytest.raises(CollapseError, match="not finite"):
            model.check_collapse(dataclasses.replace(out, loss=torch.tensor(bad)), 0)


# ---------------------------------------------------------------------------------- bf16 on GPU
@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
@pytest.mark.parametrize("modality", MODALITIES)
def test_bf16_autocast_cuda(tiny_cfg, batch, modality):
    model = Data2Vec2(tiny_cfg(modality)).cuda().train()
    src = batch(modality).cuda()
    with torch.autocast("cuda", dtype=torch.bfloat16):
        out = model(src, modality)
    assert bool(torch.isfinite(out.loss))
    assert out.target.dtype == torch.float32
    out.loss.backward()
    grads = [p.grad for n, p in model.named_parameters() if p.requires_grad and not n.startswith("teacher.")]
    assert all(g is not None and bool(torch.isfinite(g).all()) for g in grads)
    model.update_teacher(1)
    assert all(p.dtype == torch.float32 for p in model.teacher.parameters())


# ---------------------------------------------------------------------------------- sizes
def _image_base_formula(D: int = 768, patch: int = 16, chans: int = 3, blocks: int = 12) -> int:
    per_block = (3 * D * D + 3 * D) + (D * D + D) + (4 * D * D + 4 * D) + (4 * D * D + D) + 4 * D  # qkv, proj, fc1, fc2, 2 LN
    assert per_block == 12 * D * D + 13 * D
    return (chans * patch * patch * D + D) + D + 2 * D + blocks * per_block  # patch conv, CLS, context LN


@pytest.mark.slow
def test_base_parameter_counts():
    from d2v.config import load_config

    D = 768
    blocks = 12 * (12 * D * D + 13 * D)
    want = {
        "image": (_image_base_formula(), 85_647_360),
        # RoBERTa-base without pooler: tokens, positions (512 + pad offset 2), embedding LN, blocks
        "text": (50265 * D + 514 * D + 2 * D + blocks, 124_054_272),
        # conv CNN (bias-free) + its LNs, feature projection, 5 grouped conv-pos layers (k=19), ALiBi scale, input LN
        "speech": (
            (512 * 10 + 4 * 512 * 512 * 3 + 2 * 512 * 512 * 2 + 7 * 2 * 512)
            + (2 * 512 + 512 * D + D) + 5 * (D * (D // 16) * 19 + D) + 12 + 2 * D + blocks,
            93_163_532,
        ),
    }
    for m, (formula, exact) in want.items():
        cfg = load_config([f"experiment={m}_base"]).model
        model = Data2Vec2(cfg)
        assert model.num_parameters(m) == exact, m
        assert formula == exact, m
        del model


@pytest.mark.parametrize("modality", ["image", "speech", "text"])
def test_local_grad_mult_scales_only_the_local_encoder_gradient(tiny_cfg, batch, modality):
    """fairseq's local_grad_mult: 0 -> no gradient into the local encoder (the speech projection
    still trains), 0.5 -> exactly half the gradient of 1, every other parameter unchanged."""
    x = batch(modality)
    grads = {}
    for mult in (1.0, 0.5, 0.0):
        torch.manual_seed(0)
        model = Data2Vec2(tiny_cfg(modality, **{modality: {"local_grad_mult": mult}}))
        torch.manual_seed(1)
        model(x, modality).loss.backward()
        grads[mult] = {n: (p.grad.clone() if p.grad is not None else None) for n, p in model.named_parameters()}
    local = [n for n in grads[1.0] if ".local_encoder." in n and grads[1.0][n] is not None]
    others = [n for n in grads[1.0] if ".local_encoder." not in n and grads[1.0][n] is not None]
    assert local and others
    for n in local:
        assert grads[1.0][n].abs().sum() > 0, n
        torch.testing.assert_close(grads[0.5][n], 0.5 * grads[1.0][n], rtol=1e-5, atol=1e-8)
        assert grads[0.0][n] is None, n  # no backward through the local encoder at all
    for n in others:
        torch.testing.assert_close(grads[0.5][n], grads[1.0][n], rtol=1e-5, atol=1e-8)
        torch.testing.assert_close(grads[0.0][n], grads[1.0][n], rtol=1e-5, atol=1e-8)


def test_local_grad_mult_must_be_non_negative(tiny_cfg):
    with pytest.raises(Exception, match="speech.local_grad_mult"):
        Data2Vec2(tiny_cfg("speech", speech={"local_grad_mult": -1.0}))
