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


class HostComponentError(Krea2Error):
    """A part of the host (or of the Python environment) failed while reading a file that is fine."""


# What parsers say about bytes that are not what the header promised: the only case to download again.
_DAMAGED = ("header", "incomplete", "invalid", "truncat", "unexpected end", "deserializ", "out of range",
            "out of bounds", "buffer", "corrupt", "magic", "metadata", "mmap length", "not enough")


def _is_oom(e: BaseException) -> bool:
    if isinstance(e, MemoryError) or type(e).__name__ == "OutOfMemoryError":
        return True
    text = str(e).lower()
    return isinstance(e, RuntimeError) and ("out of memory" in text or "can't allocate memory" in text
                                            or "not enough memory" in text)


def read_error(path, e: BaseException) -> BaseException:
    """The exception to raise when reading the tensors of ``path`` failed with ``e``, naming the real cause.
    Only a file whose bytes do not parse (truncated, damaged) is told to download again; out of memory stays an
    out-of-memory error (the host's handling of it, freeing models, keeps working), a missing or unreadable file
    and a failing host component each say what they are."""
    what = f"{type(e).__name__}: {e}"
    if _is_oom(e):
        msg = (f"{path}: out of memory while reading the tensors ({what}). The file is fine: free memory (close "
               "other programs, unload models) or use a smaller file (fp8, GGUF), then run again.")
        try:
            return type(e)(msg)
        except Exception:  # an exception type that takes other arguments
            return MemoryError(msg)
    if isinstance(e, PermissionError):
        return Krea2FileError(f"{path}: permission denied while reading ({what}). Give the user running ComfyUI "
                              "read access to the file.")
    if isinstance(e, FileNotFoundError):
        return Krea2FileError(f"{path}: the file disappeared while it was read ({what}). Put it back in the "
                              "models folder and run again.")
    if isinstance(e, (ImportError, AttributeError, NotImplementedError)) or "not initialized" in str(e).lower() \
            or "aimdo" in str(e).lower():
        return HostComponentError(f"{path}: a part of ComfyUI failed while reading the file ({what}). This is "
                                  "not a problem with the file: check the ComfyUI install (update ComfyUI and its "
                                  "requirements, e.g. comfy-aimdo), or start it with --disable-dynamic-vram.")
    if isinstance(e, OSError) and not any(s in str(e).lower() for s in _DAMAGED):
        return Krea2FileError(f"{path}: the system could not read the file ({what}). Check the disk or network "
                              "share it is on, then run again.")
    if any(s in str(e).lower() for s in _DAMAGED) or type(e).__name__ in ("SafetensorError", "HeaderTooLarge"):
        return Krea2FileError(f"{path}: cannot read the tensors ({what}). The file is truncated or damaged; "
                              "download it again.")
    return Krea2FileError(f"{path}: cannot read the tensors ({what}).")
