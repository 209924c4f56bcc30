"""GGUF block dequantization in PyTorch, on whatever device the bytes are on.

Written from the published block layouts (docs/architecture.md, "GGUF"); the ``gguf`` package's own numpy
dequantizer is only the reference the unit tests compare with. One table, :data:`QTYPES`, maps a type
to ``(id, elements per block, bytes per block, function)`` (the super-block types add the function that
makes their sub-block factors); a new type is one function plus one row. :data:`LAYOUTS` gives the byte
ranges of the super-block types' fields.

Every function takes ``blocks (n, block_bytes) uint8`` and returns ``(n, block_elems) float32``, equal to
the reference bit for bit; :func:`dequantize` casts to the requested dtype at the end.
"""

from __future__ import annotations

from typing import Callable, NamedTuple

import torch

__all__ = ["QType", "QTYPES", "QTYPE_BY_ID", "dequantize", "dequantize_blocks", "qtype_of", "row_bytes",
           "is_quantized", "chunk_plan"]


def _f16(b: torch.Tensor, at: int) -> torch.Tensor:
    """The little-endian float16 at byte ``at`` of every block, as float32 ``(n, 1)``."""
    return b[:, at:at + 2].contiguous().view(torch.float16).to(torch.float32)


_const_cache: dict = {}


def _shifts(values, device, shape, dtype=torch.uint8) -> torch.Tensor:
    """A small constant table on ``device``, made once per device (no host-to-device copy per call)."""
    key = (tuple(values), str(device), tuple(shape), dtype)
    t = _const_cache.get(key)
    if t is None:
        t = _const_cache[key] = torch.tensor(key[0], dtype=dtype, device=device).reshape(shape)
    return t


def _nibbles(qs: torch.Tensor) -> torch.Tensor:
    """``(n, 16)`` bytes -> ``(n, 32)``: the 16 low nibbles (elements 0..15), then the 16 high ones."""
    return torch.cat([qs & 0x0F, qs >> 4], dim=-1)


def _bits32(qh: torch.Tensor) -> torch.Tensor:
    """4 bytes of a little-endian uint32 per block ``(n, 4)`` -> its 32 bits ``(n, 32)``, bit j at j."""
    bits = (qh.unsqueeze(-1) >> _shifts(range(8), qh.device, (1, 1, 8))) & 1
    return bits.reshape(qh.shape[0], 32)


# ---- plain floats -------------------------------------------------------------------------------

def _f32(b):
    return b.contiguous().view(torch.float32)


def _f16_plain(b):
    return b.contiguous().view(torch.float16).to(torch.float32)


def _bf16(b):
    return b.contiguous().view(torch.bfloat16).to(torch.float32)


# ---- 32-element blocks ----------------------------------------------------------------------------

def _q4_0(b):
    # d f16 | 16 bytes of 4-bit q; x = (q - 8) * d
    d = _f16(b, 0)
    return _nibbles(b[:, 2:18]).to(torch.float32).sub_(8.0).mul_(d)


def _q4_1(b):
    # d f16 | m f16 | 16 bytes of 4-bit q; x = q * d + m
    d, m = _f16(b, 0), _f16(b, 2)
    return _nibbles(b[:, 4:20]).to(torch.float32).mul_(d).add_(m)


def _q5_0(b):
    # d f16 | 4 bytes: bit 4 of each of the 32 q | 16 bytes of low nibbles; x = (q - 16) * d
    d = _f16(b, 0)
    q = _nibbles(b[:, 6:22]) | (_bits32(b[:, 2:6]) << 4)
    return q.to(torch.float32).sub_(16.0).mul_(d)


def _q5_1(b):
    # d f16 | m f16 | 4 bytes of high bits | 16 bytes of low nibbles; x = q * d + m
    d, m = _f16(b, 0), _f16(b, 2)
    q = _nibbles(b[:, 8:24]) | (_bits32(b[:, 4:8]) << 4)
    return q.to(torch.float32).mul_(d).add_(m)


def _q8_0(b):
    # d f16 | 32 int8 q; x = q * d
    d = _f16(b, 0)
    return b[:, 2:34].contiguous().view(torch.int8).to(torch.float32).mul_(d)


#: the 16 non-uniform levels of IQ4_NL / IQ4_XS
IQ4_LEVELS = (-127, -104, -83, -65, -49, -35, -22, -10, 1, 13, 25, 38, 53, 69, 89, 113)
_levels_cache: dict = {}


def _levels(device) -> torch.Tensor:
    t = _levels_cache.get(str(device))
    if t is None:
        t = _levels_cache[str(device)] = torch.tensor(IQ4_LEVELS, dtype=torch.float32, device=device)
    return t


def _level_values(idx: torch.Tensor, out: torch.Tensor | None = None) -> torch.Tensor:
    """4-bit level indices (uint8, any shape) -> their :data:`IQ4_LEVELS` as float32, same shape, in ``out``
    when given (``index_select``: several times faster than indexing with a tensor)."""
    flat = None if out is None else out.view(-1)
    return torch.index_select(_levels(idx.device), 0, idx.reshape(-1).int(), out=flat).view(idx.shape)


def _iq4_nl(b):
    # d f16 | 16 bytes of 4-bit indices into IQ4_LEVELS; x = d * level
    d = _f16(b, 0)
    return _level_values(_nibbles(b[:, 2:18])).mul_(d)


# ---- 256-element super-blocks ---------------------------------------------------------------------
#
# A super-block holds 256 elements in sub-blocks of 16 (Q2_K, Q3_K, Q6_K) or 32 (Q4_K, Q5_K, IQ4_XS), each with
# its own integer scale (and, with a dmin, min), which one or two float16 factors per super-block scale again.
# Fields and their byte ranges [first, end) as ggml's block structs declare them (ggml-common.h):
LAYOUTS: dict[str, dict[str, tuple[int, int]]] = {
    "Q2_K": {"scales": (0, 16), "qs": (16, 80), "d": (80, 82), "dmin": (82, 84)},
    "Q3_K": {"hmask": (0, 32), "qs": (32, 96), "scales": (96, 108), "d": (108, 110)},
    "Q4_K": {"d": (0, 2), "dmin": (2, 4), "scales": (4, 16), "qs": (16, 144)},
    "Q5_K": {"d": (0, 2), "dmin": (2, 4), "scales": (4, 16), "qh": (16, 48), "qs": (48, 176)},
    "Q6_K": {"ql": (0, 128), "qh": (128, 192), "scales": (192, 208), "d": (208, 210)},
    "IQ4_XS": {"d": (0, 2), "scales_h": (2, 4), "scales_l": (4, 8), "qs": (8, 136)},
}
#
# Each type is two functions: ``factors(blocks)``, the float32 multiplier (and min) of every sub-block, and
# ``values(blocks, factors)``. The factors are a few bytes per block but many small operations, so
# :func:`dequantize` makes them once for a run of chunks; ``values(blocks)`` alone makes its own.
# Exactness: a product of a float16 factor, an integer scale and a quant has at most 23 significant bits, so
# it is exact in float32 in any order; the one rounding is the subtraction of the min (Q2_K, Q4_K, Q5_K), as
# in the reference.
# Quant bits are unpacked in whole words (4 or 8 bytes at once: one shift and one mask give a bit field of
# every byte), arranged so that each element lands in its place in the block; the passes over a chunk's
# elements then run on contiguous memory and only the factors are broadcast. (Little-endian, as GGUF and
# every platform PyTorch runs on.)


def _field(b: torch.Tensor, qtype: str, first: str, last: str | None = None) -> torch.Tensor:
    """Bytes of field ``first`` (through field ``last``) of every block: ``(n, bytes)`` uint8, a view."""
    lay = LAYOUTS[qtype]
    return b[:, lay[first][0]:lay[last or first][1]]


def _as(field: torch.Tensor, dtype) -> torch.Tensor:
    """``field (n, bytes)`` reinterpreted as ``dtype``; a view where the strides allow, else a copy."""
    if field.stride(0) % dtype.itemsize or field.storage_offset() % dtype.itemsize:
        field = field.clone(memory_format=torch.contiguous_format)  # (contiguous() keeps a single row's stride)
    return field.view(dtype)


def _halves(field: torch.Tensor) -> torch.Tensor:
    """Consecutive float16 fields of every block as float32 ``(n, count)``."""
    return _as(field, torch.float16).to(torch.float32)


def _words(field: torch.Tensor) -> torch.Tensor:
    """A field as 8-byte words, or as 4-byte ones where those are a view and 8-byte ones would be a copy."""
    view32 = field.stride(0) % 4 == 0 and field.stride(0) % 8 != 0
    return _as(field, torch.int32 if view32 or field.shape[1] % 8 else torch.int64)


def _unpack(words: torch.Tensor, shifts, bits: int) -> torch.Tensor:
    """``words (..., 1, w)`` -> ``(..., len(shifts), w)``: for each shift ``s`` the ``bits``-bit field at bit
    ``s`` of every byte of every word."""
    every_byte = 0x0101010101010101 if words.dtype == torch.int64 else 0x01010101
    if len(shifts) == 2:  # nibbles: two shifted copies stacked, measured 1.4-1.9x faster than a broadcast shift
        w = words.squeeze(-2)
        x = torch.stack([w >> s if s else w for s in shifts], dim=-2)
    else:
        x = words >> _shifts(shifts, words.device, (len(shifts), 1), words.dtype)
    return x.bitwise_and_(((1 << bits) - 1) * every_byte)


def _bytes(words: torch.Tensor, n: int, *shape) -> torch.Tensor:
    return words.view(torch.uint8).view(n, *shape)


def _floats(q: torch.Tensor, out: torch.Tensor | None) -> torch.Tensor:
    """Integer quants as float32, written into ``out`` (a float32 buffer of as many elements) when given: a
    buffer reused from chunk to chunk costs no fresh memory each time (measured: the conversion itself is a
    third of the cost of converting into a new tensor)."""
    return q.to(torch.float32) if out is None else out.view(q.shape).copy_(q)


def _per_word(x: torch.Tensor, n: int, *shape) -> torch.Tensor:
    """``x`` viewed as ``(n, *shape, words)``: the last dimension counts words of ``x``'s own size."""
    return x.view(n, *shape, -1)


def _q2_k_factors(b):
    # 16 scale bytes, one per sub-block of 16 (low nibble: scale, high nibble: min) | ... | d | dmin
    n = b.shape[0]
    s = _unpack(_as(_field(b, "Q2_K", "scales"), torch.int32).view(n, 1, 4), (0, 4), 4)
    return _bytes(s, n, 2, 16).to(torch.float32).mul_(_halves(_field(b, "Q2_K", "d", "dmin")).unsqueeze(-1))


def _q2_k(b, f=None, out=None):
    # ... | 64 bytes of 2-bit quants | ...: element 128h + 32j + l (h < 2, j < 4, l < 32) is bits 2j..2j+1 of
    # byte 32h + l, in sub-block e // 16. x = d * scale * q - dmin * min.
    n = b.shape[0]
    f = _q2_k_factors(b) if f is None else f
    w = _words(_field(b, "Q2_K", "qs"))
    y = _floats(_bytes(_unpack(_per_word(w, n, 2, 1), (0, 2, 4, 6), 2), n, 16, 16), out)
    return y.mul_(f[:, 0, :, None]).sub_(f[:, 1, :, None]).view(n, 256)


def _q3_k_factors(b):
    # 12 bytes of 16 six-bit scales, stored + 32: scale i takes its low nibble from byte i % 8 (the low nibble
    # for i < 8, the high one after) and its top two bits from byte 8 + i % 4, bits 2 * (i // 4) on | d
    n = b.shape[0]
    w = _as(_field(b, "Q3_K", "scales"), torch.int32)  # 3 words: two of nibbles, one of top bits
    lo = _unpack(w[:, None, :2], (0, 4), 4).view(n, 4)
    hi = _unpack(w[:, None, 2:], (0, 2, 4, 6), 2).view(n, 4)
    s = _bytes(lo | (hi << 4), n, 16).view(torch.int8).sub_(32).to(torch.float32)
    return s.mul_(_halves(_field(b, "Q3_K", "d")))


def _q3_k(b, f=None, out=None):
    # 32 bytes hmask | 64 bytes of low 2 bits | ...: element 128h + 32j + l has its low bits as Q2_K's and
    # its third bit at bit 4h + j of hmask byte l; quant = that 3-bit value - 4; sub-block e // 16.
    # x = d * (scale - 32) * quant.
    n = b.shape[0]
    f = _q3_k_factors(b) if f is None else f
    w = _words(_field(b, "Q3_K", "hmask", "qs"))
    k = w.shape[1] // 3  # words of hmask; the quants' words follow
    q = _unpack(_per_word(w[:, k:], n, 2, 1), (0, 2, 4, 6), 2)
    q |= _unpack(w[:, None, :k], range(8), 1).view(q.shape).bitwise_left_shift_(2)
    y = _floats(_bytes(q, n, 16, 16).view(torch.int8).sub_(4), out)
    return y.mul_(f.unsqueeze(-1)).view(n, 256)


def _k_factors(b, qtype):
    """Q4_K / Q5_K: ``(n, 2, 8)`` float32, ``d * scale`` and ``dmin * min`` of the eight sub-blocks. Their 12
    scale bytes as words A, B, C (bytes 0-3, 4-7, 8-11): scales 0-3 are the low six bits of A's bytes, mins
    0-3 of B's; scales / mins 4-7 are the low / high nibbles of C's bytes plus, as bits 4-5, the top two bits
    of A's / B's."""
    n = b.shape[0]
    w = _as(_field(b, qtype, "scales"), torch.int32)
    ab = w[:, :2]
    first = ab & 0x3F3F3F3F
    rest = _unpack(w[:, None, 2:], (0, 4), 4).view(n, 2) | ((ab >> 2) & 0x30303030)
    f = _bytes(torch.stack((first, rest), dim=-1), n, 2, 8).to(torch.float32)
    return f.mul_(_halves(_field(b, qtype, "d", "dmin")).unsqueeze(-1))


def _q4_k_factors(b):
    return _k_factors(b, "Q4_K")


def _q4_k(b, f=None, out=None):
    # d | dmin | 12 scale bytes | 128 bytes of 4-bit quants: element 64c + 32h + l is nibble h of quant byte
    # 32c + l, in sub-block 2c + h. x = d * scale * q - dmin * min.
    n = b.shape[0]
    f = _k_factors(b, "Q4_K") if f is None else f
    q = _unpack(_per_word(_words(_field(b, "Q4_K", "qs")), n, 4, 1), (0, 4), 4)
    y = _floats(_bytes(q, n, 8, 32), out)
    return y.mul_(f[:, 0, :, None]).sub_(f[:, 1, :, None]).view(n, 256)


def _q5_k_factors(b):
    return _k_factors(b, "Q5_K")


def _q5_k(b, f=None, out=None):
    # As Q4_K, with 32 bytes qh between the scales and the quants: bit 4 of element 64c + 32h + l is bit
    # 2c + h (its sub-block) of qh byte l.
    n = b.shape[0]
    f = _k_factors(b, "Q5_K") if f is None else f
    q = _unpack(_per_word(_words(_field(b, "Q5_K", "qs")), n, 4, 1), (0, 4), 4)
    q = q.view(n, 8, -1)
    q |= _unpack(_per_word(_words(_field(b, "Q5_K", "qh")), n, 1), range(8), 1).bitwise_left_shift_(4)
    y = _floats(_bytes(q, n, 8, 32), out)
    return y.mul_(f[:, 0, :, None]).sub_(f[:, 1, :, None]).view(n, 256)


def _q6_k_factors(b):
    # 16 int8 scales, one per sub-block of 16 | d
    return _field(b, "Q6_K", "scales").view(torch.int8).to(torch.float32).mul_(_halves(_field(b, "Q6_K", "d")))


def _q6_k(b, f=None, out=None):
    # 128 bytes of low nibbles | 64 bytes of high 2-bit pairs | ...: element 128h + 32k + l (k < 4) is nibble
    # k // 2 of ql byte 64h + 32 (k % 2) + l, with bits 2k..2k+1 of qh byte 32h + l as bits 4-5;
    # quant = that 6-bit value - 32; sub-block e // 16. x = d * scale * quant.
    n = b.shape[0]
    f = _q6_k_factors(b) if f is None else f
    w = _words(_field(b, "Q6_K", "ql", "qh"))
    k = w.shape[1] // 3 * 2  # words of ql; qh's follow
    q = _unpack(_per_word(w[:, :k], n, 2, 1), (0, 4), 4).view(n, 2, 4, -1)
    q |= _unpack(_per_word(w[:, k:], n, 2, 1), (0, 2, 4, 6), 2).bitwise_left_shift_(4)
    y = _floats(_bytes(q, n, 16, 16).view(torch.int8).sub_(32), out)
    return y.mul_(f.unsqueeze(-1)).view(n, 256)


def _iq4_xs_factors(b):
    # d | 16 bits of scale tops | 4 bytes of scale nibbles: the scale of sub-block i (stored + 32) is nibble
    # i % 2 of byte i // 2, plus bits 2i..2i+1 of the 16 as bits 4-5
    n = b.shape[0]
    lo = (_field(b, "IQ4_XS", "scales_l").unsqueeze(-1) >> _shifts((0, 4), b.device, (2,))) & 0x0F
    hi = _as(_field(b, "IQ4_XS", "scales_h"), torch.int16) >> _shifts(range(0, 16, 2), b.device, (8,), torch.int16)
    s = (lo.view(n, 8) | ((hi & 3) << 4)).sub_(32).to(torch.float32)
    return s.mul_(_halves(_field(b, "IQ4_XS", "d")))


def _iq4_xs(b, f=None, out=None):
    # ... | 128 bytes of 4-bit level indices: elements 32i + 16h + j (sub-block i) index IQ4_LEVELS with
    # nibble h of byte 16i + j. x = d * (scale - 32) * level.
    n = b.shape[0]
    f = _iq4_xs_factors(b) if f is None else f
    q = _unpack(_per_word(_words(_field(b, "IQ4_XS", "qs")), n, 8, 1), (0, 4), 4)
    return _level_values(_bytes(q, n, 8, 32), out).mul_(f.unsqueeze(-1)).view(n, 256)


class QType(NamedTuple):
    name: str
    id: int               # GGML's type number, as stored in the file
    block_elems: int
    block_bytes: int
    fn: Callable[..., torch.Tensor]  # fn(blocks) -> (n, block_elems) float32
    #: the super-block types: blocks -> the float32 factors of their sub-blocks, which ``fn(blocks, factors,
    #: out)`` takes instead of making them (:func:`dequantize` makes them once for a run of chunks), ``out`` a
    #: float32 ``(n, block_elems)`` buffer for the result
    factors: Callable[[torch.Tensor], torch.Tensor] | None = None


#: every type we read; the ids are GGML's (the unit tests check them against the gguf package)
QTYPES: dict[str, QType] = {q.name: q for q in (
    QType("F32", 0, 1, 4, _f32),
    QType("F16", 1, 1, 2, _f16_plain),
    QType("BF16", 30, 1, 2, _bf16),
    QType("Q4_0", 2, 32, 18, _q4_0),
    QType("Q4_1", 3, 32, 20, _q4_1),
    QType("Q5_0", 6, 32, 22, _q5_0),
    QType("Q5_1", 7, 32, 24, _q5_1),
    QType("Q8_0", 8, 32, 34, _q8_0),
    QType("Q2_K", 10, 256, 84, _q2_k, _q2_k_factors),
    QType("Q3_K", 11, 256, 110, _q3_k, _q3_k_factors),
    QType("Q4_K", 12, 256, 144, _q4_k, _q4_k_factors),
    QType("Q5_K", 13, 256, 176, _q5_k, _q5_k_factors),
    QType("Q6_K", 14, 256, 210, _q6_k, _q6_k_factors),
    QType("IQ4_NL", 20, 32, 18, _iq4_nl),
    QType("IQ4_XS", 23, 256, 136, _iq4_xs, _iq4_xs_factors),
)}
QTYPE_BY_ID: dict[int, QType] = {q.id: q for q in QTYPES.values()}
#: plain float types: read as ordinary tensors, never kept as raw blocks
PLAIN = {"F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16}


def qtype_of(name_or_id) -> QType:
    """The :class:`QType` for a name (``'Q4_K'``) or GGML id; KeyError for a type we do not read."""
    if isinstance(name_or_id, QType):
        return name_or_id
    if isinstance(name_or_id, str):
        return QTYPES[name_or_id]
    return QTYPE_BY_ID[int(name_or_id)]


def is_quantized(qtype) -> bool:
    return qtype_of(qtype).name not in PLAIN


def row_bytes(qtype, row_elems: int) -> int:
    q = qtype_of(qtype)
    if row_elems % q.block_elems:
        raise ValueError(f"{q.name} rows must be a multiple of {q.block_elems} elements, got {row_elems}")
    return row_elems // q.block_elems * q.block_bytes


def dequantize_blocks(blocks: torch.Tensor, qtype) -> torch.Tensor:
    """``blocks (n, block_bytes) uint8`` -> ``(n, block_elems) float32`` on the same device."""
    q = qtype_of(qtype)
    return q.fn(blocks.reshape(-1, q.block_bytes))


def dequantize(raw: torch.Tensor, qtype, shape, dtype=torch.float32) -> torch.Tensor:
    """Raw GGUF bytes (uint8, any shape, C order) of a tensor of logical ``shape`` (PyTorch order) ->
    that tensor in ``dtype``, on ``raw``'s device."""
    q = qtype_of(qtype)
    shape = tuple(int(s) for s in shape)
    numel = 1
    for s in shape:
        numel *= s
    if raw.numel() * q.block_elems != numel * q.block_bytes:
        raise ValueError(f"{q.name}: {raw.numel()} bytes do not hold a tensor of shape {list(shape)}")
    blocks = raw.reshape(-1, q.block_bytes)
    plan = chunk_plan(blocks.shape[0], q, raw.device)
    if len(plan) == 1:
        out = q.fn(blocks).reshape(shape)
        return out if out.dtype == dtype else out.to(dtype)
    # A chunk of blocks at a time, on every device: the float32 temporaries are one chunk's (on the CPU they
    # stay in cache and are reused: measured 4096x4096 Q4_K -> bf16 2.3x faster than one pass), the result is
    # written once, in its dtype. One pass would hold ~6 bytes of temporaries per element (640 MB for one
    # 6144x16384 weight) on top of the output, every call.
    out = torch.empty(numel, dtype=dtype, device=raw.device)
    if q.factors is None:
        for i, j in plan:
            out[i * q.block_elems:j * q.block_elems].view(j - i, q.block_elems).copy_(q.fn(blocks[i:j]))
        return out.reshape(shape)
    # the super-block types: factors for a run of chunks at once; each chunk's float32 values in one buffer
    # (or, for a float32 result, in place)
    f32 = dtype == torch.float32
    buf = None if f32 else torch.empty(max(j - i for i, j in plan), q.block_elems, dtype=torch.float32,
                                        device=raw.device)
    for g in range(0, len(plan), FACTOR_RUN):
        run = plan[g:g + FACTOR_RUN]
        first = run[0][0]
        factors = q.factors(blocks[first:run[-1][1]])
        for i, j in run:
            dest = out[i * q.block_elems:j * q.block_elems].view(j - i, q.block_elems)
            part = q.fn(blocks[i:j], factors[i - first:j - first], dest if f32 else buf[:j - i])
            if not f32:
                dest.copy_(part)
    return out.reshape(shape)


#: chunks whose sub-block factors (:attr:`QType.factors`) are made at once: they take a few bytes per block
#: (at most 1/4 of a bf16 result's), and making them for one chunk is many operations on tiny tensors
FACTOR_RUN = 16
#: elements dequantized per chunk on the CPU (cache-sized) and on other devices (few kernel launches)
CPU_CHUNK = 1 << 19
DEVICE_CHUNK = 1 << 22
#: a chunk never holds more than this share of the tensor, so one call's temporaries stay a small share of
#: its output whatever the tensor's size (float32 temporaries are up to ~8x the bytes of a bf16 result)
MAX_SHARE = 1 / 256


def chunk_plan(n_blocks: int, qtype, device) -> list:
    """The ``(first, end)`` block ranges :func:`dequantize` processes one after the other on ``device``: at
    most :data:`CPU_CHUNK` / :data:`DEVICE_CHUNK` elements each, and at most :data:`MAX_SHARE` of the tensor
    once it is larger than one such chunk."""
    q = qtype_of(qtype)
    limit = CPU_CHUNK if torch.device(device).type == "cpu" else DEVICE_CHUNK
    total = n_blocks * q.block_elems
    if total <= limit:
        return [(0, n_blocks)]
    per = max(1, min(limit, max(int(total * MAX_SHARE), 1 << 16)) // q.block_elems)
    return [(i, min(n_blocks, i + per)) for i in range(0, n_blocks, per)]
