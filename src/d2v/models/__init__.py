"""The data2vec 2.0 model: config, encoders, shared blocks, decoders, EMA teacher, masking."""

from .config import ConfigError, DecoderConfig, ImageConfig, ModelConfig, SpeechConfig, TextConfig
from .data2vec2 import CollapseError, Data2Vec2, Data2VecOutput
from .encoders import InputError

__all__ = [
    "CollapseError", "ConfigError", "Data2Vec2", "Data2VecOutput", "DecoderConfig", "ImageConfig",
    "InputError", "ModelConfig", "SpeechConfig", "TextConfig",
]
