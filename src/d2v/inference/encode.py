"""Embeddings from any model: ``encode(model_or_path, inputs, ...) -> EncodeResult``.

The model is a model folder, a pretraining checkpoint, a fairseq data2vec 2.0 checkpoint, or an
MLflow model URI (``models:/<name>@champion``, ``models:/<name>/<version>``, ``runs:/<id>/encoder``)
of an encoder logged by ``d2v.tracking.pyfunc.log_encoder``. Inputs are prepared as the model
was trained:

* images: decoded with PIL; project models: resized to ``input_size`` (bilinear) and normalised
  as :mod:`d2v.data.transforms` does (grey mean 0.2860, std 0.3530); converted fairseq models (per
  ``config.json["extra"]["preprocess"]``): resize the short side to input_size/0.875 (bicubic),
  centre crop, ImageNet mean/std;
* audio: read with soundfile, channels averaged, the sample rate checked against the model's
  (no resampling), standardised per utterance (fairseq ``normalize=True``); clips are batched only
  with clips of the same length, so an embedding never depends on its batch;
* text: the model's tokenizer (``d2v.inference.tokenizers``), truncated to ``max_source_positions``,
  padded per batch (padding is masked, so it changes nothing).

``pooling``: ``mean`` (over the sample's tokens; padding and the image CLS token excluded),
``cls`` (image CLS token) or ``tokens`` (every token, an array ``(T_i, D)`` per item).
``layer``: the output of main block ``layer`` (0-based; negative counts from the end; -1 = the
final output). CPU in float32; on CUDA bf16 autocast by default (``precision``).
"""

from __future__ import annotations

import io
import json
import os
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch

from d2v.data import transforms
from d2v.device import pick_device
from d2v.errors import InputError

from .inputs import Item, collect_inputs

POOLINGS = ("mean", "cls", "tokens")
MLFLOW_SCHEMES = ("models:/", "runs:/", "mlflow-artifacts:/")
DEFAULT_IMAGE_NORM = {"mean": [transforms.IMAGE_MEAN], "std": [transforms.IMAGE_STD], "resize": None}


@dataclass
class EncodeResult:
    keys: list[str]
    embeddings: np.ndarray | list[np.ndarray]  # (N, D) for mean/cls; N arrays (T_i, D) for tokens
    modality: str
    pooling: str
    layer: int
    dim: int
    model: str = ""
    skipped: list[tuple[str, str]] = field(default_factory=list)  # (item, reason) with on_error="skip"

    def __len__(self) -> int:
        return len(self.keys)


# ------------------------------------------------------------------------------------ model
def _download_mlflow_model(uri: str) -> Path:
    os.environ.setdefault("MLFLOW_DISABLE_TELEMETRY", "true")
    import mlflow
    import yaml

    from d2v.tracking.mlflow_utils import tracking_uri

    mlflow.set_tracking_uri(tracking_uri())
    try:
        local = Path(mlflow.artifacts.download_artifacts(artifact_uri=uri))
    except Exception as e:  # noqa: BLE001 - MLflow raises many types for a bad URI
        raise InputError(f"{uri}: cannot fetch the MLflow model: {type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}") from e
    mlmodel = local / "MLmodel"
    if mlmodel.is_file():
        meta = yaml.safe_load(mlmodel.read_text()) or {}
        arts = (((meta.get("flavors") or {}).get("python_function") or {}).get("artifacts") or {})
        entry = arts.get("model_dir")
        if isinstance(entry, dict) and entry.get("path") and (local / entry["path"]).is_dir():
            return local / entry["path"]
    for cfg in sorted(local.rglob("config.json")):
        try:
            if json.loads(cfg.read_text()).get("format", "").startswith("d2v-model/"):
                return cfg.parent
        except (json.JSONDecodeError, OSError, AttributeError):
            continue
    raise InputError(f"{uri}: the MLflow model holds no d2v model folder (log it with d2v.tracking.pyfunc.log_encoder)")


def resolve_model(model_or_path: str | Path, map_location: str = "cpu",
                  tokenizer_fallback: None | str | Path = None):
    """``(Data2Vec2, info)`` from a folder, checkpoint file, fairseq checkpoint or MLflow model URI.

    ``tokenizer_fallback``: the ``spm.model`` of a pretraining checkpoint's text model when none lies
    beside the checkpoint (``d2v encode`` passes the project's ``models/tokenizer/spm.model``)."""
    from d2v.models.model_dir import load_model_dir

    s = str(model_or_path)
    if s.startswith(MLFLOW_SCHEMES):
        folder = _download_mlflow_model(s)
        model, info = load_model_dir(folder, map_location)
        info["uri"] = s
        return model, info
    return load_model_dir(model_or_path, map_location, tokenizer_fallback=tokenizer_fallback)


# ------------------------------------------------------------------------------------ encoder
class Encoder:
    """A loaded model plus the input preparation it needs. ``Encoder.load(path_or_uri)``."""

    def __init__(self, model, info: dict, device: str = "auto", precision: str = "auto",
                 tokenizer: str | dict | None = None):
        self.device = pick_device(device)
        if precision not in ("auto", "fp32", "bf16"):
            raise InputError(f"precision must be auto, fp32 or bf16, got {precision!r}")
        self.bf16 = precision == "bf16" or (precision == "auto" and self.device.type == "cuda")
        self.model = model.to(self.device).eval()
        self.info = info
        self.cfg = model.cfg
        self.name = str(info.get("uri") or info.get("path") or "")
        pre = (info.get("extra") or {}).get("preprocess") or {}
        self.image_pre = {**DEFAULT_IMAGE_NORM, **(pre.get("image") or {})}
        self.speech_normalize = bool((pre.get("speech") or {}).get("normalize", True))
        self._tok_entry = info.get("tokenizer")
        if tokenizer is not None:
            from .tokenizers import tokenizer_entry_from_arg

            self._tok_entry = tokenizer_entry_from_arg(tokenizer) if isinstance(tokenizer, (str, Path)) else tokenizer
        self._tokenizer = None

    @classmethod
    def load(cls, model_or_path: str | Path, device: str = "auto", precision: str = "auto",
             tokenizer: str | dict | None = None,
             tokenizer_fallback: None | str | Path = None) -> Encoder:
        model, info = resolve_model(model_or_path, tokenizer_fallback=tokenizer_fallback)
        return cls(model, info, device=device, precision=precision, tokenizer=tokenizer)

    @property
    def modalities(self) -> list[str]:
        return list(self.cfg.modalities)

    @property
    def dim(self) -> int:
        return int(self.cfg.embed_dim)

    # -- preparation ------------------------------------------------------------------------
    @property
    def tokenizer(self):
        if self._tokenizer is None:
            from .tokenizers import load_tokenizer

            self._tokenizer = load_tokenizer(self._tok_entry, self.cfg.text.vocab_size, self.name)
        return self._tokenizer

    def prepare(self, item: Item) -> torch.Tensor:
        """One item -> its model input: image ``(C, H, W)``, waveform ``(S,)`` or ids ``(L,)``."""
        if item.modality == "image":
            return self._prepare_image(item)
        if item.modality == "speech":
            return self._prepare_audio(item)
        return self._prepare_text(item)

    def _image_array(self, item: Item) -> np.ndarray:
        """uint8 ``(H, W)`` or ``(H, W, 3)``; resized and centre-cropped first when the model asks."""
        from PIL import Image, UnidentifiedImageError

        pre = self.image_pre
        if item.offset >= 0:  # an image of an IDX file
            arr = np.asarray(item.data[item.offset])
            if not pre.get("resize"):
                return arr
            return np.asarray(self._resize_crop(Image.fromarray(arr), int(pre["resize"]), self.cfg.image.input_size))
        try:
            src = item.path if item.data is None else io.BytesIO(item.data)
            with Image.open(src) as im:
                im.load()
                if im.mode in ("1", "I", "I;16", "F"):
                    im = im.convert("L")
                elif im.mode not in ("L", "RGB"):
                    im = im.convert("RGB")
                if pre.get("resize"):
                    im = self._resize_crop(im, int(pre["resize"]), self.cfg.image.input_size)
                return np.asarray(im)
        except (OSError, UnidentifiedImageError, ValueError, SyntaxError) as e:
            raise InputError(f"{item.where}: cannot decode image: {e}") from e

    @staticmethod
    def _resize_crop(im, resize: int, size: int):
        from PIL import Image

        w, h = im.size
        s = resize / min(w, h)
        im = im.resize((max(size, round(w * s)), max(size, round(h * s))), Image.BICUBIC)
        w, h = im.size
        left, top = (w - size) // 2, (h - size) // 2
        return im.crop((left, top, left + size, top + size))

    def _prepare_image(self, item: Item) -> torch.Tensor:
        x = transforms.image_from_array(self._image_array(item))
        return transforms.image_tensor(x, self.cfg.image.input_size, self.cfg.image.in_chans,
                                       self.image_pre["mean"], self.image_pre["std"])

    def _prepare_audio(self, item: Item) -> torch.Tensor:
        src = item.path if item.data is None else io.BytesIO(item.data)
        x = transforms.read_audio(src, item.where, self.cfg.speech.sample_rate)
        enc = self.model.encoder("speech")
        if x.numel() == 0 or enc.local_encoder.output_length(x.numel()) < 2:
            raise InputError(f"{item.where}: {x.numel()} samples is too short for the model's feature extractor")
        return transforms.normalize_audio(x) if self.speech_normalize else x

    def _prepare_text(self, item: Item) -> torch.Tensor:
        ids = self.tokenizer(str(item.data))
        n = self.cfg.text.max_source_positions
        return torch.tensor(ids[:n], dtype=torch.long)

    # -- forward ----------------------------------------------------------------------------
    def _layer_index(self, layer: int) -> int:
        from d2v.models.data2vec2 import layer_index

        return layer_index(layer, len(self.model.blocks))

    @torch.no_grad()
    def forward(self, modality: str, sources: Sequence[torch.Tensor], pooling: str = "mean",
                layer: int = -1) -> list[np.ndarray]:
        """A batch of prepared inputs (same shape except text) -> one array per input."""
        if pooling not in POOLINGS:
            raise InputError(f"pooling must be one of {', '.join(POOLINGS)}, got {pooling!r}")
        if modality not in self.modalities:
            raise InputError(f"the model encodes {', '.join(self.modalities)}, not {modality}")
        enc = self.model.encoder(modality)
        if pooling == "cls" and enc.num_extra_tokens == 0:
            raise InputError(f"pooling 'cls' needs a CLS token; the {modality} encoder has none")
        self._layer_index(layer)
        if modality == "text":
            lengths = [int(s.numel()) for s in sources]
            src = torch.full((len(sources), max(lengths)), enc.mcfg.pad_idx, dtype=torch.long)
            for i, s in enumerate(sources):
                src[i, : s.numel()] = s
            pad = src.eq(enc.mcfg.pad_idx)  # on the CPU: "nothing padded" is decided without a device sync
        else:
            src = torch.stack(list(sources))
            pad = None
        enc.check_input(src)  # on the CPU, before the transfer (no device sync)
        src = src.to(self.device, non_blocking=True)
        with torch.autocast(device_type=self.device.type, dtype=torch.bfloat16, enabled=self.bf16):
            f = self.model.features(src, modality, pad, layer)
        if pooling == "cls":
            return list(f.extra[:, 0].float().cpu().numpy())
        x = f.x.float()
        padded = f.padding_mask is not None
        valid = (~f.padding_mask).to(x.dtype) if padded else torch.ones(x.shape[:2], dtype=x.dtype, device=x.device)
        if pooling == "mean":
            pooled = (x * valid.unsqueeze(-1)).sum(1) / valid.sum(1, keepdim=True).clamp_min(1)
            return list(pooled.cpu().numpy())
        xs = x.cpu().numpy()
        out: list[np.ndarray] = []
        for i in range(xs.shape[0]):
            n = int(valid[i].sum()) if padded else xs.shape[1]
            out.append(np.ascontiguousarray(xs[i, :n]))
        return out

    # -- many items -------------------------------------------------------------------------
    def encode_items(self, items: Sequence[Item], pooling: str = "mean", layer: int = -1, batch_size: int = 16,
                     progress: bool = False, on_error: str = "raise") -> EncodeResult:
        """Encode ``items`` (one modality) in batches; results in the items' order."""
        if not items:
            raise InputError("nothing to encode")
        if batch_size < 1:
            raise InputError(f"batch_size must be >= 1, got {batch_size}")
        if on_error not in ("raise", "skip"):
            raise InputError(f"on_error must be raise or skip, got {on_error!r}")
        modality = items[0].modality
        if any(it.modality != modality for it in items):
            raise InputError("items of several modalities: encode them one modality at a time")
        if pooling not in POOLINGS:
            raise InputError(f"pooling must be one of {', '.join(POOLINGS)}, got {pooling!r}")
        self._layer_index(layer)
        from tqdm import tqdm

        results: list[np.ndarray | None] = [None] * len(items)
        skipped: list[tuple[str, str]] = []
        window = batch_size * 8
        bar = tqdm(total=len(items), disable=not progress, unit=modality if modality != "speech" else "clip",
                   desc=f"encode {modality}", dynamic_ncols=True)
        try:
            for start in range(0, len(items), window):
                prepared: list[tuple[int, torch.Tensor]] = []
                for i in range(start, min(start + window, len(items))):
                    try:
                        prepared.append((i, self.prepare(items[i])))
                    except InputError as e:
                        if on_error == "raise":
                            raise
                        skipped.append((items[i].key, str(e)))
                        bar.update(1)
                for group in _batches(modality, prepared, batch_size):
                    embs = self.forward(modality, [t for _, t in group], pooling, layer)
                    for (i, _), emb in zip(group, embs):
                        results[i] = emb
                    bar.update(len(group))
        finally:
            bar.close()
        keep = [i for i, r in enumerate(results) if r is not None]
        if not keep:
            raise InputError(f"nothing could be encoded: {len(skipped)} of {len(items)} items failed "
                             f"(first: {skipped[0][1] if skipped else '?'})")
        keys = [items[i].key for i in keep]
        embs = [results[i] for i in keep]
        emb_out: np.ndarray | list[np.ndarray] = embs if pooling == "tokens" else np.stack(embs).astype(np.float32)  # type: ignore[arg-type]
        return EncodeResult(keys, emb_out, modality, pooling, layer, self.dim, self.name, skipped)


def _batches(modality: str, prepared: list[tuple[int, torch.Tensor]], batch_size: int) -> Iterable[list]:
    """Images: in order. Text: sorted by length (padding is masked). Audio: equal lengths only."""
    if modality == "image":
        for j in range(0, len(prepared), batch_size):
            yield prepared[j : j + batch_size]
        return
    order = sorted(prepared, key=lambda p: p[1].numel())
    if modality == "text":
        for j in range(0, len(order), batch_size):
            yield order[j : j + batch_size]
        return
    groups: dict[int, list] = {}
    for p in order:
        groups.setdefault(p[1].numel(), []).append(p)
    for g in groups.values():
        for j in range(0, len(g), batch_size):
            yield g[j : j + batch_size]


# ------------------------------------------------------------------------------------ API
def encode(model_or_path: str | Path | Encoder, inputs, modality: str | None = None,
           pooling: str = "mean", layer: int = -1, batch_size: int = 16, device: str = "auto",
           precision: str = "auto", progress: bool = False, tokenizer: str | None = None,
           limit: int | None = None, on_error: str = "raise") -> EncodeResult:
    """Encode files / folders / manifests (see ``d2v.inference.inputs``) with a model.

    ``model_or_path``: an ``Encoder``, a model folder, a checkpoint file or an MLflow model URI.
    Returns an ``EncodeResult`` with ``keys`` and ``embeddings`` in input order.
    """
    enc = model_or_path if isinstance(model_or_path, Encoder) else Encoder.load(
        model_or_path, device=device, precision=precision, tokenizer=tokenizer)
    mod, items = collect_inputs(inputs, modality, allowed=enc.modalities, limit=limit)
    return enc.encode_items(items, pooling=pooling, layer=layer, batch_size=batch_size, progress=progress,
                            on_error=on_error)


def encode_texts(model_or_path: str | Path | Encoder, lines: Sequence[str], keys: Sequence[str] | None = None,
                 **kw: Any) -> EncodeResult:
    """Encode text lines given in memory (``keys`` default to ``0..N-1``)."""
    enc = model_or_path if isinstance(model_or_path, Encoder) else Encoder.load(
        model_or_path, **{k: kw.pop(k) for k in ("device", "precision", "tokenizer") if k in kw})
    if "text" not in enc.modalities:
        raise InputError(f"the model encodes {', '.join(enc.modalities)}, not text")
    keys = [str(i) for i in range(len(lines))] if keys is None else [str(k) for k in keys]
    if len(keys) != len(lines):
        raise InputError(f"{len(keys)} keys for {len(lines)} lines")
    items = [Item(k, "text", None, str(s)) for k, s in zip(keys, lines)]
    return enc.encode_items(items, **kw)


# ------------------------------------------------------------------------------------ output
def write_embeddings(result: EncodeResult, out: str | Path) -> list[Path]:
    """Write ``.npy`` (+ ``<stem>.keys.json``) or ``.parquet``; returns the files written.

    * ``.npy``, mean/cls: an ``(N, D)`` float32 array; keys JSON: ``{"keys": [...], ...}``.
    * ``.npy``, tokens: all tokens stacked ``(sum T_i, D)``; keys JSON lists per item
      ``{"key", "start", "length"}`` (rows ``start:start+length``).
    * ``.parquet``: columns ``key``, ``embedding`` (list<float32>, mean/cls) or ``tokens``
      (list<list<float32>>) and ``num_tokens``; run metadata in the schema metadata.
    Written to a temp file and renamed.
    """
    out = Path(out)
    meta = {"modality": result.modality, "pooling": result.pooling, "layer": result.layer, "dim": result.dim,
            "model": result.model, "count": len(result.keys)}
    out.parent.mkdir(parents=True, exist_ok=True)
    suffix = out.suffix.lower()
    if suffix == ".npy":
        keys_path = out.with_suffix(".keys.json")
        if result.pooling == "tokens":
            arrs = result.embeddings
            starts = np.cumsum([0] + [a.shape[0] for a in arrs])[:-1]
            arr = np.concatenate(arrs).astype(np.float32) if arrs else np.zeros((0, result.dim), np.float32)
            keys: Any = [{"key": k, "start": int(s), "length": int(a.shape[0])} for k, s, a in zip(result.keys, starts, arrs)]
        else:
            arr, keys = np.asarray(result.embeddings, dtype=np.float32), list(result.keys)
        tmp = out.with_name(out.name + ".tmp.npy")
        np.save(tmp, arr)
        os.replace(tmp, out)
        tmpk = keys_path.with_name(keys_path.name + ".tmp")
        tmpk.write_text(json.dumps({**meta, "keys": keys}, indent=1))
        os.replace(tmpk, keys_path)
        return [out, keys_path]
    if suffix == ".parquet":
        import pyarrow as pa
        import pyarrow.parquet as pq

        cols: dict[str, Any] = {"key": pa.array(result.keys, pa.string())}
        if result.pooling == "tokens":
            cols["tokens"] = pa.array([a.astype(np.float32).tolist() for a in result.embeddings],
                                      pa.list_(pa.list_(pa.float32())))
            cols["num_tokens"] = pa.array([int(a.shape[0]) for a in result.embeddings], pa.int32())
        else:
            emb = np.asarray(result.embeddings, dtype=np.float32)
            cols["embedding"] = pa.FixedSizeListArray.from_arrays(pa.array(emb.reshape(-1)), emb.shape[1]) \
                if emb.size else pa.array([], pa.list_(pa.float32(), max(result.dim, 1)))
        table = pa.table(cols).replace_schema_metadata({"d2v": json.dumps(meta)})
        tmp = out.with_name(out.name + ".tmp")
        pq.write_table(table, tmp)
        os.replace(tmp, out)
        return [out]
    raise InputError(f"{out}: output must end in .npy or .parquet")


def read_embeddings(path: str | Path) -> tuple[list[str], np.ndarray | list[np.ndarray], dict]:
    """Read back what ``write_embeddings`` wrote: ``(keys, embeddings, meta)``."""
    path = Path(path)
    if path.suffix == ".npy":
        arr = np.load(path, allow_pickle=False)
        meta = json.loads(path.with_suffix(".keys.json").read_text())
        keys = meta.pop("keys")
        if meta["pooling"] == "tokens":
            return [k["key"] for k in keys], [arr[k["start"]: k["start"] + k["length"]] for k in keys], meta
        return keys, arr, meta
    import pyarrow.parquet as pq

    t = pq.read_table(path)
    meta = json.loads((t.schema.metadata or {}).get(b"d2v", b"{}"))
    keys = t.column("key").to_pylist()
    if "tokens" in t.column_names:
        return keys, [np.asarray(v, dtype=np.float32) for v in t.column("tokens").to_pylist()], meta
    emb = np.asarray(t.column("embedding").to_pylist(), dtype=np.float32)
    return keys, emb, meta
