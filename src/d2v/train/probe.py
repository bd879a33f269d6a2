"""Online evaluation during pretraining: a linear probe of frozen features every ``train.probe_every`` steps.

As the online classifiers of SSL libraries (lightly, solo-learn), but cheap and outside the loss:
for each trained modality with labels, ``train.probe_train`` labelled training samples and
``train.probe_val`` labelled validation samples are decoded once from the shards (the same splits,
transforms and mean pooling over real tokens as ``d2v evaluate``'s probe); at a probe step the student encoder's
mean-pooled last-block features are extracted in eval mode and scored by a standardised logistic
regression (:func:`d2v.train.evaluate.linear_probe`). The model's mode and every RNG are restored,
so a run with probes trains exactly as one without.
"""

from __future__ import annotations

import time

import numpy as np
import torch

from d2v.config import Config
from d2v.data.downstream import LabelledSplit, load_task_data
from d2v.errors import InputError
from d2v.models import Data2Vec2


def linear_probe(x_train: np.ndarray, y_train: np.ndarray, x_test: np.ndarray, y_test: np.ndarray,
                 c: float = 1.0) -> float:
    """Accuracy of a standardised multinomial logistic regression (lbfgs) trained on frozen features."""
    from sklearn.linear_model import LogisticRegression
    from sklearn.pipeline import make_pipeline
    from sklearn.preprocessing import StandardScaler

    if len(np.unique(y_train)) < 2:
        raise InputError("linear probe: the training subset holds a single class")
    clf = make_pipeline(StandardScaler(), LogisticRegression(C=c, max_iter=2000))
    clf.fit(x_train, y_train)
    return float((clf.predict(x_test) == y_test).mean())


class OnlineProbe:
    """``probe(backbone) -> {modality: accuracy}``; ``seconds`` accumulates the time spent probing,
    ``load_seconds`` the one-off decoding of the probe sets."""

    def __init__(self, cfg: Config, device: torch.device, batch_size: int = 128):
        t = cfg.train
        self.cfg, self.device, self.batch_size = cfg, device, batch_size
        self.splits: dict[str, tuple[LabelledSplit, LabelledSplit]] = {}
        self.seconds = 0.0
        t0 = time.perf_counter()
        for m in t.modalities:
            try:
                with torch.random.fork_rng(devices=[]):  # a DataLoader iterator draws its seed from it
                    train = load_task_data(cfg, m, "train", t.probe_train)
                    val = load_task_data(cfg, m, "val", t.probe_val)
            except (InputError, FileNotFoundError) as e:
                raise InputError(f"train.probe_every={t.probe_every}: cannot probe {m}: {e} "
                                 f"(train.probe_every=0 turns the online probe off)") from e
            if len(torch.unique(train.label)) < 2:
                raise InputError(f"train.probe_every: the {m} shards' first {len(train)} labelled training "
                                 "samples hold a single class: raise train.probe_train")
            self.splits[m] = (train, val)
        self.load_seconds = time.perf_counter() - t0

    @torch.no_grad()
    def __call__(self, backbone: Data2Vec2) -> dict[str, float]:
        t0 = time.perf_counter()
        was_training = backbone.training
        backbone.eval()
        devices = [self.device] if self.device.type == "cuda" else []
        out: dict[str, float] = {}
        with torch.random.fork_rng(devices=devices):  # eval mode should draw nothing; be sure
            for m, (train, val) in self.splits.items():
                x_tr, x_va = self.pooled(backbone, m, train), self.pooled(backbone, m, val)
                out[m] = linear_probe(x_tr, train.label.numpy(), x_va, val.label.numpy())
        backbone.train(was_training)
        self.seconds += time.perf_counter() - t0
        return out

    @torch.no_grad()
    def pooled(self, backbone: Data2Vec2, modality: str, data: LabelledSplit) -> np.ndarray:
        """Mean over the real (unpadded) tokens of the last block's output, (N, D) float64."""
        enc = backbone.encoder(modality)
        rows = []
        for i in range(0, len(data), self.batch_size):
            src = data.source[i : i + self.batch_size]
            pad = None
            if data.lengths is not None:  # speech: samples -> frames; text: tokens
                n = data.lengths[i : i + self.batch_size]
                if modality == "speech":
                    n = torch.tensor([enc.local_encoder.output_length(int(k)) for k in n])
                t = enc.num_tokens(tuple(src.shape))
                pad = torch.arange(t).unsqueeze(0) >= n.unsqueeze(1)
            f = backbone.features(src.to(self.device), modality, padding_mask=pad)
            if f.padding_mask is None:
                rows.append(f.x.float().mean(1))
            else:
                keep = (~f.padding_mask).unsqueeze(-1).float()
                rows.append((f.x.float() * keep).sum(1) / keep.sum(1).clamp_min(1))
        return torch.cat(rows).cpu().numpy().astype(np.float64)
