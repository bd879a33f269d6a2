"""The MLflow model flavour of a d2v encoder: a pyfunc that returns embeddings.

``log_encoder(model_dir, run_id)`` logs a model folder (``d2v.models.model_dir``) as the pyfunc
model's artifact ``model_dir``; ``mlflow models serve -m models:/<name>@champion --env-manager local``
then answers ``POST /invocations``.

Input: a DataFrame, one row per item; each row fills exactly ONE of these (string) columns:

=============== ===============================================================================
``image``       base64 of an image file's bytes (PNG, JPEG, ...)
``image_path``  path of an image file readable by the serving process
``audio``       base64 of an audio file's bytes (FLAC, WAV, OGG), at the model's sample rate
``audio_path``  path of an audio file readable by the serving process
``text``        a text line
``key``         optional: an id echoed back (default: the row number)
=============== ===============================================================================

Params (optional, ``{"params": {...}}`` in the request): ``pooling`` = ``mean`` (default) | ``cls``
| ``tokens``; ``layer`` = the block whose output is returned (default -1, the last).

Output: a DataFrame with ``key`` (str), ``modality``, ``num_tokens`` (int) and ``embedding``: a list
of ``D`` floats (mean/cls), or a list of ``num_tokens`` lists of ``D`` floats (tokens).

Example request body::

    {"dataframe_records": [{"text": "a line"}, {"image": "<base64 PNG>", "key": "img1"}],
     "params": {"pooling": "mean", "layer": -1}}

Rows of several modalities may be mixed (each is encoded with its own encoder); a row whose
modality the model lacks, or whose content does not decode, fails the request with a message
naming the row.
"""

from __future__ import annotations

import base64
import binascii
import os
import warnings
from pathlib import Path
from typing import Any

import mlflow
import mlflow.pyfunc

CONTENT_COLUMNS = {"image": "image", "image_path": "image", "audio": "speech", "audio_path": "speech", "text": "text"}
INPUT_COLUMNS = ["key", *CONTENT_COLUMNS]


def signature():
    from mlflow.models import ModelSignature
    from mlflow.types.schema import ColSpec, ParamSchema, ParamSpec, Schema

    return ModelSignature(
        inputs=Schema([ColSpec("string", c, required=False) for c in INPUT_COLUMNS]),
        params=ParamSchema([ParamSpec("pooling", "string", "mean"), ParamSpec("layer", "long", -1)]),
    )


def _bad_request(msg: str) -> Exception:
    from mlflow.exceptions import MlflowException
    from mlflow.protos.databricks_pb2 import INVALID_PARAMETER_VALUE

    return MlflowException(msg, error_code=INVALID_PARAMETER_VALUE)


def _present(v: Any) -> bool:
    if v is None:
        return False
    try:
        import pandas as pd

        if pd.isna(v):
            return False
    except (TypeError, ValueError):
        pass
    return not (isinstance(v, str) and v == "")


class EncoderModel(mlflow.pyfunc.PythonModel):
    """pyfunc wrapper around ``d2v.inference.Encoder``; ``D2V_DEVICE`` picks the device (default auto)."""

    def load_context(self, context) -> None:
        from d2v.inference.encode import Encoder

        self.encoder = Encoder.load(context.artifacts["model_dir"], device=os.environ.get("D2V_DEVICE", "auto"))

    def predict(self, context, model_input, params=None):  # no type hints: the signature is explicit
        import pandas as pd

        from d2v.errors import InputError
        from d2v.inference.inputs import Item

        params = params or {}
        pooling = str(params.get("pooling", "mean"))
        layer = int(params.get("layer", -1))
        df = model_input if isinstance(model_input, pd.DataFrame) else pd.DataFrame(model_input)
        unknown = [c for c in df.columns if c not in INPUT_COLUMNS]
        if unknown:
            raise _bad_request(f"unknown input columns {unknown}; expected some of {INPUT_COLUMNS}")
        items: list[Item] = []
        for i, row in enumerate(df.to_dict(orient="records")):
            key = str(row["key"]) if _present(row.get("key")) else str(i)
            filled = [c for c in CONTENT_COLUMNS if _present(row.get(c))]
            if len(filled) != 1:
                raise _bad_request(f"row {i} (key {key}): fill exactly one of {list(CONTENT_COLUMNS)}, got {filled or 'none'}")
            col = filled[0]
            mod, val = CONTENT_COLUMNS[col], row[col]
            if mod not in self.encoder.modalities:
                raise _bad_request(f"row {i} (key {key}): column {col!r} is {mod}, but the model encodes "
                                   f"{', '.join(self.encoder.modalities)}")
            if col == "text":
                items.append(Item(key, "text", None, str(val)))
            elif col.endswith("_path"):
                p = Path(str(val))
                if not p.is_file():
                    raise _bad_request(f"row {i} (key {key}): no such file {p}")
                items.append(Item(key, mod, p))
            else:
                try:
                    data = base64.b64decode(str(val), validate=True)
                except (binascii.Error, ValueError) as e:
                    raise _bad_request(f"row {i} (key {key}): column {col!r} is not valid base64: {e}") from e
                items.append(Item(key, mod, None, data))
        rows: list[dict[str, Any] | None] = [None] * len(items)
        try:
            for mod in dict.fromkeys(it.modality for it in items):
                idx = [j for j, it in enumerate(items) if it.modality == mod]
                res = self.encoder.encode_items([items[j] for j in idx], pooling=pooling, layer=layer)
                for j, emb in zip(idx, res.embeddings):
                    rows[j] = {"key": items[j].key, "modality": mod,
                               "num_tokens": int(emb.shape[0]) if pooling == "tokens" else 1,
                               "embedding": emb.astype("float32").tolist()}
        except InputError as e:
            raise _bad_request(str(e)) from e
        return pd.DataFrame(rows, columns=["key", "modality", "num_tokens", "embedding"])


def _requirements() -> list[str]:
    """Pinned versions of what the encoder imports (``d2v`` itself must be installed where it is served)."""
    from importlib.metadata import PackageNotFoundError, version

    out = []
    for pkg in ("torch", "numpy", "pandas", "pillow", "soundfile", "sentencepiece", "regex", "tqdm", "omegaconf", "mlflow"):
        try:
            out.append(f"{pkg}=={version(pkg)}")
        except PackageNotFoundError:
            continue
    return out


def log_encoder(model_dir: Path, run_id: str, artifact_path: str = "encoder",
                registered_model_name: str | None = None) -> str:
    """Log a model folder as a pyfunc encoder into the existing run ``run_id``; return its URI.

    ``models:/<name>/<version>`` when ``registered_model_name`` is given (it is registered),
    else ``runs:/<run_id>/<artifact_path>``. Serve it with
    ``mlflow models serve -m <uri> --env-manager local`` (``d2v`` must be importable there).
    """
    from d2v.errors import InputError
    from d2v.models.model_dir import CONFIG_FILE, FORMAT

    from .mlflow_utils import tracking_uri

    model_dir = Path(model_dir)
    cfg = model_dir / CONFIG_FILE
    if not cfg.is_file() or FORMAT not in cfg.read_text():
        raise InputError(f"{model_dir}: not a d2v model folder (save it with d2v.models.model_dir.save_model_dir)")
    os.environ.setdefault("MLFLOW_DISABLE_TELEMETRY", "true")
    mlflow.set_tracking_uri(tracking_uri())
    active = mlflow.active_run()
    if active is not None and active.info.run_id != run_id:
        raise RuntimeError(f"another MLflow run ({active.info.run_id}) is active; end it before logging into {run_id}")
    # "model from code": the logged model names a source file, so loading it unpickles nothing
    code = Path(__file__).with_name("pyfunc_model.py")
    kwargs = dict(name=artifact_path, python_model=str(code), artifacts={"model_dir": str(model_dir)},
                  signature=signature(), pip_requirements=_requirements(), registered_model_name=registered_model_name)
    with warnings.catch_warnings():
        # no input example on purpose (it would load the model while logging); the signature is explicit
        warnings.filterwarnings("ignore", message=".*input example.*")
        if active is not None:
            info = mlflow.pyfunc.log_model(**kwargs)
        else:
            with mlflow.start_run(run_id=run_id):
                info = mlflow.pyfunc.log_model(**kwargs)
    if registered_model_name:
        return f"models:/{registered_model_name}/{info.registered_model_version}"
    return f"runs:/{run_id}/{artifact_path}"
