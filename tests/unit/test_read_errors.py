"""Reading errors name the real cause (issue 19): only bytes that do not parse say "download it again"."""

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import save_file

from krea2_model.errors import HostComponentError, Krea2FileError, read_error


def _real_parse_error(tmp_path):
    """The exception safetensors itself raises on a truncated file."""
    p = tmp_path / "t.safetensors"
    save_file({"w": torch.randn(64, 64)}, str(p))
    data = p.read_bytes()
    p.write_bytes(data[: len(data) // 2])
    with pytest.raises(Exception) as e:
        with safe_open(str(p), framework="pt") as f:
            f.get_tensor("w")
    return e.value


def test_only_damaged_bytes_say_download_again(tmp_path):
    damaged = read_error("m.safetensors", _real_parse_error(tmp_path))
    assert isinstance(damaged, Krea2FileError) and "download it again" in str(damaged)
    for e in (RuntimeError("comfy-aimdo is not initialized"), MemoryError("cannot allocate"),
              torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB"),
              PermissionError(13, "Permission denied"), ImportError("No module named 'comfy_aimdo'"),
              OSError(5, "Input/output error")):
        out = read_error("m.safetensors", e)
        assert "download" not in str(out), (e, out)
        assert "m.safetensors" in str(out) and str(e) in str(out)


def test_each_cause_is_named():
    aimdo = read_error("m.safetensors", RuntimeError("comfy-aimdo is not initialized"))
    assert isinstance(aimdo, HostComponentError) and "not a problem with the file" in str(aimdo)
    oom = read_error("m.safetensors", torch.OutOfMemoryError("CUDA out of memory"))
    # stays the out-of-memory type the host recognises (it frees models and says so)
    assert isinstance(oom, torch.OutOfMemoryError) and "out of memory" in str(oom)
    assert isinstance(read_error("m", MemoryError("x")), MemoryError)
    assert "permission denied" in str(read_error("m", PermissionError(13, "Permission denied")))
