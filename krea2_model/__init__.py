"""Krea 2 in pure PyTorch: the transformer, the Qwen3-VL text taps, every file format.

Never imports ``comfy``: the host adapters live in ``nodes/``.
"""

from . import sampling
from .attention import attention, set_attention_backend
from .checkpoint import CanonicalCheckpoint, load_transformer
from .errors import (ConditioningError, Krea2Error, Krea2FileError, LoraError, MissingTensorsError, NotKrea2Error,
                     PickleRefusedError, ShapeMismatchError, TokenizerNotFoundError)
from .transformer import Krea2Config, Krea2Transformer

__all__ = [
    "sampling", "attention", "set_attention_backend", "CanonicalCheckpoint", "load_transformer", "Krea2Config",
    "Krea2Transformer", "Krea2Error", "Krea2FileError", "ConditioningError", "LoraError", "MissingTensorsError",
    "NotKrea2Error", "PickleRefusedError", "ShapeMismatchError", "TokenizerNotFoundError", "load_text_encoder",
]


def load_text_encoder(*args, **kwargs):
    """See :func:`krea2_model.text_encoder.load_text_encoder`."""
    from .text_encoder import load_text_encoder as _load
    return _load(*args, **kwargs)
