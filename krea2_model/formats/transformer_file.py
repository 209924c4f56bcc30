"""Krea 2 transformer checkpoints: layout detection, key normalisation, config inference, loading.

Canonical keys are those of Krea's original single file (the module names of
:class:`~krea2_model.model.transformer.Krea2Transformer`). Accepted layouts:

* ``original``: Krea's file (``first.*``, ``blocks.N.mod.lin`` flat ``(6F,)``, ``txtfusion.*``, ``last.*``);
* ``comfy``: the same under ``model.diffusion_model.`` (ComfyUI repacks, including ``fp8_scaled`` and
  per-layer quantized files whose ``.scale_weight`` / ``.weight_scale`` / ``.comfy_quant`` tensors follow
  their weight);
* ``diffusers``: ``img_in``, ``transformer_blocks.N.attn.to_q``, ``scale_shift_table (6, F)``, as a
  single file or a folder of shards with its index json.
"""

from __future__ import annotations

import logging
import re
from typing import Callable

import torch

from ..errors import NotKrea2Error, ShapeMismatchError, first_names
from ..model.transformer import Krea2Config, Krea2Transformer
from .quant import FP8, MARKER_KEYS, QUANT_SUFFIXES, dequantize, logical_shape, read_conf, stored_shape
from .safetensors_io import TensorSource, open_source
from .tensors import check_tensors, count_indices, module_shapes, set_tensor, shape_getter

log = logging.getLogger("krea2")

HOST_PREFIXES = ("model.diffusion_model.", "diffusion_model.")

# diffusers name -> canonical name. Prefix renames apply at the start of the key, block renames anywhere.
_DIFFUSERS_PREFIX = (
    ("img_in.", "first."),
    ("time_embed.linear_1.", "tmlp.0."),
    ("time_embed.linear_2.", "tmlp.2."),
    ("time_mod_proj.", "tproj.1."),
    ("txt_in.norm.weight", "txtmlp.0.scale"),
    ("txt_in.linear_1.", "txtmlp.1."),
    ("txt_in.linear_2.", "txtmlp.3."),
    ("text_fusion.", "txtfusion."),
    ("transformer_blocks.", "blocks."),
    ("final_layer.linear.", "last.linear."),
    ("final_layer.norm.weight", "last.norm.scale"),
    ("final_layer.scale_shift_table", "last.modulation.lin"),
)
_DIFFUSERS_INNER = (
    (".attn.to_q.", ".attn.wq."),
    (".attn.to_k.", ".attn.wk."),
    (".attn.to_v.", ".attn.wv."),
    (".attn.to_out.0.", ".attn.wo."),
    (".attn.to_gate.", ".attn.gate."),
    (".attn.norm_q.weight", ".attn.qknorm.qnorm.scale"),
    (".attn.norm_k.weight", ".attn.qknorm.knorm.scale"),
    (".ff.", ".mlp."),
    (".norm1.weight", ".prenorm.scale"),
    (".norm2.weight", ".postnorm.scale"),
    (".scale_shift_table", ".mod.lin"),
)
_DIFFUSERS_ROOTS = ("img_in.", "time_embed.", "time_mod_proj.", "txt_in.", "text_fusion.", "transformer_blocks.",
                    "final_layer.")
_CANONICAL_ROOTS = ("first.", "tmlp.", "tproj.", "txtmlp.", "txtfusion.", "blocks.", "last.")
_BLOCK_MOD = re.compile(r"^blocks\.\d+\.mod\.lin$")


def _swap(key: str, prefix_map, inner_map) -> str:
    for a, b in prefix_map:
        if key.startswith(a):
            key = b + key[len(a):]
            break
    for a, b in inner_map:
        key = key.replace(a, b)
    return key


def diffusers_to_canonical(key: str) -> str:
    """``transformer_blocks.0.attn.to_q.weight`` -> ``blocks.0.attn.wq.weight`` (names only)."""
    return _swap(key, _DIFFUSERS_PREFIX, _DIFFUSERS_INNER)


def canonical_to_diffusers(key: str) -> str:
    """The inverse of :func:`diffusers_to_canonical` (names only)."""
    return _swap(key, [(b, a) for a, b in _DIFFUSERS_PREFIX], [(b, a) for a, b in _DIFFUSERS_INNER])


def strip_host_prefix(key: str) -> str:
    for p in HOST_PREFIXES:
        if key.startswith(p):
            return key[len(p):]
    return key


def detect_layout(keys) -> str:
    """``'comfy'``, ``'diffusers'`` or ``'original'``; raises :class:`NotKrea2Error` otherwise."""
    keys = list(keys)
    prefixed = any(k.startswith(HOST_PREFIXES) for k in keys)
    bare = [strip_host_prefix(k) for k in keys]
    if any(k.startswith("txtfusion.") for k in bare):
        return "comfy" if prefixed else "original"
    if any(k.startswith("text_fusion.") for k in bare) and any(k.startswith("transformer_blocks.") for k in bare):
        return "diffusers"
    raise NotKrea2Error(describe_foreign(keys))


def describe_foreign(keys) -> str:
    """A sentence on what a non-Krea 2 checkpoint looks like, for the error message."""
    keys = list(keys)
    ks = " ".join(keys[:2000])
    guesses = [
        ("double_blocks." in ks and "single_blocks." in ks, "a Flux-family transformer"),
        ("transformer_blocks." in ks and "img_mod." in ks, "a Qwen-Image transformer"),
        ("joint_blocks." in ks, "an SD3 MMDiT"),
        ("input_blocks." in ks or "down_blocks." in ks, "a UNet (Stable Diffusion family)"),
        ("encoder.down." in ks or "decoder.up." in ks or "decoder.conv_in" in ks, "a VAE"),
        ("visual." in ks and "language_model" in ks, "a vision-language text encoder (load it with Krea2TextEncoderLoader)"),
        ("embed_tokens" in ks or "layers.0.self_attn" in ks, "a language model / text encoder (load it with Krea2TextEncoderLoader)"),
        ("lora_" in ks or "lora_A" in ks or ".alpha" in ks, "a LoRA (load it with Krea2LoraLoader)"),
        ("blocks.0.self_attn" in ks and "head.head" in ks, "a Wan video transformer"),
    ]
    what = next((g for ok, g in guesses if ok), None)
    sample = first_names(keys, 3)
    return (f"this is not a Krea 2 transformer checkpoint: it has no 'txtfusion.*' (Krea) or 'text_fusion.*' "
            f"(diffusers) tensors. {('It looks like ' + what + '. ') if what else ''}"
            f"{len(keys)} tensors, e.g. {sample}. Put Krea 2 files (krea2_raw / krea2_turbo) in models/diffusion_models.")


def canonical_keymap(keys) -> tuple[dict, str]:
    """``({canonical_key: source_key}, layout)`` for every key of a checkpoint."""
    keys = list(keys)
    layout = detect_layout(keys)
    out = {}
    for k in keys:
        c = strip_host_prefix(k)
        if layout == "diffusers":
            c = diffusers_to_canonical(c)
        out[c] = k
    return out, layout


def fix_shape(key: str, t: torch.Tensor) -> torch.Tensor:
    """``t`` in the canonical shape of ``key``: diffusers stores each block's six modulation vectors as a (6, F)
    table, Krea flat (6F,)."""
    if _BLOCK_MOD.match(key) and t.ndim == 2:
        return t.reshape(-1)
    return t


def infer_config(shapes: dict, where: str = "checkpoint") -> Krea2Config:
    """A :class:`Krea2Config` from canonical ``{key: shape}``. Head size comes from the q/k norm length."""
    need = shape_getter(shapes, where, "Krea 2")

    hidden, in_ch = need("first.weight")
    head_dim = need("blocks.0.attn.qknorm.qnorm.scale")[0]
    t_head = need("txtfusion.layerwise_blocks.0.attn.qknorm.qnorm.scale")[0]
    cfg = Krea2Config(
        hidden=hidden,
        head_dim=head_dim,
        heads=need("blocks.0.attn.wq.weight")[0] // head_dim,
        kv_heads=need("blocks.0.attn.wk.weight")[0] // head_dim,
        mlp_hidden=need("blocks.0.mlp.gate.weight")[0],
        layers=count_indices(shapes, r"^blocks\.(\d+)\."),
        in_channels=in_ch,
        time_dim=need("tmlp.0.weight")[1],
        text_dim=need("txtmlp.0.scale")[0],
        text_taps=need("txtfusion.projector.weight")[1],
        text_head_dim=t_head,
        text_heads=need("txtfusion.layerwise_blocks.0.attn.wq.weight")[0] // t_head,
        text_kv_heads=need("txtfusion.layerwise_blocks.0.attn.wk.weight")[0] // t_head,
        text_mlp_hidden=need("txtfusion.layerwise_blocks.0.mlp.gate.weight")[0],
        text_layerwise_blocks=count_indices(shapes, r"^txtfusion\.layerwise_blocks\.(\d+)\."),
        text_refiner_blocks=count_indices(shapes, r"^txtfusion\.refiner_blocks\.(\d+)\."),
    )
    if cfg.head_dim % 16 or cfg.heads * cfg.head_dim == 0 or cfg.heads % max(cfg.kv_heads, 1):
        raise ShapeMismatchError(f"{where}: inferred head size {cfg.head_dim} with {cfg.heads} query / {cfg.kv_heads} "
                                 "key-value heads does not fit Krea 2 (head size a multiple of 16, query heads a "
                                 "multiple of key-value heads).")
    return cfg


def expected_shapes(cfg: Krea2Config) -> dict:
    return module_shapes(lambda: Krea2Transformer(cfg))


class CanonicalCheckpoint:
    """A checkpoint seen through canonical names: ``keys``, ``shape(k)``, ``load(k)`` (one tensor, with
    the layout's reshape applied), ``config``, ``layout``, ``aux`` (quantization tensors by canonical
    name), ``extra`` (source keys the model does not use)."""

    def __init__(self, source):
        from .gguf import is_gguf, open_gguf_transformer  # the gguf package is needed only for .gguf files
        self.src: TensorSource = open_gguf_transformer(source) if is_gguf(source) else open_source(source)
        self.where = self.src.where
        try:
            keymap, self.layout = canonical_keymap(self.src.keys())
        except NotKrea2Error as e:
            raise NotKrea2Error(f"{self.where}: {e}") from None
        self.keymap = {}
        self.aux = {}
        extra = []
        for c, s in keymap.items():
            if c.endswith(QUANT_SUFFIXES):
                self.aux[c] = s
            elif c in MARKER_KEYS:
                self.aux[c] = s
            else:
                self.keymap[c] = s
        shapes = {c: self.src.shape(s) for c, s in self.keymap.items()}
        shapes = {c: ((int(torch.Size(v).numel()),) if _BLOCK_MOD.match(c) and len(v) == 2 else v)
                  for c, v in shapes.items()}
        # ComfyUI's per-layer formats may pack or pad a weight: the size is read from the logical shapes, and the
        # stored ones must be what the format stores for the expected size
        formats = self.quant_formats()
        self.config = infer_config({c: logical_shape(v, formats.get(c)) for c, v in shapes.items()}, self.where)
        want = expected_shapes(self.config)
        check_tensors(shapes, {k: stored_shape(v, formats[k]) if k in formats else v for k, v in want.items()},
                      self.where, "Krea 2", lambda k: self.keymap.get(k, k),
                      f"hidden {self.config.hidden}, head size {self.config.head_dim}")
        extra = [self.keymap[k] for k in shapes if k not in want]
        extra += [s for c, s in self.aux.items() if c not in MARKER_KEYS and
                  c.rsplit(".", 1)[0] + ".weight" not in want]
        self.extra = extra
        self._shapes = {k: shapes[k] for k in want}

    def quant_formats(self) -> dict:
        """``{canonical weight: ComfyUI per-layer format}`` for the weights that carry a ``comfy_quant`` config."""
        out = {}
        for c in self.aux:
            if c.endswith(".comfy_quant"):
                w = c[:-len(".comfy_quant")] + ".weight"
                if w in self.keymap:
                    out[w] = read_conf(self.load_aux(c), self.where, self.aux[c]).get("format")
        return out

    @property
    def layout_gguf(self) -> bool:
        """True when the tensors come from a GGUF file (``src.packed(key)`` gives their raw blocks)."""
        return hasattr(self.src, "packed")

    def keys(self):
        return list(self._shapes)

    def shape(self, k):
        return self._shapes[k]

    def load(self, k) -> torch.Tensor:
        return fix_shape(k, self.src[self.keymap[k]])

    def source_dtype(self, k):
        """The stored dtype of canonical tensor ``k`` (None when the source does not say)."""
        return self.src.dtype(self.keymap[k])

    def load_into(self, k, out: torch.Tensor) -> torch.Tensor:
        """Stream canonical tensor ``k`` into the contiguous CPU tensor ``out`` (same element count;
        cast to ``out.dtype``); see :meth:`TensorSource.read_into`."""
        return self.src.read_into(self.keymap[k], out)

    def load_aux(self, k) -> torch.Tensor:
        return self.src[self.aux[k]]

    def side(self, weight_key: str) -> dict:
        """The side tensors of a quantized weight (``{'weight_scale': t, 'comfy_quant': t, ...}``; empty for a
        plain weight), by suffix name without the dot."""
        base = weight_key.rsplit(".", 1)[0]
        return {suf[1:]: self.load_aux(base + suf) for suf in QUANT_SUFFIXES if base + suf in self.aux}

    def is_plain(self, weight_key: str) -> bool:
        """True when the stored tensor holds the weight's values as they are (no scale, no quant config)."""
        base = weight_key.rsplit(".", 1)[0]
        return not any(base + suf in self.aux for suf in (".scale_weight", ".weight_scale", ".comfy_quant"))

    def weight(self, k: str, keep_fp8: bool = False) -> torch.Tensor:
        """Canonical tensor ``k`` with its real values (scaled / quantized weights dequantized exactly, see
        :mod:`krea2_model.formats.quant`; an unscaled fp8 weight kept as fp8 when ``keep_fp8``)."""
        t = self.load(k)
        return t if self.is_plain(k) and t.dtype not in FP8 else \
            dequantize(t, self.side(k), self.where, self.keymap[k], keep_fp8=keep_fp8)

    def report_extra(self) -> None:
        if self.extra:
            log.warning("Krea 2: %s has %d tensors the model does not use, not loaded: %s",
                        self.where, len(self.extra), first_names(self.extra, 10))

    def state_dict(self, with_aux: bool = True) -> dict:
        """Every tensor under canonical names (materialised: for hosts whose loaders want a dict)."""
        out = {k: self.load(k) for k in self._shapes}
        if with_aux:
            for c in self.aux:
                out[c] = self.load_aux(c)
        return out


def load_transformer(source, *, dtype=None, device="cpu", operations=None,
                     progress: Callable[[int, int], None] | None = None) -> Krea2Transformer:
    """Load any supported layout into a :class:`Krea2Transformer` in eval mode.

    ``dtype`` None keeps each weight's stored floating dtype (fp8 weights are dequantised to bf16
    unless ``operations`` handles fp8 storage). Tensors stream from the file one at a time, so peak
    memory stays near the size of the weights kept. ``progress(done, total)`` is called per tensor.
    """
    ck = CanonicalCheckpoint(source)
    ck.report_extra()
    if ck.layout_gguf:  # block-quantized weights stay packed; see formats.gguf
        from .gguf import load_gguf_transformer
        return load_gguf_transformer(ck, dtype=dtype, device=device, operations=operations, progress=progress)
    with torch.device("meta"):
        model = Krea2Transformer(ck.config, dtype=dtype, operations=operations)
    params = dict(model.named_parameters())
    keys = ck.keys()
    on_cpu = torch.device(device).type == "cpu"
    for i, k in enumerate(keys):
        stored = ck.source_dtype(k)
        if k.endswith(".scale"):
            target = torch.float32  # norm scales always fp32 (see RMSNorm)
        elif dtype is not None:
            target = params[k].dtype  # what the (host's) modules were built to store
        elif stored is not None:
            target = stored if stored.is_floating_point and stored.itemsize >= 2 else torch.bfloat16
        else:
            target = None
        zero_copy = stored == target and on_cpu  # safetensors hands out pages of its memory map
        if ck.src.streams and not zero_copy and stored is not None and target is not None and ck.is_plain(k) and (
                stored.is_floating_point and (stored not in FP8 or target in FP8)):
            # A cast or another device: stream straight into a tensor of the kept dtype, so peak
            # memory is what is kept plus one read chunk (a bf16 file kept as fp8 never holds a bf16
            # copy, and no file page stays mapped). Same dtype on the CPU keeps the memory map:
            # nothing is copied, pages come in on first use and stay evictable (file-backed).
            out = torch.empty(ck.shape(k), dtype=target)
            ck.load_into(k, out)
            set_tensor(model, k, out if on_cpu else out.to(device))
            if progress:
                progress(i + 1, len(keys))
            continue
        if target is None or not target.is_floating_point or target.itemsize < 2 and target not in FP8:
            target = torch.bfloat16  # a quantized store without a float dtype to keep
        t = ck.weight(k, keep_fp8=target in FP8)  # scaled / quantized weights come back dequantised
        set_tensor(model, k, t.to(device=device, dtype=target))
        if progress:
            progress(i + 1, len(keys))
    model.eval()
    model.source_name = ck.where
    return model
