"""GGUF files: Krea 2 transformers and Qwen3-VL text encoders, kept quantized in memory.

Reading uses the ``gguf`` package's ``GGUFReader`` (the llama.cpp project's parser, memory-mapped),
imported only here, on the GGUF path: a host without it loads the pack, and choosing a ``.gguf`` file
says how to install it. Dequantization is ours (:mod:`.gguf_dequant`).

* GGUF stores dimensions innermost first; :class:`GGUFSource` reports PyTorch order.
* Transformer files use Krea's original names, with or without ``model.diffusion_model.``;
  ``general.architecture`` is ``krea2`` or absent.
* Text-encoder files use llama.cpp's names (``token_embd``, ``blk.N.attn_q`` ...), architecture
  ``qwen3vl`` or ``qwen3``, text only; they are renamed to our canonical Qwen3 names. llama.cpp does not
  permute Qwen's Q/K rows (Qwen uses the NEOX rotary layout), so rows are taken as stored.

Loading: every Linear weight stored in a block type stays as its raw bytes (a ``uint8`` parameter of shape
``(out, row_bytes)`` with module attributes ``gguf_qtype`` and ``gguf_shape``) and is dequantized at call
time on the device of use by a GGUF-aware ``operations`` namespace (:mod:`.gguf_ops`); host RAM is then
about the file size. Other tensors (norm scales, modulation tables, biases) are small and are dequantized
once at load. The embedding table keeps its blocks too and dequantizes only the rows looked up.
"""

from __future__ import annotations

import logging
import os
import re
import sys
from typing import Callable, NamedTuple

import torch

from ..errors import (Krea2FileError, NotKrea2Error, QuantFormatError, TokenizerMismatchError, WrongTextEncoderError,
                      first_names)
from .gguf_dequant import PLAIN, QTYPE_BY_ID, QType, dequantize, is_quantized
from .safetensors_io import TensorSource

log = logging.getLogger("krea2")

GGUF_MAGIC = b"GGUF"
INSTALL_HINT = "{python} -m pip install gguf"

#: general.architecture values of text encoders we read
TEXT_ARCHS = ("qwen3vl", "qwen3")
#: what other architectures are, for messages (city96's diffusion GGUFs and common llama.cpp ones)
OTHER_ARCHS = {
    "flux": "a Flux transformer", "sdxl": "an SDXL UNet", "sd1": "a Stable Diffusion 1.x UNet",
    "sd3": "an SD3 MMDiT", "aura": "an AuraFlow transformer", "ltxv": "an LTX-Video transformer",
    "hyvid": "a HunyuanVideo transformer", "wan": "a Wan video transformer", "hidream": "a HiDream transformer",
    "cosmos": "a Cosmos transformer", "lumina2": "a Lumina 2 transformer", "qwen_image": "a Qwen-Image transformer",
    "chroma": "a Chroma transformer", "clip": "a vision projector (mmproj) or CLIP model",
    "t5": "a T5 text encoder", "t5encoder": "a T5 text encoder", "llama": "a Llama language model",
    "qwen2": "a Qwen2 / Qwen2.5 language model", "qwen2vl": "a Qwen2-VL / Qwen2.5-VL language model",
    "qwen3moe": "a mixture-of-experts Qwen3 model", "qwen3vlmoe": "a mixture-of-experts Qwen3-VL model",
    "gemma": "a Gemma language model", "gemma2": "a Gemma 2 language model", "gemma3": "a Gemma 3 language model",
}
_TRANSFORMER_TAIL = (" Krea2ModelLoader reads Krea 2 transformer GGUFs (general.architecture 'krea2' or unset) "
                     "from models/diffusion_models.")
_TEXT_TAIL = (" Krea2TextEncoderLoader reads Qwen3-VL-4B text-model GGUFs (architecture 'qwen3vl' or 'qwen3', "
              "without the mmproj vision file) from models/text_encoders.")


def is_gguf(source) -> bool:
    """True for a path to a ``.gguf`` file (by name, or by its magic for other names)."""
    if not isinstance(source, (str, os.PathLike)):
        return False
    path = os.fspath(source)
    if path.lower().endswith(".gguf"):
        return True
    if os.path.isfile(path):
        try:
            with open(path, "rb") as f:
                return f.read(4) == GGUF_MAGIC
        except OSError:
            return False
    return False


def _gguf_module(path: str):
    try:
        import gguf
    except ImportError:
        raise Krea2FileError(
            f"{path}: reading GGUF files needs the Python package 'gguf', which is not installed in the Python "
            f"that runs ComfyUI ({sys.executable}). Install it with:  {INSTALL_HINT.format(python=sys.executable)}  "
            "(or pip install \"krea2-nodes[gguf]\"), then restart ComfyUI.") from None
    return gguf


class GGUFTensor(NamedTuple):
    """One tensor of a GGUF file: ``shape`` in PyTorch order, ``data`` its raw bytes (uint8, 1-D, memory
    mapped), ``qtype`` our :class:`QType` (None when we do not read the file's type ``type_name``)."""
    name: str
    qtype: QType | None
    type_name: str
    shape: tuple
    data: torch.Tensor

    @property
    def quantized(self) -> bool:
        return self.qtype is not None and is_quantized(self.qtype)


class GGUFFile:
    """A parsed GGUF file: ``path``, ``arch`` (``general.architecture`` or None), ``tensors`` by name,
    ``field(name)`` for metadata values. Errors name the file and say what to do."""

    def __init__(self, path):
        path = os.fspath(path)
        self.path = path
        try:
            size = os.path.getsize(path)
        except OSError as e:
            raise Krea2FileError(f"{path}: cannot open the file ({e.strerror}). Check the path and the file's "
                                 "permissions.") from None
        with open(path, "rb") as f:
            head = f.read(8)
        if head[:4] != GGUF_MAGIC:
            raise Krea2FileError(
                f"{path}: not a GGUF file (it starts with {head[:4]!r}, a GGUF file starts with b'GGUF'). "
                f"{'The file is empty. ' if size == 0 else ''}Use a .gguf export of the model, or a .safetensors "
                "file under its own name.")
        gguf = _gguf_module(path)
        try:
            reader = gguf.GGUFReader(path, mode="c")  # copy-on-write map: writable views, no copy made
        except Exception as e:  # the reader raises ValueError / IndexError on short or corrupt data
            raise Krea2FileError(f"{path}: the GGUF file is truncated or corrupt ({type(e).__name__}: {e}); "
                                 f"{size} bytes on disk. The download was probably interrupted; download it "
                                 "again.") from None
        self._reader = reader
        self.arch = self.field("general.architecture")
        self.tensors: dict[str, GGUFTensor] = {}
        for t in reader.tensors:
            end = int(t.data_offset) + int(t.n_bytes)
            if end > size:
                raise Krea2FileError(f"{path}: the file is truncated: tensor '{t.name}' ends at byte {end} but the "
                                     f"file has {size}. The download was probably interrupted; download it again.")
            type_id = int(t.tensor_type)
            qt = QTYPE_BY_ID.get(type_id)
            shape = tuple(int(d) for d in reversed([int(x) for x in t.shape]))
            raw = torch.from_numpy(reader.data[int(t.data_offset):end])
            self.tensors[t.name] = GGUFTensor(t.name, qt, getattr(t.tensor_type, "name", str(type_id)), shape, raw)

    def field(self, name: str, default=None):
        """Metadata value ``name``; ``default`` when the file has no such field. A field that is there but cannot
        be decoded (bad UTF-8, a count past its data) is an error naming the file and the field, never a
        silent ``default``."""
        f = self._reader.fields.get(name)
        if f is None:
            return default
        try:
            return f.contents()
        except (ValueError, IndexError, TypeError, OverflowError) as e:  # UnicodeDecodeError is a ValueError
            raise Krea2FileError(f"{self.path}: the GGUF metadata field '{name}' cannot be read ({type(e).__name__}: "
                                 f"{e}); the file's header is damaged. Download the file again.") from None


def _unsupported(where: str, t: GGUFTensor) -> QuantFormatError:
    from .gguf_dequant import QTYPES
    return QuantFormatError(
        f"{where}: tensor '{t.name}' is stored as GGUF type {t.type_name}, which Krea 2 cannot dequantize (it "
        f"reads {', '.join(QTYPES)}). Use a GGUF of this model quantized to one of those types.")


class GGUFSource(TensorSource):
    """A :class:`TensorSource` over a GGUF file whose ``[]`` gives dequantized float32 (plain float types
    as stored), and whose :meth:`packed` gives the raw :class:`GGUFTensor` (bytes + type + shape).
    ``names`` maps the names shown (canonical for text encoders) to the file's names."""

    def __init__(self, gf: GGUFFile, names: dict | None = None, hf_config: dict | None = None):
        self.file = gf
        self.names = names or {n: n for n in gf.tensors}
        self.hf_config = hf_config or {}
        shapes = {k: gf.tensors[s].shape for k, s in self.names.items()}
        dtypes = {k: PLAIN.get(gf.tensors[s].type_name) for k, s in self.names.items()}
        super().__init__(shapes, self._get_dequantized, gf.path, {"gguf.architecture": gf.arch or ""}, dtypes)

    def file_name(self, key: str) -> str:
        return self.names[key]

    def packed(self, key: str) -> GGUFTensor:
        t = self.file.tensors[self.names[key]]
        if t.qtype is None:
            raise _unsupported(self.where, t)
        return t

    def _get_dequantized(self, key: str) -> torch.Tensor:
        t = self.packed(key)
        dt = PLAIN.get(t.qtype.name)
        if dt is not None:
            return t.data.view(dt).reshape(t.shape)
        return dequantize(t.data, t.qtype, t.shape)


def _looks_krea(names) -> bool:
    return any(n.split("model.diffusion_model.")[-1].startswith(("txtfusion.", "blocks.0.attn.wq")) for n in names)


def _looks_llama_cpp(names) -> bool:
    return any(n.startswith(("blk.0.attn_q", "token_embd.")) for n in names)


def open_gguf_transformer(path) -> GGUFSource:
    """A Krea 2 transformer GGUF as a :class:`GGUFSource` under the file's names (CanonicalCheckpoint strips
    ``model.diffusion_model.``); another architecture or a text-encoder GGUF is a :class:`NotKrea2Error`."""
    gf = GGUFFile(path)
    names = list(gf.tensors)
    arch = gf.arch
    if arch in TEXT_ARCHS or (arch is None and _looks_llama_cpp(names) and not _looks_krea(names)):
        raise WrongTextEncoderError(
            f"{gf.path}: this is a text-encoder GGUF (architecture '{arch or 'unset'}', llama.cpp tensor names such "
            f"as {first_names(names, 2)}), not a Krea 2 transformer. Put it in models/text_encoders and load it with "
            "Krea2TextEncoderLoader.")
    if arch not in (None, "", "krea2"):
        what = OTHER_ARCHS.get(arch, f"a model of architecture '{arch}'")
        raise NotKrea2Error(f"{gf.path}: this GGUF is {what} (general.architecture '{arch}'), not a Krea 2 "
                            f"transformer.{_TRANSFORMER_TAIL}")
    return GGUFSource(gf)


#: llama.cpp's per-layer names -> our Qwen3 module names
_LLAMA_CPP_LAYER = {
    "attn_q": "self_attn.q_proj", "attn_k": "self_attn.k_proj", "attn_v": "self_attn.v_proj",
    "attn_output": "self_attn.o_proj", "attn_q_norm": "self_attn.q_norm", "attn_k_norm": "self_attn.k_norm",
    "attn_norm": "input_layernorm", "ffn_norm": "post_attention_layernorm", "ffn_gate": "mlp.gate_proj",
    "ffn_up": "mlp.up_proj", "ffn_down": "mlp.down_proj",
}
_LLAMA_CPP_TOP = {"token_embd": "embed_tokens", "output_norm": "norm", "output": "lm_head"}
_BLK = re.compile(r"^blk\.(\d+)\.([a-z_0-9]+)\.(weight|bias)$")
_TOP = re.compile(r"^([a-z_0-9]+)\.(weight|bias)$")


def llama_cpp_to_canonical(name: str) -> str:
    """``blk.3.attn_q.weight`` -> ``layers.3.self_attn.q_proj.weight``; ``token_embd.weight`` ->
    ``embed_tokens.weight``; other names unchanged (they are then reported as not used)."""
    m = _BLK.match(name)
    if m and m.group(2) in _LLAMA_CPP_LAYER:
        return f"layers.{m.group(1)}.{_LLAMA_CPP_LAYER[m.group(2)]}.{m.group(3)}"
    m = _TOP.match(name)
    if m and m.group(1) in _LLAMA_CPP_TOP:
        return f"{_LLAMA_CPP_TOP[m.group(1)]}.{m.group(2)}"
    return name


def canonical_to_llama_cpp(name: str) -> str:
    """The inverse of :func:`llama_cpp_to_canonical` (for writing test files)."""
    m = re.match(r"^layers\.(\d+)\.(.+)\.(weight|bias)$", name)
    if m:
        inv = {v: k for k, v in _LLAMA_CPP_LAYER.items()}
        return f"blk.{m.group(1)}.{inv[m.group(2)]}.{m.group(3)}"
    m = _TOP.match(name)
    inv = {v: k for k, v in _LLAMA_CPP_TOP.items()}
    if m and m.group(1) in inv:
        return f"{inv[m.group(1)]}.{m.group(2)}"
    return name


_last_text_file: list = []


def _text_file(path) -> GGUFFile:
    """The parsed text-encoder GGUF at ``path``, reusing the last one parsed when the file is unchanged: parsing
    llama.cpp's 151936-entry vocabulary takes the reader seconds, and loading reads the file twice (the model, then
    the vocabulary check of its tokenizer)."""
    full = os.path.abspath(os.fspath(path))
    try:
        st = os.stat(full)
        key = (full, st.st_size, st.st_mtime_ns)
    except OSError:
        key = None
    if key is not None and _last_text_file and _last_text_file[0][0] == key:
        return _last_text_file[0][1]
    gf = GGUFFile(path)
    if key is not None:
        _last_text_file[:] = [(key, gf)]
    return gf


def open_gguf_text(path) -> GGUFSource:
    """A Qwen3-VL text-model GGUF as a :class:`GGUFSource` under canonical Qwen3 names (``layers.N...``,
    ``embed_tokens.weight``), with ``hf_config`` (eps, rope theta) from the file's metadata."""
    gf = _text_file(path)
    names = list(gf.tensors)
    arch = gf.arch
    if arch == "krea2" or (arch in (None, "") and _looks_krea(names)):
        raise NotKrea2Error(f"{gf.path}: this is a Krea 2 transformer GGUF, not a text encoder. Put it in "
                            "models/diffusion_models and load it with Krea2ModelLoader.")
    if arch == "clip" or any(n.startswith(("v.blk.", "mm.")) for n in names):
        raise WrongTextEncoderError(
            f"{gf.path}: this is a vision projector (mmproj) GGUF: image-encoder tensors only, it cannot encode text."
            f"{_TEXT_TAIL}")
    if arch not in (None, "") and arch not in TEXT_ARCHS:
        what = OTHER_ARCHS.get(arch, f"a model of architecture '{arch}'")
        raise WrongTextEncoderError(f"{gf.path}: this GGUF is {what} (general.architecture '{arch}'), not the "
                                    f"Qwen3-VL language model.{_TEXT_TAIL}")
    mapped = {llama_cpp_to_canonical(n): n for n in names}
    hf = {"model_type": "qwen3_vl_text"}
    a = arch or "qwen3vl"
    eps = gf.field(f"{a}.attention.layer_norm_rms_epsilon")
    theta = gf.field(f"{a}.rope.freq_base")
    if eps is not None:
        hf["rms_norm_eps"] = float(eps)
    if theta is not None:
        hf["rope_theta"] = float(theta)
    return GGUFSource(gf, mapped, hf)


# ---- the vocabulary a text-encoder GGUF records, against the tokenizer used with it ---------------

_vocab_checked: dict = {}
#: the special tokens Krea 2's prompts and generation use
_SPECIALS = ("<|endoftext|>", "<|im_start|>", "<|im_end|>", "<|vision_start|>", "<|vision_end|>", "<|image_pad|>")


def check_text_vocab(path, tok) -> None:
    """Check tokenizer ``tok`` (:class:`~krea2_model.text.tokenizer.QwenTokenizer`) against the text-encoder GGUF
    at ``path``: its ids must fit the embedding's rows, and where the file records llama.cpp's vocabulary
    (``tokenizer.ggml.tokens``, ``tokenizer.ggml.eos_token_id``) every token string and the special tokens must sit
    at the same ids. Raises :class:`TokenizerMismatchError` naming both and what differs. Checked once per file
    and tokenizer (by path, size, modification time and tokenizer source)."""
    path = os.path.abspath(os.fspath(path))
    st = os.stat(path)
    key = (path, st.st_size, st.st_mtime_ns, tok.where)
    if key in _vocab_checked:
        return
    gf = _text_file(path)
    emb = gf.tensors.get("token_embd.weight")
    ours = tok.tokens_by_id()
    tail = (" The tokenizer and the text encoder do not belong together: put the tokenizer files of this model "
            "(tokenizer.json, or vocab.json + merges.txt + tokenizer_config.json of Qwen3-VL) beside the GGUF, or use "
            "a Qwen3-VL-4B GGUF with Qwen's vocabulary.")
    if emb is not None and len(ours) > emb.shape[0]:
        raise TokenizerMismatchError(f"{path}: the tokenizer ({tok.where}) has {len(ours)} token ids but the "
                                     f"embedding has {emb.shape[0]} rows.{tail}")
    names = gf.field("tokenizer.ggml.tokens")
    if names is None:
        log.info("Krea 2: %s records no vocabulary (tokenizer.ggml.tokens); only the embedding size was checked "
                 "against the tokenizer", path)
        _vocab_checked[key] = True
        return
    names = [str(n) for n in names]
    if len(ours) > len(names):
        raise TokenizerMismatchError(f"{path}: the file's vocabulary has {len(names)} tokens, the tokenizer "
                                     f"({tok.where}) {len(ours)}.{tail}")
    where_in_file = {}
    for i, n in enumerate(names):
        where_in_file.setdefault(n, i)
    for t in _SPECIALS:
        mine = tok.token_id(t)
        theirs = where_in_file.get(t)
        if mine != theirs and (mine is not None or theirs is not None):
            raise TokenizerMismatchError(f"{path}: special token {t} is id {theirs} in the file's vocabulary but "
                                         f"{mine} in the tokenizer ({tok.where}).{tail}")
    eos = gf.field("tokenizer.ggml.eos_token_id")
    if eos is not None and 0 <= int(eos) < len(names) and tok.token_id(names[int(eos)]) != int(eos):
        raise TokenizerMismatchError(f"{path}: the file's end-of-sequence token {names[int(eos)]!r} (id {int(eos)}) is "
                                     f"id {tok.token_id(names[int(eos)])} in the tokenizer ({tok.where}).{tail}")
    bad = [i for i, t in enumerate(ours) if t is not None and names[i] != t]
    if bad:
        shown = ", ".join(f"id {i}: {names[i]!r} in the file, {ours[i]!r} in the tokenizer" for i in bad[:3])
        raise TokenizerMismatchError(f"{path}: {len(bad)} of {len(ours)} token ids name other tokens in the file's "
                                     f"vocabulary than in the tokenizer ({tok.where}): {shown}.{tail}")
    _vocab_checked[key] = True


# ---- placing tensors into a model built on the meta device -----------------------------------------

def _set_param(mod: torch.nn.Module, name: str, t: torch.Tensor) -> None:
    # setattr, not ``_parameters[name] = ``: a layer built lazily (a host's, under dynamic VRAM) holds
    # ``weight = None`` as a plain attribute, which would hide the parameter; Module.__setattr__ drops it
    setattr(mod, name, torch.nn.Parameter(t, requires_grad=False))


def attach_packed(mod: torch.nn.Module, t: GGUFTensor, device) -> None:
    """Give ``mod`` (a GGUF-aware Linear or Embedding) the raw blocks of ``t`` as its ``weight``:
    ``uint8 (rows, row_bytes)``, plus ``gguf_qtype`` and ``gguf_shape`` for dequantizing at call time."""
    raw = t.data.reshape(t.shape[0], -1)
    if torch.device(device).type != "cpu":
        raw = raw.to(device)
    _set_param(mod, "weight", raw)
    mod.gguf_qtype = t.qtype.name
    mod.gguf_shape = torch.Size(t.shape)


def holds_packed(mod) -> bool:
    """Whether ``mod`` is built to keep GGUF blocks (see :mod:`.gguf_ops`)."""
    return getattr(mod, "gguf_capable", False)


def place_tensor(model: torch.nn.Module, key: str, t: GGUFTensor, target_shape, target_dtype, device,
                 where: str) -> bool:
    """Put GGUF tensor ``t`` at canonical ``key`` of ``model``. A block-quantized weight of a GGUF-aware
    module stays packed (True is returned); everything else is dequantized to ``target_dtype`` (None: the
    stored float dtype, float32 for block types), reshaped to ``target_shape`` and moved to ``device``."""
    if t.qtype is None:
        raise _unsupported(where, t)
    mod_name, _, name = key.rpartition(".")
    mod = model.get_submodule(mod_name) if mod_name else model
    if t.quantized and name == "weight" and holds_packed(mod) and len(t.shape) == 2:
        attach_packed(mod, t, device)
        return True
    plain = PLAIN.get(t.qtype.name)
    v = t.data.view(plain).reshape(t.shape) if plain is not None else dequantize(t.data, t.qtype, t.shape)
    v = v.reshape(target_shape)
    if target_dtype is not None and v.dtype != target_dtype:
        v = v.to(target_dtype)
    if torch.device(device).type != "cpu":
        v = v.to(device)
    _set_param(mod, name, v)
    return False


def _target_dtype(key: str, param: torch.Tensor, dtype) -> torch.dtype | None:
    if key.endswith(".scale"):
        return torch.float32  # norm scales always fp32 (see RMSNorm)
    if dtype is not None:
        return param.dtype
    return None


def load_gguf_transformer(ck, *, dtype=None, device="cpu", operations=None,
                          progress: Callable[[int, int], None] | None = None):
    """A :class:`~krea2_model.formats.transformer_file.CanonicalCheckpoint` over a GGUF -> the transformer
    in eval mode, block-quantized Linear weights kept packed (see the module docstring). ``dtype`` is the
    storage dtype of tensors that are not kept packed (None: as stored, float32 for dequantized ones); the
    compute dtype is the input's."""
    from ..model.transformer import Krea2Transformer
    from .gguf_ops import gguf_operations

    ops = gguf_operations(operations)
    with torch.device("meta"):
        model = Krea2Transformer(ck.config, dtype=dtype, operations=ops)
    params = dict(model.named_parameters())
    keys = ck.keys()
    packed = 0
    for i, k in enumerate(keys):
        t = ck.src.packed(ck.keymap[k])
        packed += place_tensor(model, k, t, ck.shape(k), _target_dtype(k, params[k], dtype), device, ck.where)
        if progress:
            progress(i + 1, len(keys))
    _check_materialised(model, ck.where)
    log.info("Krea 2: %s: GGUF, %d of %d tensors kept quantized", ck.where, packed, len(keys))
    model.eval()
    model.source_name = ck.where
    return model


def load_gguf_text_model(ck, *, dtype=None, device="cpu", operations=None,
                         progress: Callable[[int, int], None] | None = None):
    """A :class:`~krea2_model.formats.text_file.TextCheckpoint` over a GGUF -> :class:`Qwen3TextModel`
    in eval mode, with block-quantized Linear and embedding weights kept packed."""
    from ..text.qwen3 import Qwen3TextModel
    from .gguf_ops import gguf_operations

    if ck.ignored:
        log.info("Krea 2: %s: GGUF text model (%d layers, hidden %d); %d tensors not used: %s", ck.where,
                 ck.config.layers, ck.config.hidden, len(ck.ignored), first_names(ck.ignored, 4))
    ops = gguf_operations(operations)
    with torch.device("meta"):
        model = Qwen3TextModel(ck.config, dtype=dtype, operations=ops)
    params = dict(model.named_parameters())
    keys = ck.keys()
    for i, k in enumerate(keys):
        t = ck.src.packed(ck.keymap[k])
        target = params[k].dtype if dtype is not None else None
        place_tensor(model, k, t, ck.shape(k), target, device, ck.where)
        if progress:
            progress(i + 1, len(keys))
    _check_materialised(model, ck.where)
    model.eval()
    return model


def _check_materialised(model, where):
    left = [n for n, p in model.named_parameters() if p.device.type == "meta"]
    if left:
        raise Krea2FileError(f"{where}: internal: tensors not filled from the GGUF: {first_names(left)}")
