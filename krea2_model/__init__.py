"""Krea 2 in pure PyTorch: the transformer, the Qwen3-VL text taps, every file format.

Never imports ``comfy``: the host adapters live in ``nodes/``. Grouped by concern: ``model/`` (the
transformer), ``text/`` (the Qwen3-VL tower, tokenizer, prompt layout and encoder), ``formats/`` (every
file layout and LoRA style), ``tiny/`` (generators of tiny random assets); ``sampling`` and ``errors``
serve all of them. This module is the public surface (docs/architecture.md, "Public surface").
"""

from . import sampling
from .errors import (ConditioningError, Krea2Error, Krea2FileError, LoraError, MissingTensorsError, NotKrea2Error,
                     PickleRefusedError, ShapeMismatchError, TokenizerMismatchError, TokenizerNotFoundError)
from .formats.transformer_file import CanonicalCheckpoint, load_transformer
from .model.attention import attention
from .model.transformer import Krea2Config, Krea2Transformer

__all__ = [
    "sampling", "attention", "CanonicalCheckpoint", "load_transformer", "Krea2Config",
    "Krea2Transformer", "Krea2Error", "Krea2FileError", "ConditioningError", "LoraError", "MissingTensorsError",
    "NotKrea2Error", "PickleRefusedError", "ShapeMismatchError", "TokenizerMismatchError", "TokenizerNotFoundError",
    "load_text_encoder",
]


def load_text_encoder(*args, **kwargs):
    """See :func:`krea2_model.text.encoder.load_text_encoder` (imported on first use: the tokenizer
    library is only needed by the text side)."""
    from .text.encoder import load_text_encoder as _load
    return _load(*args, **kwargs)
