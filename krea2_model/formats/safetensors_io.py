"""Reading tensors lazily from safetensors files, folders of shards, or in-memory state dicts.

Nothing here unpickles: pickle-based checkpoints are refused with :class:`PickleRefusedError`.
Tensors are read one at a time from memory-mapped files, so loading never holds a second copy of
the whole checkpoint.
"""

from __future__ import annotations

import json
import os
import struct
from typing import Callable, Iterator, Mapping

import torch

from ..errors import Krea2FileError, PickleRefusedError, read_error

PICKLE_SUFFIXES = (".ckpt", ".pt", ".pth", ".bin", ".pkl", ".pickle")
_ST_DTYPES = {"F64": torch.float64, "F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16,
              "F8_E4M3": torch.float8_e4m3fn, "F8_E5M2": torch.float8_e5m2, "I64": torch.int64,
              "I32": torch.int32, "I16": torch.int16, "I8": torch.int8, "U8": torch.uint8, "BOOL": torch.bool}


class TensorSource(Mapping):
    """A read-only mapping ``key -> tensor`` that loads on access, plus ``shape(key)``, ``dtype(key)``,
    ``metadata`` (the safetensors ``__metadata__`` of the first file), ``where`` (the path, for messages)
    and ``file_of(key)`` (the file holding a tensor: the file itself, or its shard in a folder)."""

    def __init__(self, shapes: dict, getter: Callable[[str], torch.Tensor], where: str, metadata=None, dtypes=None,
                 reader: Callable[[str, torch.Tensor], torch.Tensor] | None = None,
                 files: Callable[[str], str] | None = None):
        self._shapes = shapes
        self._get = getter
        self.where = where
        self.metadata = metadata or {}
        self._dtypes = dtypes or {}
        self._reader = reader
        self._files = files

    def file_of(self, key) -> str:
        """Path of the file that holds tensor ``key`` (``where`` for in-memory sources)."""
        if key not in self._shapes:
            raise KeyError(key)
        return self._files(key) if self._files is not None else self.where

    @property
    def streams(self) -> bool:
        """True when :meth:`read_into` reads from files (in-memory sources just copy)."""
        return self._reader is not None

    def read_into(self, key, out: torch.Tensor) -> torch.Tensor:
        """Fill the contiguous CPU tensor ``out`` (same number of elements, any dtype: values are
        cast) with tensor ``key``. Files are read with plain reads in chunks of at most
        :data:`READ_CHUNK` bytes, never memory-mapped, so the process holds ``out`` plus one chunk,
        not the file's pages, and a cast to a smaller dtype never materialises the source dtype."""
        if key not in self._shapes:
            raise KeyError(key)
        if self._reader is not None:
            return self._reader(key, out)
        t = self._get(key)
        out.view(-1).copy_(t.reshape(-1))
        return out

    def __getitem__(self, key):
        if key not in self._shapes:
            raise KeyError(key)
        return self._get(key)

    def __iter__(self) -> Iterator[str]:
        return iter(self._shapes)

    def __len__(self):
        return len(self._shapes)

    def shape(self, key) -> tuple:
        return tuple(self._shapes[key])

    def dtype(self, key):
        return self._dtypes.get(key)

    def shapes(self) -> dict:
        return dict(self._shapes)


def _check_not_pickle(path: str) -> None:
    low = path.lower()
    if low.endswith(PICKLE_SUFFIXES):
        raise PickleRefusedError(
            f"{path}: this is a pickle checkpoint ({os.path.splitext(low)[1]}). Krea 2 loaders never unpickle files, "
            "because loading a pickle can run arbitrary code. Use the .safetensors release of this model, or convert "
            "the file to safetensors with a tool you trust.")

def _sniff_pickle(path: str) -> None:
    """Called when a file does not parse as safetensors: name a torch.save/pickle file as such."""
    with open(path, "rb") as f:
        head = f.read(4)
    if head == b"PK\x03\x04" or (head[:1] == b"\x80" and head[1:2] in (b"\x02", b"\x03", b"\x04", b"\x05")):
        raise PickleRefusedError(
            f"{path}: this file is a pickle/zip checkpoint (torch.save format) despite its name. Krea 2 loaders never "
            "unpickle files. Use a .safetensors file.")


def read_safetensors_header(path: str) -> tuple[dict, dict]:
    """``(tensors, metadata)`` from the header alone, with errors that say what is wrong with the file."""
    try:
        size = os.path.getsize(path)
    except OSError as e:
        raise Krea2FileError(f"{path}: cannot open the file ({e.strerror}). Check the path and the file's permissions.")
    _check_not_pickle(path)
    with open(path, "rb") as f:
        raw = f.read(8)
        if len(raw) < 8:
            _sniff_pickle(path)
            raise Krea2FileError(f"{path}: the file is {size} bytes, too short to be safetensors: it is truncated or "
                                 "empty. Download it again.")
        n = struct.unpack("<Q", raw)[0]
        if n > size - 8 or n > 100_000_000:
            _sniff_pickle(path)
            raise Krea2FileError(f"{path}: not a valid safetensors file (header length {n} exceeds the file size "
                                 f"{size}). The file is truncated or not safetensors; download it again.")
        try:
            header = json.loads(f.read(n))
        except (UnicodeDecodeError, json.JSONDecodeError):
            _sniff_pickle(path)
            raise Krea2FileError(f"{path}: the safetensors header is not valid JSON: the file is corrupt. "
                                 "Download it again.")
    meta = header.pop("__metadata__", None) or {}
    end = 0
    for k, v in header.items():
        try:
            end = max(end, int(v["data_offsets"][1]))
        except (KeyError, TypeError, IndexError, ValueError):
            raise Krea2FileError(f"{path}: the safetensors header entry for '{k}' is malformed: the file is corrupt.")
    if 8 + n + end > size:
        raise Krea2FileError(
            f"{path}: the file is truncated: its header describes {8 + n + end} bytes but the file has {size}. "
            "The download was probably interrupted; download it again.")
    return header, meta


#: bytes read per chunk when a tensor is streamed into a buffer of another dtype
READ_CHUNK = 16 * 2 ** 20


def _read_exact(fd: int, view: memoryview, offset: int, path: str, key: str) -> None:
    done = 0
    while done < len(view):
        n = os.preadv(fd, [view[done:]], offset + done)
        if n <= 0:
            raise Krea2FileError(f"{path}: the file ended while reading tensor '{key}': it is truncated. "
                                 "Download it again.")
        done += n


def _stream_into(path: str, base: int, key: str, info: dict, out: torch.Tensor, scratch: dict) -> torch.Tensor:
    src_dtype = _ST_DTYPES.get(info.get("dtype"))
    if src_dtype is None:
        raise Krea2FileError(f"{path}: tensor '{key}' has dtype {info.get('dtype')!r}, which Krea 2 cannot read.")
    start, end = (int(v) for v in info["data_offsets"])
    numel = 1
    for d in info["shape"]:
        numel *= int(d)
    if out.numel() != numel or not out.is_contiguous() or out.device.type != "cpu":
        raise ValueError(f"read_into('{key}'): need a contiguous CPU tensor of {numel} elements, got "
                         f"{tuple(out.shape)} on {out.device}")
    if end - start != numel * src_dtype.itemsize:
        raise Krea2FileError(f"{path}: tensor '{key}' spans {end - start} bytes, not {numel} x "
                             f"{src_dtype.itemsize}: the header is corrupt. Download the file again.")
    flat = out.view(-1)
    fd = os.open(path, os.O_RDONLY)
    try:
        if out.dtype == src_dtype:  # same dtype: read straight into the destination
            if numel:
                _read_exact(fd, memoryview(flat.view(torch.uint8).numpy()), base + start, path, key)
            return out
        per = max(1, READ_CHUNK // src_dtype.itemsize)
        # One read buffer (and one float32 staging buffer) for the whole load: allocating and freeing
        # chunk-sized buffers per tensor between the kept allocations leaves holes in the malloc heap
        # whose pages stay resident (measured: +0.45 GiB on a 2.85 GiB file).
        need = min(per, numel) * src_dtype.itemsize
        if scratch.get("buf") is None or scratch["buf"].numel() < need:
            scratch["buf"] = torch.empty(max(need, min(READ_CHUNK, 1 << 20)), dtype=torch.uint8)
            scratch["f32"] = None
        buf = scratch["buf"]
        direct = out.dtype.is_floating_point and out.dtype.itemsize >= 2
        if not direct and (scratch.get("f32") is None or scratch["f32"].numel() < min(per, numel)):
            scratch["f32"] = torch.empty(buf.numel() // src_dtype.itemsize, dtype=torch.float32)
        for i in range(0, numel, per):
            n = min(per, numel - i)
            chunk = buf[:n * src_dtype.itemsize]
            _read_exact(fd, memoryview(chunk.numpy()), base + start + i * src_dtype.itemsize, path, key)
            if direct:
                flat[i:i + n].copy_(chunk.view(src_dtype))
            else:  # to fp8 through preallocated float32, so the cast allocates nothing per chunk
                f32 = scratch["f32"][:n]
                f32.copy_(chunk.view(src_dtype))
                flat[i:i + n].copy_(f32)
        return out
    finally:
        os.close(fd)


def open_safetensors(path: str) -> TensorSource:
    from safetensors import safe_open

    header, meta = read_safetensors_header(path)
    shapes = {k: tuple(v["shape"]) for k, v in header.items()}
    dtypes = {k: _ST_DTYPES.get(v.get("dtype")) for k, v in header.items()}
    handle = {}

    def get(key):
        if "f" not in handle:
            try:
                handle["f"] = safe_open(path, framework="pt", device="cpu")
            except Exception as e:  # safetensors raises its own error types; name the real cause
                raise read_error(path, e) from e
        try:
            return handle["f"].get_tensor(key)
        except Exception as e:
            raise read_error(f"{path} (tensor '{key}')", e) from e

    with open(path, "rb") as f:
        base = 8 + struct.unpack("<Q", f.read(8))[0]

    scratch: dict = {}

    def read_into(key, out):
        return _stream_into(path, base, key, header[key], out, scratch)

    return TensorSource(shapes, get, path, meta, dtypes, reader=read_into, files=lambda key: path)


def open_sharded_folder(folder: str, index_names=("diffusion_pytorch_model.safetensors.index.json",
                                                   "model.safetensors.index.json")) -> TensorSource:
    """A folder with one ``*.safetensors.index.json`` and its shards, or with a single safetensors file.
    Several index files are refused (listing them): which model the folder holds would be a guess."""
    found = sorted(f for f in os.listdir(folder) if f.endswith(".safetensors.index.json"))
    if len(found) > 1:
        raise Krea2FileError(
            f"{folder}: {len(found)} shard index files ({', '.join(found)}) in one folder, so which model it holds "
            "is ambiguous. Keep one index with its shards per folder (move the other model to its own folder).")
    known = [n for n in index_names if n in found]
    idx = os.path.join(folder, (known or found)[0]) if found else None
    if idx is None:
        files = sorted(f for f in os.listdir(folder) if f.endswith(".safetensors"))
        if len(files) == 1:
            return open_safetensors(os.path.join(folder, files[0]))
        pickles = [f for f in os.listdir(folder) if f.lower().endswith(PICKLE_SUFFIXES)]
        if pickles:
            _check_not_pickle(os.path.join(folder, pickles[0]))
        raise Krea2FileError(
            f"{folder}: no safetensors index json and {len(files)} .safetensors files in this folder; expected a "
            "diffusers/HF folder with '<name>.safetensors.index.json' and its shards, or one .safetensors file.")
    try:
        with open(idx) as f:
            weight_map = json.load(f)["weight_map"]
    except (OSError, ValueError, KeyError) as e:
        raise Krea2FileError(f"{idx}: cannot read the shard index ({e}); it must be JSON with a 'weight_map'.")
    shards = {}
    shapes, dtypes, owner = {}, {}, {}
    meta = {}
    for shard in sorted(set(weight_map.values())):
        p = os.path.join(folder, shard)
        if not os.path.isfile(p):
            raise Krea2FileError(f"{idx}: names shard '{shard}', which is not in {folder}. The download is "
                                 "incomplete; fetch every shard listed in the index.")
        src = open_safetensors(p)
        shards[shard] = src
        meta = meta or src.metadata
        for k in src:
            shapes[k] = src.shape(k)
            dtypes[k] = src.dtype(k)
            owner[k] = src
    missing = [k for k in weight_map if k not in shapes]
    if missing:
        raise Krea2FileError(f"{idx}: {len(missing)} tensors listed in the index are absent from their shards "
                             f"(first: {missing[:3]}); the shards are from another version. Download them again.")
    return TensorSource(shapes, lambda k: owner[k][k], folder, meta, dtypes,
                        reader=lambda k, out: owner[k].read_into(k, out), files=lambda k: owner[k].where)


def open_source(source) -> TensorSource:
    """A path to a .safetensors file, a folder, or a state dict -> :class:`TensorSource`."""
    if isinstance(source, TensorSource):
        return source
    if isinstance(source, Mapping):
        sd = dict(source)
        return TensorSource({k: tuple(v.shape) for k, v in sd.items()}, sd.__getitem__, "<state dict>",
                            dtypes={k: v.dtype for k, v in sd.items()})
    path = os.fspath(source)
    if os.path.isdir(path):
        return open_sharded_folder(path)
    if not os.path.exists(path):
        raise Krea2FileError(f"{path}: no such file or folder. Check the name; model files go in ComfyUI's "
                             "models/diffusion_models (transformer) or models/text_encoders (text encoder).")
    return open_safetensors(path)
