"""Typed errors for everything a user can get wrong.

Every message names the file or input, says what was wrong and what to do. Node code catches
``Krea2Error`` and re-raises it unchanged, so ComfyUI shows the message as the node error.
"""

from __future__ import annotations


class Krea2Error(ValueError):
    """Base of every error this package raises on bad input."""


class Krea2FileError(Krea2Error):
    """A file that cannot be read at all: missing, truncated, corrupt, or an unsupported container."""


class PickleRefusedError(Krea2FileError):
    """A pickle-based checkpoint (.ckpt/.pt/.pth/.bin). We never unpickle: it can run arbitrary code."""


class QuantFormatError(Krea2FileError):
    """A quantized weight in a format (or with a scale layout) that cannot be read back exactly."""


class NotKrea2Error(Krea2Error):
    """A readable file whose tensors belong to another model."""


class WrongTextEncoderError(NotKrea2Error):
    """A readable file that is not the Qwen3-VL language tower Krea 2 needs (another Qwen, a vision tower
    alone, not a text model at all); the message says what it looks like."""


class MissingTensorsError(Krea2Error):
    """A Krea 2 file that lacks tensors the model needs."""


class ShapeMismatchError(Krea2Error):
    """A tensor whose shape does not fit the configuration inferred from the rest of the file."""


class ConditioningError(Krea2Error):
    """Conditioning that does not fit the model (wrong width: probably another text encoder)."""


class TokenizerNotFoundError(Krea2Error):
    """No Qwen tokenizer beside the text encoder nor in the host."""


class TokenizerMismatchError(Krea2Error):
    """A tokenizer whose vocabulary disagrees with the one the text encoder was trained with (size, special
    tokens or token strings, as far as the file records them)."""


class LoraError(Krea2Error):
    """A LoRA file that cannot be applied to a Krea 2 model."""


def first_names(names, n: int = 5) -> str:
    """``'a, b, c (+12 more)'``: the first ``n`` of ``names`` for an error message."""
    names = list(names)
    head = ", ".join(names[:n])
    return head + (f" (+{len(names) - n} more)" if len(names) > n else "")
