"""Embeddings from a trained or converted model: ``encode(model, inputs) -> EncodeResult``.

See ``d2v.inference.encode`` (the API and ``d2v encode``) and ``d2v.inference.inputs`` (files,
folders and manifests -> items).
"""

from .encode import Encoder, EncodeResult, encode, encode_texts, resolve_model, write_embeddings
from .inputs import Item, collect_inputs

__all__ = ["EncodeResult", "Encoder", "Item", "collect_inputs", "encode", "encode_texts", "resolve_model",
           "write_embeddings"]
