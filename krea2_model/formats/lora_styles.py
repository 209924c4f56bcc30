"""The key styles Krea 2 LoRAs come in: one table entry per style, and how a key is read with them.

A LoRA key is ``<prefix><module name><suffix>``. The suffix gives the key's role in a patch (``down``, ``up``,
``alpha``, ``w1_a``, ``diff``...), the prefix is stripped, and what is left is looked up among the names the
styles give the model's modules and parameters (:func:`names_for`). The table is the union of its entries:
any prefix, name and suffix of it may meet in one key, and one file may mix styles. A new style is one
:class:`KeyStyle` row (plus, for new names, one small alias function).

Also here: the recognisers for files that are not Krea 2 LoRAs (other architectures, text-encoder-only LoRAs,
full checkpoints) and the file-wide defaults read from the safetensors metadata. Pure Python: the patches are
built, checked and applied in :mod:`.lora`.

The styles in words (any mix of them in one file):

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
"""

from __future__ import annotations

import functools
import json
import logging
from dataclasses import dataclass
from typing import Callable

from ..errors import LoraError, first_names
from ..model.transformer import Krea2Config
from .transformer_file import canonical_to_diffusers, expected_shapes

log = logging.getLogger("krea2")

# a fused q/k/v module of an attention: '<attention>.<suffix>' (split into wq / wk / wv by rows)
FUSED_SUFFIXES = ("qkv", "wqkv", "to_qkv")
# the parameter a module is patched through (a module of Krea 2 has exactly one of them)
_MAIN_PARAMS = ("weight", "scale", "lin")


def _krea_names(param: str, diffusers_param: str):
    """Krea's own names: parameter ``blocks.0.attn.wq.weight``, module ``blocks.0.attn.wq``, fused
    ``blocks.0.attn.qkv``."""
    mod, _, pname = param.rpartition(".")
    yield "param", param
    if pname in _MAIN_PARAMS:
        yield "module", mod
    if param.endswith(".attn.wq.weight"):
        for s in FUSED_SUFFIXES:
            yield "fused", f"{param[: -len('.wq.weight')]}.{s}"


def _diffusers_names(param: str, diffusers_param: str):
    """diffusers' names: parameter ``transformer_blocks.0.scale_shift_table``, module
    ``transformer_blocks.0.attn.to_q``, ``attn.to_out`` with or without ``.0``, fused ``...attn.to_qkv``."""
    d = diffusers_param
    yield "param", d
    if d.endswith(".weight") and param.rpartition(".")[2] in ("weight", "scale"):
        dmod = d[: -len(".weight")]
        yield "module", dmod
        if dmod.endswith(".to_out.0"):
            yield "module", dmod[:-2]
            yield "param", dmod[:-2] + ".weight"
    if param.endswith(".attn.wq.weight"):
        for s in FUSED_SUFFIXES:
            yield "fused", f"{d[: -len('.to_q.weight')]}.{s}"


@dataclass(frozen=True)
class KeyStyle:
    """One LoRA key style.

    ``example``: one key in it. ``prefixes``: what it puts before a module name (stripped). ``suffixes``:
    ``(key suffix, role)`` rows, the roles :mod:`.lora` builds patches from. ``names(param, diffusers_param)``
    yields the ``("param" | "module" | "fused", alias)`` names it gives one canonical parameter; ``flat``: it
    writes the module names of the other styles with ``_`` for ``.`` (matched whole, never split on ``_``).
    ``alpha_keys``: safetensors metadata keys that hold its file-wide alpha.
    """

    name: str
    example: str
    prefixes: tuple = ()
    suffixes: tuple = ()
    names: Callable | None = None
    flat: bool = False
    alpha_keys: tuple = ()


STYLES = (
    KeyStyle("Krea reference", "blocks.0.attn.wq.lora_A",
             suffixes=((".lora_A", "down"), (".lora_B", "up")),
             names=_krea_names, alpha_keys=("lora_alpha", "alpha")),  # rank / alpha / scale in the metadata
    KeyStyle("native names (ComfyUI, ai-toolkit)", "diffusion_model.blocks.0.attn.wq.lora_A.weight",
             prefixes=("base_model.model.", "model.diffusion_model.", "diffusion_model."),
             suffixes=((".lora_A.weight", "down"), (".lora_B.weight", "up"),
                       (".lora_down.weight", "down"), (".lora_up.weight", "up"), (".alpha", "alpha")),
             names=_krea_names),
    KeyStyle("diffusers / PEFT", "transformer.transformer_blocks.0.attn.to_q.lora_A.default.weight",
             prefixes=("base_model.model.", "transformer.", "unet.", "model."),
             suffixes=((".lora_A.weight", "down"), (".lora_B.weight", "up"),
                       (".lora_A.default.weight", "down"), (".lora_B.default.weight", "up"),
                       (".lora.down.weight", "down"), (".lora.up.weight", "up"),
                       ("_lora.down.weight", "down"), ("_lora.up.weight", "up"),
                       (".lora_linear_layer.down.weight", "down"), (".lora_linear_layer.up.weight", "up"),
                       (".lora_magnitude_vector", "dora"), (".lora_magnitude_vector.weight", "dora"),
                       (".lora_magnitude_vector.default", "dora"), (".lora_magnitude_vector.default.weight", "dora")),
             names=_diffusers_names),  # rank / alpha also in the metadata's lora_adapter_metadata json
    KeyStyle("kohya / musubi / SimpleTuner", "lora_unet_blocks_0_attn_wq.lora_down.weight",
             prefixes=("lora_unet_", "lycoris_", "lora_transformer_"),
             suffixes=((".lora_down.weight", "down"), (".lora_up.weight", "up"), (".alpha", "alpha")),
             flat=True, alpha_keys=("network_alpha", "ss_network_alpha")),
    KeyStyle("LyCORIS (LoCon, LoKr, LoHa, DoRA)", "lycoris_blocks_0_attn_wq.lokr_w1",
             prefixes=("lycoris_",),
             suffixes=((".lora_mid.weight", "mid"), (".alpha", "alpha"), (".dora_scale", "dora"),
                       (".lokr_w1", "w1"), (".lokr_w2", "w2"), (".lokr_w1_a", "w1_a"), (".lokr_w1_b", "w1_b"),
                       (".lokr_w2_a", "w2_a"), (".lokr_w2_b", "w2_b"), (".lokr_t2", "lokr_t2"),
                       (".hada_w1_a", "h1_a"), (".hada_w1_b", "h1_b"), (".hada_w2_a", "h2_a"),
                       (".hada_w2_b", "h2_b"), (".hada_t1", "hada_t"), (".hada_t2", "hada_t"))),
    KeyStyle("full-size deltas (ComfyUI)", "diffusion_model.blocks.0.prenorm.scale.diff",
             suffixes=((".diff", "diff"), (".diff_b", "diff_b"), (".w_norm", "w_norm"), (".b_norm", "b_norm"))),
)


def _union(rows):
    return tuple(dict.fromkeys(rows))


PREFIXES = _union(p for s in STYLES for p in s.prefixes)
# longest first, so '.lora_A.weight' beats '.lora_A'
ROLE_SUFFIXES = sorted(_union(r for s in STYLES for r in s.suffixes), key=lambda r: -len(r[0]))
assert len({suf for suf, _ in ROLE_SUFFIXES}) == len(ROLE_SUFFIXES), "a suffix with two roles"
ALPHA_KEYS = _union(k for s in STYLES for k in s.alpha_keys)
LOWRANK_ROLES = {"down", "up", "mid", "w1", "w2", "w1_a", "w1_b", "w2_a", "w2_b", "h1_a", "h1_b", "h2_a", "h2_b"}


# ---------------------------------------------------------------------------------------------------------
# Names

@dataclass
class Names:
    """Every name the styles give a model of one size."""
    shapes: dict          # canonical param -> shape
    params: dict          # alias param key -> canonical param key
    modules: dict         # alias module name (dotted or flattened) -> canonical module
    main: dict            # canonical module -> its main parameter (weight, else scale, else lin)
    fused: dict           # alias of a fused qkv module -> canonical attention prefix ("blocks.0.attn")


@functools.lru_cache(maxsize=8)
def names_for(cfg: Krea2Config) -> Names:
    """Every name a LoRA may use for each canonical parameter / module of a model of size ``cfg``."""
    shapes = expected_shapes(cfg)
    params, modules, main, fused = {}, {}, {}, {}
    flat = any(s.flat for s in STYLES)
    name_fns = _union(s.names for s in STYLES if s.names is not None)

    def add_module(alias, canon):
        for a in (alias, alias.replace(".", "_")) if flat else (alias,):
            prev = modules.setdefault(a, canon)
            assert prev == canon, (a, prev, canon)

    for k in shapes:
        mod, _, pname = k.rpartition(".")
        if pname in _MAIN_PARAMS:
            main[mod] = k
        d = canonical_to_diffusers(k)
        for fn in name_fns:
            for table, alias in fn(k, d):
                if table == "param":
                    params[alias] = k
                elif table == "module":
                    add_module(alias, mod)
                else:
                    prefix = k[: -len(".wq.weight")]
                    for a in (alias, alias.replace(".", "_")) if flat else (alias,):
                        fused[a] = prefix
    return Names(shapes, params, modules, main, fused)


def candidates(name: str) -> list:
    """``name`` and every form of it with known prefixes removed (dotted and flattened)."""
    seen, todo = [], [name]
    while todo:
        n = todo.pop(0)
        if n in seen:
            continue
        seen.append(n)
        for p in PREFIXES:
            if n.startswith(p):
                todo.append(n[len(p):])
    return seen


def bare(name: str) -> str:
    """``name`` with every known prefix removed."""
    return candidates(name)[-1]


def first_param(name: str, names: Names):
    """The canonical parameter ``name`` stands for, or None."""
    for c in candidates(name):
        if c in names.params:
            return names.params[c]
    return None


def resolve_module(name: str, names: Names):
    """``("module", canonical module)``, ``("fused", attention prefix)`` or None for module name ``name``."""
    for c in candidates(name):
        if c in names.modules:
            return "module", names.modules[c]
        if c in names.fused:
            return "fused", names.fused[c]
    return None


def group_keys(keys) -> tuple[dict, list]:
    """``({module name: {role: key}}, plain keys)``: keys ending in a factor / alpha / delta suffix grouped by
    the module they belong to; the rest (whole parameters) listed apart."""
    groups: dict[str, dict[str, str]] = {}
    plain: list[str] = []
    for k in keys:
        for suf, role in ROLE_SUFFIXES:
            if k.endswith(suf) and len(k) > len(suf):
                groups.setdefault(k[: -len(suf)], {})[role] = k
                break
        else:
            plain.append(k)
    return groups, plain


# ---------------------------------------------------------------------------------------------------------
# Files that are not Krea 2 LoRAs

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


def refuse_full_checkpoint(plain, names: Names, where: str) -> None:
    """Raise when keys without LoRA suffixes cover most of the model: a checkpoint, not a LoRA."""
    covered = {t for k in plain for t in [first_param(k, names)] if t is not None}
    if len(covered) > len(names.shapes) // 2:
        raise LoraError(f"{where}: this is a full Krea 2 checkpoint ({len(covered)} of the model's "
                        f"{len(names.shapes)} tensors, no LoRA factors), not a LoRA. Load it with "
                        "Krea2ModelLoader; merging it as a LoRA would add every weight to itself.")


def refuse_foreign(patches, unmapped, where: str, src) -> None:
    """Raise when the unmapped keys look like another architecture's LoRA, or when nothing targets Krea 2."""
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


# ---------------------------------------------------------------------------------------------------------
# File-wide defaults (safetensors metadata)

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


def metadata_defaults(meta: dict, where: str = "LoRA") -> tuple[float | None, float, dict]:
    """(file-wide alpha or None, scale, {module-name suffix: alpha}) from safetensors metadata. Alpha absent
    means alpha = rank of each module, so a file-wide rank alone changes nothing and is not read."""
    meta = meta or {}
    alpha = _meta_number(meta, ALPHA_KEYS, where)
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
