"""Krea 2 LoRAs of every key style, parsed into patches on canonical parameter keys.

Pure PyTorch (never imports ``comfy``). One entry point reads a file or state dict:

    patches, unmapped = parse_lora(source, cfg)

and every patch names one canonical parameter (the module names of
:class:`~krea2_model.model.transformer.Krea2Transformer`, e.g. ``blocks.0.attn.wq.weight``). Every key of
the file is either used by a patch or returned in ``unmapped``; nothing is dropped silently.

Key styles recognised (any mix of them in one file):

* Krea reference: ``blocks.0.attn.wq.lora_A`` / ``.lora_B`` (no ``.weight``), rank / alpha / scale in the
  safetensors ``__metadata__`` (``lora_rank`` or ``rank``, ``lora_alpha`` or ``alpha``, ``scale``);
* native names under ``diffusion_model.`` / ``model.diffusion_model.`` / ``base_model.model.`` (ComfyUI,
  ai-toolkit), with ``lora_A.weight`` / ``lora_B.weight`` or ``lora_down.weight`` / ``lora_up.weight`` + ``.alpha``;
* diffusers / PEFT names (``transformer_blocks.0.attn.to_q``, ``final_layer.linear``...) bare or under
  ``transformer.`` / ``base_model.model.``, including ``.lora_A.default.weight``, diffusers'
  ``lora_adapter_metadata`` json (``r`` / ``lora_alpha`` / ``alpha_pattern``) and ``attn.to_out`` without ``.0``;
* kohya / musubi / SimpleTuner flattened names: ``lora_unet_blocks_0_attn_wq``,
  ``lora_unet_transformer_blocks_0_attn_to_q``, ``lycoris_...`` (matched against the model's module names,
  never split on ``_``), with ``ss_network_alpha`` as the file-wide alpha;
* LyCORIS: LoRA / LoCon (``lora_mid`` as a 2-D middle factor), LoKr (``lokr_w1`` or ``lokr_w1_a/b``,
  ``lokr_w2`` or ``lokr_w2_a/b``), LoHa (``hada_w1_a/b``, ``hada_w2_a/b``), DoRA (``dora_scale``; PEFT's
  ``lora_magnitude_vector``), fused ``attn.qkv`` / ``attn.wqkv`` / ``attn.to_qkv`` split into wq / wk / wv
  by the head layout (rows: q = heads*head_dim, then k and v = kv_heads*head_dim each; the down factor is
  shared);
* full-size deltas: ``X.diff`` / ``X.diff_b`` / ``X.w_norm`` / ``X.b_norm`` (ComfyUI: ``X`` a module, or a
  whole non-``.weight`` key as in ``diffusion_model.blocks.0.prenorm.scale.diff``), and a plain parameter name
  in a LoRA file (``diffusion_model.blocks.0.prenorm.scale``, diffusers ``transformer_blocks.0.scale_shift_table``
  (6, F) for ``blocks.0.mod.lin`` (6F,), ``final_layer.scale_shift_table`` for ``last.modulation.lin``).

A full checkpoint offered as a LoRA (plain weights only, covering most of the model) is refused rather than
added onto the weights.

Scaling: a low-rank update ``up @ down`` is multiplied by ``scale * alpha / rank`` (``rank`` = rows of
``down``; ``alpha`` absent = rank; ``scale`` from the metadata, default 1). LoHa: ``alpha / rows(hada_w1_b)``.
LoKr: ``alpha / rows(w2_b)`` (else ``rows(w1_b)``) when a factor is low-rank, 1 when both are full (as LyCORIS
and ComfyUI). ``diff`` deltas are literal (neither alpha nor scale applies).
"""

from __future__ import annotations

import functools
import json
import logging
import math
from dataclasses import dataclass, field

import torch

from ..errors import LoraError, first_names
from ..model.transformer import Krea2Config
from .safetensors_io import open_source
from .transformer_file import canonical_to_diffusers, expected_shapes

log = logging.getLogger("krea2")

KINDS = ("lora", "lokr", "loha", "diff")


@dataclass
class LoraPatch:
    """One update of one canonical parameter.

    ``key``: canonical parameter key (``blocks.0.attn.wq.weight``). ``kind`` and ``tensors``:

    * ``lora``: ``up (out, r)``, ``down (r, in)``, optional ``mid (r, r2)`` with then ``down (r2, in)``;
    * ``lokr``: ``w1`` or ``w1_a``/``w1_b``, ``w2`` or ``w2_a``/``w2_b``; delta ``kron(w1, w2)``;
    * ``loha``: ``w1_a (out, r)``, ``w1_b (r, in)``, ``w2_a``, ``w2_b``; delta ``(w1_a@w1_b) * (w2_a@w2_b)``;
    * ``diff``: ``diff``, already in the parameter's shape.

    ``alpha`` (None = rank) and ``scale`` set the multiplier (module docstring); ``dora_scale`` is DoRA's
    magnitude: ``(out,)`` / ``(out, 1)`` = norms of output rows (PEFT, LyCORIS ``wd_on_out``), ``(1, in)`` =
    norms of input columns (LyCORIS default). ``sources`` are the file keys this patch consumed.
    """

    key: str
    kind: str
    tensors: dict
    alpha: float | None = None
    scale: float = 1.0
    dora_scale: torch.Tensor | None = None
    sources: tuple = field(default_factory=tuple)

    def multiplier(self) -> float:
        """The factor the raw product of the factors is multiplied by (1 for ``diff``)."""
        t = self.tensors
        if self.kind == "diff":
            return 1.0
        if self.kind == "lora":
            rank = t["down"].shape[0]
            return self.scale * (1.0 if self.alpha is None else self.alpha / rank)
        if self.kind == "loha":
            return self.scale * (1.0 if self.alpha is None else self.alpha / t["w1_b"].shape[0])
        dim = None
        if "w1_b" in t:
            dim = t["w1_b"].shape[0]
        if "w2_b" in t:
            dim = t["w2_b"].shape[0]
        return self.scale * (self.alpha / dim if (self.alpha is not None and dim) else 1.0)

    def delta_shape(self) -> tuple:
        """The shape of the delta this patch produces (2-D for the low-rank kinds)."""
        t = self.tensors
        if self.kind == "diff":
            return tuple(t["diff"].shape)
        if self.kind == "lora":
            return (t["up"].shape[0], t["down"].shape[1])
        if self.kind == "loha":
            return (t["w1_a"].shape[0], t["w1_b"].shape[1])
        w1 = _lokr_factor_shape(t, "1")
        w2 = _lokr_factor_shape(t, "2")
        return (w1[0] * w2[0], w1[1] * w2[1])


def _lokr_factor_shape(t, n):
    if "w" + n in t:
        return tuple(t["w" + n].shape)
    return (t[f"w{n}_a"].shape[0], t[f"w{n}_b"].shape[1])


def _f32(x: torch.Tensor) -> torch.Tensor:
    return x.to(torch.float32)


def delta(patch: LoraPatch, shape=None, dtype=torch.float32) -> torch.Tensor:
    """The full additive delta of ``patch`` at strength 1 (DoRA's magnitude not included: see :func:`apply`),
    computed in float32, reshaped to ``shape`` (default: the patch's own shape) and cast to ``dtype``."""
    t = patch.tensors
    if patch.kind == "diff":
        d = _f32(t["diff"])
    elif patch.kind == "lora":
        up = _f32(t["up"])
        if "mid" in t:
            up = up @ _f32(t["mid"])
        d = up @ _f32(t["down"])
    elif patch.kind == "loha":
        d = (_f32(t["w1_a"]) @ _f32(t["w1_b"])) * (_f32(t["w2_a"]) @ _f32(t["w2_b"]))
    elif patch.kind == "lokr":
        w1 = _f32(t["w1"]) if "w1" in t else _f32(t["w1_a"]) @ _f32(t["w1_b"])
        w2 = _f32(t["w2"]) if "w2" in t else _f32(t["w2_a"]) @ _f32(t["w2_b"])
        d = torch.kron(w1, w2)
    else:
        raise LoraError(f"unknown LoRA patch kind {patch.kind!r} for '{patch.key}'")
    m = patch.multiplier()
    if m != 1.0:
        d = d * m
    if shape is not None:
        d = d.reshape(shape)
    return d.to(dtype)


def apply(patch: LoraPatch, weight: torch.Tensor, strength: float = 1.0) -> torch.Tensor:
    """``weight`` with ``patch`` applied at ``strength``, in ``weight``'s dtype (maths in float32).

    Plain kinds: ``W + strength * delta``. DoRA (``dora_scale`` set): ``W' = m * (W + delta) / ||W + delta||``
    with the norm taken per output row for ``m (out,)`` / ``(out, 1)`` and per input column for ``m (1, in)``;
    the result is ``W + strength * (W' - W)`` (strength 1 = the DoRA weight, 0 = the base weight).
    """
    w = _f32(weight)
    d = delta(patch, tuple(weight.shape))
    if patch.dora_scale is None:
        out = w + strength * d
    else:
        wc = w + d
        m = _f32(patch.dora_scale)
        if _dora_on_rows(m, tuple(weight.shape)):
            norm = wc.reshape(wc.shape[0], -1).norm(dim=1).reshape(wc.shape[0], *[1] * (wc.ndim - 1))
            m = m.reshape(norm.shape)
        else:
            norm = wc.norm(dim=0, keepdim=True)
            m = m.reshape(norm.shape)
        out = w + strength * (m * wc / norm - w)
    return out.to(weight.dtype)


def _dora_on_rows(m: torch.Tensor, shape: tuple) -> bool:
    """True for output-row magnitudes ``(out,)`` / ``(out, 1)``, False for input-column ones ``(1, in)``."""
    return m.ndim == 1 or (m.shape[0] == shape[0] and m.shape[-1] == 1)


def merge_into(state_dict: dict, patches, strength: float = 1.0) -> dict:
    """A copy of canonical ``state_dict`` with ``patches`` applied at ``strength`` (inputs untouched).
    Stacking LoRAs = calling it once per LoRA. A patch for a key the dict lacks raises :class:`LoraError`."""
    out = dict(state_dict)
    for p in patches:
        if p.key not in out:
            raise LoraError(f"LoRA patch for '{p.key}', which the model does not have.")
        out[p.key] = apply(p, out[p.key], strength)
    return out


def to_comfy_patches(patches, key_prefix: str = "diffusion_model.", *, adapters=None, base_weights=None) -> dict:
    """``{key_prefix + canonical key: patch}`` for a host's ``ModelPatcher.add_patches`` (ComfyUI conventions).

    ``diff`` patches become ``("diff", (tensor,))``, which ComfyUI applies as is. Low-rank patches become
    ``(kind, weights)`` with ``kind`` in ``"lora"``, ``"lokr"``, ``"loha"`` and ``weights`` the positional tuple
    of ComfyUI's adapter for that kind (its ``weights`` attribute):

    * ``lora``: ``(up, down, alpha, None, dora_scale, None)`` (a middle factor is folded into ``up``);
    * ``lokr``: ``(w1, w2, alpha, w1_a, w1_b, w2_a, w2_b, None, dora_scale)``;
    * ``loha``: ``(w1_a, w1_b, alpha, w2_a, w2_b, None, None, dora_scale)``.

    ``scale`` is folded into the first factor, so the host's ``alpha / rank`` convention gives the same delta
    as :func:`delta`. ComfyUI before ``comfy.weight_adapter`` took these ``(kind, weights)`` tuples as they are;
    current ComfyUI (0.33) needs adapter objects: pass ``adapters`` (``{"lora": LoRAAdapter, "lokr":
    LoKrAdapter, "loha": LoHaAdapter}``) and the low-rank entries are built as ``adapters[kind](set(), weights)``.

    DoRA: ComfyUI's adapters agree with :func:`apply` for input-column magnitudes ``(1, in)`` only (and not
    when the weight has a single output row); for output-row ones they normalise by the *base* weight's norm (or fail on PEFT's ``(out,)``). So with
    ``base_weights`` (``{canonical key: tensor}``) every DoRA patch is precomputed into an exact
    ``("diff", (W' - W,))`` (linear in strength, as the host scales it); without them a row-magnitude DoRA
    patch raises :class:`LoraError`.
    """
    out = {}
    for p in patches:
        k = key_prefix + p.key
        t = p.tensors
        if p.kind == "diff":
            out[k] = ("diff", (t["diff"],))
            continue
        if p.dora_scale is not None and base_weights is not None and p.key in base_weights:
            w = _f32(base_weights[p.key])
            out[k] = ("diff", ((apply(p, w, 1.0) - w).to(base_weights[p.key].dtype),))
            continue
        if p.dora_scale is not None and (_dora_on_rows(p.dora_scale, p.delta_shape()) or p.delta_shape()[0] == 1):
            raise LoraError(f"DoRA patch for '{p.key}' has per-output-row magnitudes (or one output row), which "
                            "the host's adapter applies differently; pass base_weights to precompute it exactly.")
        s = p.scale
        if p.kind == "lora":
            up = t["up"] if "mid" not in t else (_f32(t["up"]) @ _f32(t["mid"])).to(t["up"].dtype)
            up = up if s == 1.0 else up * s
            weights = (up, t["down"], p.alpha, None, p.dora_scale, None)
        elif p.kind == "lokr":
            w1, w1_a = t.get("w1"), t.get("w1_a")
            if s != 1.0:
                if w1 is not None:
                    w1 = w1 * s
                else:
                    w1_a = w1_a * s
            weights = (w1, t.get("w2"), p.alpha, w1_a, t.get("w1_b"), t.get("w2_a"), t.get("w2_b"), None,
                       p.dora_scale)
        else:
            w1_a = t["w1_a"] if s == 1.0 else t["w1_a"] * s
            weights = (w1_a, t["w1_b"], p.alpha, t["w2_a"], t["w2_b"], None, None, p.dora_scale)
        out[k] = adapters[p.kind](set(), weights) if adapters is not None else (p.kind, weights)
    return out


# ---------------------------------------------------------------------------------------------------------
# Names

_DOTTED_PREFIXES = ("base_model.model.", "model.diffusion_model.", "diffusion_model.", "transformer.", "unet.",
                    "model.")
_FLAT_PREFIXES = ("lora_unet_", "lycoris_", "lora_transformer_")
_FUSED_SUFFIXES = ("qkv", "wqkv", "to_qkv")


@dataclass
class _Names:
    shapes: dict          # canonical param -> shape
    params: dict          # alias param key -> canonical param key
    modules: dict         # alias module name (dotted or flattened) -> canonical module
    main: dict            # canonical module -> its main parameter (weight, else scale, else lin)
    fused: dict           # alias of a fused qkv module -> canonical attention prefix ("blocks.0.attn")


@functools.lru_cache(maxsize=8)
def names_for(cfg: Krea2Config) -> _Names:
    """Every name a LoRA may use for each canonical parameter / module of a model of size ``cfg``."""
    shapes = expected_shapes(cfg)
    params, modules, main, fused = {}, {}, {}, {}

    def add_module(alias, canon):
        for a in (alias, alias.replace(".", "_")):
            prev = modules.setdefault(a, canon)
            assert prev == canon, (a, prev, canon)

    for k in shapes:
        mod, _, pname = k.rpartition(".")
        d = canonical_to_diffusers(k)
        params[k] = k
        params[d] = k
        if pname in ("weight", "scale", "lin"):  # a module here has exactly one of them
            main[mod] = k
            add_module(mod, mod)
        if d.endswith(".weight") and pname in ("weight", "scale"):
            dmod = d[: -len(".weight")]
            add_module(dmod, mod)
            if dmod.endswith(".to_out.0"):
                add_module(dmod[:-2], mod)
                params[dmod[:-2] + ".weight"] = k
        if k.endswith(".attn.wq.weight"):
            prefix = k[: -len(".wq.weight")]
            dprefix = d[: -len(".to_q.weight")]
            for p in {prefix, dprefix}:
                for s in _FUSED_SUFFIXES:
                    for a in (f"{p}.{s}", f"{p}.{s}".replace(".", "_")):
                        fused[a] = prefix
    return _Names(shapes, params, modules, main, fused)


def _candidates(name: str):
    """``name`` and every form of it with known prefixes removed (dotted and flattened)."""
    seen, todo = [], [name]
    while todo:
        n = todo.pop(0)
        if n in seen:
            continue
        seen.append(n)
        for p in _DOTTED_PREFIXES + _FLAT_PREFIXES:
            if n.startswith(p):
                todo.append(n[len(p):])
    return seen


# role suffixes: (suffix including its separator, role); longest first so '.lora_A.weight' beats '.lora_A'
_ROLE_SUFFIXES = sorted([
    (".lora_A.default.weight", "down"), (".lora_B.default.weight", "up"),
    (".lora_A.weight", "down"), (".lora_B.weight", "up"), (".lora_A", "down"), (".lora_B", "up"),
    (".lora_down.weight", "down"), (".lora_up.weight", "up"), (".lora_mid.weight", "mid"),
    (".lora.down.weight", "down"), (".lora.up.weight", "up"),
    ("_lora.down.weight", "down"), ("_lora.up.weight", "up"),
    (".lora_linear_layer.down.weight", "down"), (".lora_linear_layer.up.weight", "up"),
    (".alpha", "alpha"), (".dora_scale", "dora"),
    (".lora_magnitude_vector", "dora"), (".lora_magnitude_vector.weight", "dora"),
    (".lora_magnitude_vector.default", "dora"), (".lora_magnitude_vector.default.weight", "dora"),
    (".lokr_w1", "w1"), (".lokr_w2", "w2"), (".lokr_w1_a", "w1_a"), (".lokr_w1_b", "w1_b"),
    (".lokr_w2_a", "w2_a"), (".lokr_w2_b", "w2_b"), (".lokr_t2", "lokr_t2"),
    (".hada_w1_a", "h1_a"), (".hada_w1_b", "h1_b"), (".hada_w2_a", "h2_a"), (".hada_w2_b", "h2_b"),
    (".hada_t1", "hada_t"), (".hada_t2", "hada_t"),
    (".diff", "diff"), (".diff_b", "diff_b"), (".w_norm", "w_norm"), (".b_norm", "b_norm"),
], key=lambda s: -len(s[0]))

_LOWRANK_ROLES = {"down", "up", "mid", "w1", "w2", "w1_a", "w1_b", "w2_a", "w2_b", "h1_a", "h1_b", "h2_a", "h2_b"}

# What other architectures' LoRA keys look like (checked on the keys that did not map)
_FOREIGN = [
    (("img_mod", "txt_mod", "img_mlp", "txt_mlp"), "a Qwen-Image LoRA"),
    (("double_blocks", "single_blocks", "single_transformer_blocks", "ff_context", "norm1_context",
      "txt_attn", "img_attn"), "a Flux-family (Flux, Chroma, HunyuanVideo) LoRA"),
    (("add_q_proj", "add_k_proj", "add_v_proj", "to_add_out"),
     "a two-stream MMDiT LoRA (Flux, Qwen-Image or SD3 family)"),
    (("input_blocks", "output_blocks", "middle_block", "down_blocks", "up_blocks", "mid_block"),
     "a Stable Diffusion 1.x / 2.x / XL (UNet) LoRA"),
    (("joint_blocks", "context_block", "x_block"), "an SD3 LoRA"),
    (("self_attn.q", "self_attn_q", "cross_attn", "ffn.0", "ffn_0"), "a Wan video LoRA"),
    (("attention.qkv", "attention_qkv", "adaLN_modulation", "feed_forward.w1", "feed_forward_w1"),
     "a Lumina 2 / Z-Image LoRA"),
]
_TEXT_ENCODER = ("lora_te_", "lora_te1_", "lora_te2_", "lora_te3_", "text_encoder.", "text_encoders.",
                 "text_encoder_2.", "te.", "lora_te.")


def _looks_like(keys) -> str | None:
    for marks, what in _FOREIGN:
        if any(m in k for k in keys for m in marks):
            return what
    return None


def _is_text_encoder(k: str) -> bool:
    return any(k.startswith(p) or ("." + p) in k for p in _TEXT_ENCODER)


def _num(v):
    try:
        return float(v)
    except (TypeError, ValueError):
        return None


def _meta_number(meta: dict, keys, where: str):
    """The first of ``keys`` present in ``meta`` as a float; a present value that is not a number is warned
    about by name (it would otherwise turn into "no alpha" and the strength would be off by alpha / rank)."""
    for k in keys:
        if k in meta:
            v = _num(meta[k])
            if v is None:
                log.warning("Krea 2: %s: LoRA metadata '%s' = %r is not a number; ignored (the LoRA is applied as "
                            "if the file gave no %s).", where, k, meta[k], k)
                continue
            return v
    return None


def _adapter_config(raw, where: str) -> dict:
    """diffusers' ``lora_adapter_metadata`` JSON as a dict; malformed JSON is warned about by name."""
    try:
        cfg = json.loads(raw) if isinstance(raw, str) else dict(raw)
    except (ValueError, TypeError) as e:
        log.warning("Krea 2: %s: LoRA metadata 'lora_adapter_metadata' is not valid JSON (%s); its rank and alpha "
                    "are ignored, so the strength may be off by alpha / rank. Re-save the LoRA.", where, e)
        return {}
    if not isinstance(cfg, dict):
        log.warning("Krea 2: %s: LoRA metadata 'lora_adapter_metadata' holds %s, not a JSON object; ignored.",
                    where, type(cfg).__name__)
        return {}
    return cfg


def _metadata_defaults(meta: dict, where: str = "LoRA") -> tuple[float | None, float, dict]:
    """(file-wide alpha or None, scale, {module-name suffix: alpha}) from safetensors metadata. Alpha absent
    means alpha = rank of each module, so a file-wide rank alone changes nothing and is not read."""
    meta = meta or {}
    alpha = _meta_number(meta, ("lora_alpha", "alpha", "network_alpha", "ss_network_alpha"), where)
    scale = _meta_number(meta, ("scale",), where)
    pattern = {}
    raw = meta.get("lora_adapter_metadata")
    cfg = _adapter_config(raw, where) if raw else {}
    for k, v in cfg.items():
        base = k.rsplit(".", 1)[-1]
        if base == "lora_alpha" and alpha is None:
            alpha = _meta_number({f"lora_adapter_metadata.{k}": v}, (f"lora_adapter_metadata.{k}",), where)
        elif base == "alpha_pattern" and isinstance(v, dict):
            for pk, pv in v.items():
                got = _meta_number({f"alpha_pattern.{pk}": pv}, (f"alpha_pattern.{pk}",), where)
                if got is not None:
                    pattern[pk] = got
    return alpha, (1.0 if scale is None else scale), pattern


def _bare(name: str) -> str:
    c = _candidates(name)
    return c[-1]


# ---------------------------------------------------------------------------------------------------------
# Parsing

def parse_lora(source, cfg: Krea2Config, *, metadata: dict | None = None) -> tuple[list[LoraPatch], list[str]]:
    """Read a LoRA of any supported style (module docstring) for a model of size ``cfg``.

    ``source``: a ``.safetensors`` path, a state dict or a :class:`TensorSource` (pickles are refused).
    ``metadata``: the safetensors ``__metadata__`` (default: the file's own). Returns ``(patches, unmapped)``:
    one :class:`LoraPatch` per target parameter (fused qkv already split) and the file keys nothing used.

    Raises :class:`LoraError` when no key targets Krea 2 or the keys look like another architecture (the
    message says which), when a factor lacks its partner, when two entries patch the same parameter, or when a
    delta's shape does not fit the model (the message names the key, the shape seen and the shape expected).
    """
    src = open_source(source)
    where = src.where
    meta = dict(src.metadata) if metadata is None else dict(metadata)
    names = names_for(cfg)
    groups, plain = _group_keys(src.keys())
    if not groups:
        _refuse_full_checkpoint(plain, names, where)
    ctx = _Parse(src, names, cfg, where, *_metadata_defaults(meta, where))
    for k in plain:
        target = _first_param(k, names)
        if target is None:
            ctx.unmapped.append(k)
        else:
            ctx.patches.append(LoraPatch(target, "diff", {"diff": _diff_tensor(src[k], target, names)}, sources=(k,)))
    for x, parts in groups.items():
        ctx.module(x, parts)
    _check_foreign(ctx.patches, ctx.unmapped, where, src)
    _check_duplicates(ctx.patches, where)
    for p in ctx.patches:
        _check_shape(p, names, where)
    return ctx.patches, ctx.unmapped


def _group_keys(keys) -> tuple[dict, list]:
    """``({module name: {role: key}}, plain keys)``: keys ending in a factor / alpha / delta suffix grouped by
    the module they belong to; the rest (whole parameters) listed apart."""
    groups: dict[str, dict[str, str]] = {}
    plain: list[str] = []
    for k in keys:
        for suf, role in _ROLE_SUFFIXES:
            if k.endswith(suf) and len(k) > len(suf):
                groups.setdefault(k[: -len(suf)], {})[role] = k
                break
        else:
            plain.append(k)
    return groups, plain


def _refuse_full_checkpoint(plain, names, where):
    covered = {t for k in plain for t in [_first_param(k, names)] if t is not None}
    if len(covered) > len(names.shapes) // 2:
        raise LoraError(f"{where}: this is a full Krea 2 checkpoint ({len(covered)} of the model's "
                        f"{len(names.shapes)} tensors, no LoRA factors), not a LoRA. Load it with "
                        "Krea2ModelLoader; merging it as a LoRA would add every weight to itself.")


@dataclass
class _Parse:
    """One parse in progress: the file, the model's names, the file-wide defaults, and what came out."""
    src: object
    names: "_Names"
    cfg: Krea2Config
    where: str
    file_alpha: float | None
    file_scale: float
    alpha_pattern: dict
    patches: list = field(default_factory=list)
    unmapped: list = field(default_factory=list)

    def resolve_module(self, name):
        for c in _candidates(name):
            if c in self.names.modules:
                return "module", self.names.modules[c]
            if c in self.names.fused:
                return "fused", self.names.fused[c]
        return None

    def module(self, x: str, parts: dict) -> None:
        """Every patch the keys of module ``x`` (``{role: key}``) make; keys no patch uses go to ``unmapped``."""
        res = self.resolve_module(x)
        param_target = _first_param(x, self.names) if res is None else None
        if res is None and param_target is None:
            self.unmapped.extend(parts.values())
            return
        used = self.full_deltas(parts, res, param_target) | self.bias_deltas(parts, res)
        lowrank = {r for r in parts if r in _LOWRANK_ROLES}
        if lowrank:
            used |= lowrank
            if res is None:
                # low-rank factors on a non-module name (e.g. 'blocks.0.prenorm.scale.lora_A'): nothing to patch
                self.unmapped.extend(parts[r] for r in lowrank)
            else:
                used |= self.low_rank(x, parts, lowrank, res)
        self.unmapped.extend(v for r, v in parts.items() if r not in used)

    def full_deltas(self, parts, res, param_target) -> set:
        used = set()
        for role in ("diff", "w_norm"):
            if role not in parts:
                continue
            if res is not None and res[0] == "fused":
                self.patches.extend(_split_fused_diff(self.src[parts[role]], res[1], parts[role], self.where, self.cfg))
                used.add(role)
                continue
            tgt = param_target or (self.names.main.get(res[1]) if res[0] == "module" else None)
            if tgt is None:
                continue
            self.patches.append(LoraPatch(tgt, "diff", {"diff": _diff_tensor(self.src[parts[role]], tgt, self.names)},
                                          sources=(parts[role],)))
            used.add(role)
        return used

    def bias_deltas(self, parts, res) -> set:
        used = set()
        for role in ("diff_b", "b_norm"):
            if role in parts and res is not None and res[0] == "module":
                tgt = res[1] + ".bias"
                if tgt not in self.names.shapes:
                    raise LoraError(f"{self.where}: LoRA key '{parts[role]}' is a bias delta for '{res[1]}', which "
                                    "has no bias in Krea 2. The LoRA was made for another model.")
                self.patches.append(LoraPatch(tgt, "diff", {"diff": _diff_tensor(self.src[parts[role]], tgt,
                                                                                  self.names)},
                                              sources=(parts[role],)))
                used.add(role)
        return used

    def low_rank(self, x, parts, lowrank, res) -> set:
        used = set()
        alpha = dora = None
        if "alpha" in parts:
            alpha = float(self.src[parts["alpha"]].float().item())
            used.add("alpha")
        if "dora" in parts:
            dora = self.src[parts["dora"]]
            used.add("dora")
        p = _lowrank_patch(x, parts, lowrank, self.src, alpha, self.file_scale, dora, self.where)
        if p.kind == "lora" and alpha is None:
            # file-wide alphas (metadata) are a LoRA convention; LyCORIS writes one per module
            bare = _bare(x)
            p.alpha = next((v for pk, v in self.alpha_pattern.items() if bare.endswith(pk)), self.file_alpha)
        if res[0] == "fused":
            self.patches.extend(_split_fused(p, res[1], self.cfg, self.where, x))
            return used
        tgt = self.names.main.get(res[1])
        if tgt is None or not tgt.endswith(".weight"):
            raise LoraError(f"{self.where}: LoRA '{x}' targets '{res[1]}', which has no weight matrix in "
                            "Krea 2 (low-rank factors only apply to Linear weights).")
        p.key = tgt
        self.patches.append(p)
        return used


def _first_param(name: str, names: _Names):
    for c in _candidates(name):
        if c in names.params:
            return names.params[c]
    return None


def _lowrank_patch(x, parts, roles, src, alpha, scale, dora, where) -> LoraPatch:
    def need(*rs):
        miss = [r for r in rs if r not in parts]
        if miss:
            have = ", ".join(parts[r] for r in sorted(roles))
            raise LoraError(f"{where}: LoRA module '{x}' is incomplete: it has {have} but not its "
                            f"{' / '.join(miss)} factor. The file is truncated or was saved by a broken tool.")
        return {r: src[parts[r]] for r in rs}

    srcs = tuple(parts[r] for r in sorted(roles)) + tuple(parts[r] for r in ("alpha", "dora") if r in parts)
    if roles & {"up", "down", "mid"}:
        t = need("up", "down")
        if "mid" in roles:
            t["mid"] = src[parts["mid"]]
            if t["mid"].ndim != 2:
                raise LoraError(f"{where}: LoRA key '{parts['mid']}' is a {t['mid'].ndim}-D Tucker middle factor "
                                "(a convolution LoCon); Krea 2 has only Linear layers.")
        return LoraPatch("", "lora", t, alpha, scale, dora, srcs)
    if roles & {"h1_a", "h1_b", "h2_a", "h2_b"}:
        t = need("h1_a", "h1_b", "h2_a", "h2_b")
        if "hada_t" in parts:
            raise LoraError(f"{where}: LoHa module '{x}' uses Tucker (CP) factors, made for convolutions; "
                            "Krea 2 has only Linear layers.")
        t = {"w1_a": t["h1_a"], "w1_b": t["h1_b"], "w2_a": t["h2_a"], "w2_b": t["h2_b"]}
        return LoraPatch("", "loha", t, alpha, scale, dora, srcs)
    if "lokr_t2" in parts:
        raise LoraError(f"{where}: LoKr module '{x}' uses a Tucker factor (lokr_t2), made for convolutions; "
                        "Krea 2 has only Linear layers.")
    t = {}
    for n in ("1", "2"):
        if "w" + n in parts:
            t["w" + n] = src[parts["w" + n]]
        else:
            t.update({f"w{n}_{s}": v for s, v in zip("ab", need(f"w{n}_a", f"w{n}_b").values())})
    return LoraPatch("", "lokr", t, alpha, scale, dora, srcs)


def _qkv_rows(cfg: Krea2Config, prefix: str) -> tuple[int, int]:
    if prefix.startswith("txtfusion."):
        return cfg.text_heads * cfg.text_head_dim, cfg.text_kv_heads * cfg.text_head_dim
    return cfg.heads * cfg.head_dim, cfg.kv_heads * cfg.head_dim


def _split_fused(p: LoraPatch, prefix: str, cfg: Krea2Config, where: str, x: str) -> list[LoraPatch]:
    """Split a fused qkv patch into wq / wk / wv patches by rows (q rows, then k, then v)."""
    q, kv = _qkv_rows(cfg, prefix)
    rows = (q, kv, kv)
    out_rows = p.delta_shape()[0]
    if out_rows != sum(rows):
        raise LoraError(f"{where}: fused qkv LoRA '{x}' has {out_rows} output rows, expected {sum(rows)} "
                        f"(q {q} + k {kv} + v {kv}) for this Krea 2 model. The LoRA was made for another model size.")
    dora_parts = [None] * 3
    if p.dora_scale is not None:
        m = p.dora_scale
        if m.ndim == 2 and m.shape[0] == 1 and out_rows != 1:
            raise LoraError(f"{where}: DoRA on fused qkv '{x}' stores column magnitudes (1, in) of the fused "
                            "matrix, which cannot be split into wq / wk / wv.")
        dora_parts = list(m.split(rows, dim=0))
    targets = [f"{prefix}.{n}.weight" for n in ("wq", "wk", "wv")]
    t = p.tensors
    out = []
    if p.kind == "lora":
        for tgt, up, dm in zip(targets, t["up"].split(rows, dim=0), dora_parts):
            tt = dict(t, up=up)
            out.append(LoraPatch(tgt, "lora", tt, p.alpha, p.scale, dm, p.sources))
    elif p.kind == "loha":
        for tgt, a1, a2, dm in zip(targets, t["w1_a"].split(rows, 0), t["w2_a"].split(rows, 0), dora_parts):
            out.append(LoraPatch(tgt, "loha", dict(t, w1_a=a1, w2_a=a2), p.alpha, p.scale, dm, p.sources))
    else:
        if p.dora_scale is not None:
            raise LoraError(f"{where}: DoRA LoKr on fused qkv '{x}' cannot be split into wq / wk / wv.")
        d = delta(p)
        for tgt, part in zip(targets, d.split(rows, dim=0)):
            out.append(LoraPatch(tgt, "diff", {"diff": part.contiguous()}, sources=p.sources))
    return out


def _split_fused_diff(t, prefix, key, where, cfg) -> list[LoraPatch]:
    q, kv = _qkv_rows(cfg, prefix)
    if t.ndim != 2 or t.shape[0] != q + 2 * kv:
        raise LoraError(f"{where}: fused qkv delta '{key}' has shape {list(t.shape)}, expected "
                        f"[{q + 2 * kv}, in] (q {q} + k {kv} + v {kv}) for this Krea 2 model.")
    return [LoraPatch(f"{prefix}.{n}.weight", "diff", {"diff": part.contiguous()}, sources=(key,))
            for n, part in zip(("wq", "wk", "wv"), t.split((q, kv, kv), dim=0))]


def _diff_tensor(t: torch.Tensor, target: str, names: _Names) -> torch.Tensor:
    want = names.shapes[target]
    if tuple(t.shape) != want and target.endswith(".lin") and t.numel() == math.prod(want):
        return t.reshape(want)  # (6, F) scale_shift_table <-> flat (6F,) mod.lin; (2, F) either way
    return t


def _check_foreign(patches, unmapped, where, src):
    foreign = [k for k in unmapped if not _is_text_encoder(k)]
    what = _looks_like(foreign)
    if what:
        raise LoraError(f"{where}: this LoRA is not for Krea 2: it looks like {what} "
                        f"(keys such as {first_names([k for k in foreign if _looks_like([k])], 3)}). "
                        "Use it with the model it was trained for.")
    if patches:
        return
    keys = list(src.keys())
    if keys and all(_is_text_encoder(k) for k in keys):
        raise LoraError(f"{where}: this LoRA only patches a text encoder ({first_names(keys, 3)}); "
                        "Krea2LoraLoader applies LoRAs to the Krea 2 transformer.")
    what = _looks_like(keys)
    raise LoraError(f"{where}: no key of this LoRA targets a Krea 2 module"
                    f"{' - it looks like ' + what if what else ''}. {len(keys)} keys, e.g. "
                    f"{first_names(keys, 3)}. Krea 2 LoRAs name modules such as 'blocks.0.attn.wq' or "
                    "'transformer_blocks.0.attn.to_q'.")


def _check_duplicates(patches, where):
    seen = {}
    for p in patches:
        if p.key in seen:
            raise LoraError(f"{where}: two entries of this LoRA patch '{p.key}': {first_names(seen[p.key], 3)} "
                            f"and {first_names(p.sources, 3)}. The file mixes two LoRAs or names one module twice.")
        seen[p.key] = p.sources


def _check_shape(p: LoraPatch, names: _Names, where: str):
    want = tuple(names.shapes[p.key])
    seen = p.delta_shape()
    key = p.sources[0] if p.sources else p.key
    if seen != want:
        raise LoraError(f"{where}: LoRA key '{key}' gives a delta of shape {list(seen)} for '{p.key}', expected "
                        f"{list(want)}. The LoRA was made for another model (or another Krea 2 size).")
    t = p.tensors
    if p.kind == "lora":
        inner = t["mid"].shape if "mid" in t else None
        r_up, r_down = t["up"].shape[1], t["down"].shape[0]
        ok = (inner[0] == r_up and inner[1] == r_down) if inner is not None else r_up == r_down
        if t["up"].ndim != 2 or t["down"].ndim != 2 or not ok:
            raise LoraError(f"{where}: LoRA key '{key}': up {list(t['up'].shape)} and down "
                            f"{list(t['down'].shape)} ranks do not match.")
    elif p.kind == "loha":
        for a, b in (("w1_a", "w1_b"), ("w2_a", "w2_b")):
            if t[a].shape[1] != t[b].shape[0] or (t["w2_a"].shape[0], t["w2_b"].shape[1]) != want:
                raise LoraError(f"{where}: LoHa key '{key}': factors {list(t[a].shape)} and {list(t[b].shape)} "
                                f"do not make a {list(want)} matrix.")
    elif p.kind == "lokr":
        for n in ("1", "2"):
            if f"w{n}_a" in t and t[f"w{n}_a"].shape[1] != t[f"w{n}_b"].shape[0]:
                raise LoraError(f"{where}: LoKr key '{key}': w{n}_a {list(t[f'w{n}_a'].shape)} and w{n}_b "
                                f"{list(t[f'w{n}_b'].shape)} ranks do not match.")
    if p.dora_scale is not None:
        m = p.dora_scale
        ok = m.numel() == want[0] and (m.ndim == 1 or (m.ndim == 2 and m.shape[1] == 1)) or \
            (m.ndim == 2 and m.shape[0] == 1 and m.shape[1] == want[1])
        if not ok:
            raise LoraError(f"{where}: DoRA magnitude for '{p.key}' has shape {list(m.shape)}, expected "
                            f"[{want[0]}], [{want[0]}, 1] or [1, {want[1]}].")
