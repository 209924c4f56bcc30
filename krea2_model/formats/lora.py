"""Krea 2 LoRAs of every key style, parsed into patches on canonical parameter keys.

Pure PyTorch (never imports ``comfy``). One entry point reads a file or state dict:

    patches, unmapped = parse_lora(source, cfg)

and every patch names one canonical parameter (the module names of
:class:`~krea2_model.model.transformer.Krea2Transformer`, e.g. ``blocks.0.attn.wq.weight``). Every key of
the file is either used by a patch or returned in ``unmapped``; nothing is dropped silently.

Key styles recognised (any mix of them in one file): one row each in :data:`.lora_styles.STYLES`, listed
in that module.

A full checkpoint offered as a LoRA (plain weights only, covering most of the model) is refused rather than
added onto the weights.

Scaling: a low-rank update ``up @ down`` is multiplied by ``scale * alpha / rank`` (``rank`` = rows of
``down``; ``alpha`` absent = rank; ``scale`` from the metadata, default 1). LoHa: ``alpha / rows(hada_w1_b)``.
LoKr: ``alpha / rows(w2_b)`` (else ``rows(w1_b)``) when a factor is low-rank, 1 when both are full (as LyCORIS
and ComfyUI). ``diff`` deltas are literal (neither alpha nor scale applies).
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import torch

from ..errors import LoraError, first_names
from ..model.transformer import Krea2Config
from .lora_styles import (LOWRANK_ROLES, Names, bare, first_param, group_keys, metadata_defaults, names_for,
                          refuse_foreign, refuse_full_checkpoint, resolve_module)
from .safetensors_io import open_source

__all__ = ["KINDS", "LoraPatch", "apply", "delta", "merge_into", "names_for", "parse_lora", "to_comfy_patches"]

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
# Parsing: the key styles (lora_styles.py) name each key's module and role; here the roles become patches

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
    groups, plain = group_keys(src.keys())
    if not groups:
        refuse_full_checkpoint(plain, names, where)
    f = _File(src, names, cfg, where, *metadata_defaults(meta, where))
    patches, unmapped = [], []
    for k in plain:
        target = first_param(k, names)
        if target is None:
            unmapped.append(k)
        else:
            patches.append(LoraPatch(target, "diff", {"diff": _diff_tensor(src[k], target, names)}, sources=(k,)))
    for x, parts in groups.items():
        got, left = _module_patches(f, x, parts)
        patches += got
        unmapped += left
    refuse_foreign(patches, unmapped, where, src)
    _check_duplicates(patches, where)
    for p in patches:
        _check_shape(p, names, where)
    return patches, unmapped


@dataclass(frozen=True)
class _File:
    """The LoRA being parsed: its tensors, the model's names and size, and the file-wide defaults."""
    src: object
    names: Names
    cfg: Krea2Config
    where: str
    file_alpha: float | None
    file_scale: float
    alpha_pattern: dict


def _module_patches(f: _File, x: str, parts: dict) -> tuple[list, list]:
    """``(patches, unmapped keys)`` from the keys of module name ``x`` (``{role: key}``)."""
    res = resolve_module(x, f.names)
    param_target = first_param(x, f.names) if res is None else None
    if res is None and param_target is None:
        return [], list(parts.values())
    patches, unmapped, used = [], [], set()
    used |= _full_deltas(f, parts, res, param_target, patches)
    used |= _bias_deltas(f, parts, res, patches)
    lowrank = {r for r in parts if r in LOWRANK_ROLES}
    if lowrank:
        used |= lowrank
        if res is None:
            # low-rank factors on a non-module name (e.g. 'blocks.0.prenorm.scale.lora_A'): nothing to patch
            unmapped.extend(parts[r] for r in lowrank)
        else:
            used |= _low_rank(f, x, parts, lowrank, res, patches)
    unmapped.extend(v for r, v in parts.items() if r not in used)
    return patches, unmapped


def _full_deltas(f: _File, parts, res, param_target, patches) -> set:
    used = set()
    for role in ("diff", "w_norm"):
        if role not in parts:
            continue
        if res is not None and res[0] == "fused":
            patches.extend(_split_fused_diff(f.src[parts[role]], res[1], parts[role], f.where, f.cfg))
            used.add(role)
            continue
        tgt = param_target or (f.names.main.get(res[1]) if res[0] == "module" else None)
        if tgt is None:
            continue
        patches.append(LoraPatch(tgt, "diff", {"diff": _diff_tensor(f.src[parts[role]], tgt, f.names)},
                                 sources=(parts[role],)))
        used.add(role)
    return used


def _bias_deltas(f: _File, parts, res, patches) -> set:
    used = set()
    for role in ("diff_b", "b_norm"):
        if role in parts and res is not None and res[0] == "module":
            tgt = res[1] + ".bias"
            if tgt not in f.names.shapes:
                raise LoraError(f"{f.where}: LoRA key '{parts[role]}' is a bias delta for '{res[1]}', which "
                                "has no bias in Krea 2. The LoRA was made for another model.")
            patches.append(LoraPatch(tgt, "diff", {"diff": _diff_tensor(f.src[parts[role]], tgt, f.names)},
                                     sources=(parts[role],)))
            used.add(role)
    return used


def _low_rank(f: _File, x, parts, lowrank, res, patches) -> set:
    used = set()
    alpha = dora = None
    if "alpha" in parts:
        alpha = float(f.src[parts["alpha"]].float().item())
        used.add("alpha")
    if "dora" in parts:
        dora = f.src[parts["dora"]]
        used.add("dora")
    p = _lowrank_patch(x, parts, lowrank, f.src, alpha, f.file_scale, dora, f.where)
    if p.kind == "lora" and alpha is None:
        # file-wide alphas (metadata) are a LoRA convention; LyCORIS writes one per module
        b = bare(x)
        p.alpha = next((v for pk, v in f.alpha_pattern.items() if b.endswith(pk)), f.file_alpha)
    if res[0] == "fused":
        patches.extend(_split_fused(p, res[1], f.cfg, f.where, x))
        return used
    tgt = f.names.main.get(res[1])
    if tgt is None or not tgt.endswith(".weight"):
        raise LoraError(f"{f.where}: LoRA '{x}' targets '{res[1]}', which has no weight matrix in "
                        "Krea 2 (low-rank factors only apply to Linear weights).")
    p.key = tgt
    patches.append(p)
    return used


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


def _diff_tensor(t: torch.Tensor, target: str, names: Names) -> torch.Tensor:
    want = names.shapes[target]
    if tuple(t.shape) != want and target.endswith(".lin") and t.numel() == math.prod(want):
        return t.reshape(want)  # (6, F) scale_shift_table <-> flat (6F,) mod.lin; (2, F) either way
    return t


def _check_duplicates(patches, where):
    seen = {}
    for p in patches:
        if p.key in seen:
            raise LoraError(f"{where}: two entries of this LoRA patch '{p.key}': {first_names(seen[p.key], 3)} "
                            f"and {first_names(p.sources, 3)}. The file mixes two LoRAs or names one module twice.")
        seen[p.key] = p.sources


def _check_shape(p: LoraPatch, names: Names, where: str):
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
