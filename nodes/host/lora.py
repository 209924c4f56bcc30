"""Host adapter: parsed Krea 2 LoRA patches -> ComfyUI ``ModelPatcher.add_patches`` (on a clone that
applies them without a second copy of the model where ComfyUI would keep one; see ``nodes.host.patcher``)."""

from __future__ import annotations

import re

import torch

from ...krea2_model.errors import Krea2Error, LoraError
from ...krea2_model.formats.lora import parse_lora, to_comfy_patches
from ...krea2_model.formats.transformer_file import infer_config
from ...krea2_model.model.transformer import Krea2Transformer
from .patcher import adopt

_BLOCK = re.compile(r"^blocks\.(\d+)\.")
_TEXT = ("txtfusion.", "txtmlp.")


def model_config_of(model):
    """The Krea 2 size of our MODEL or of core's native Krea 2 MODEL (same parameter names)."""
    dm = model.model.diffusion_model
    if isinstance(dm, Krea2Transformer):
        return dm.config
    shapes = {k: tuple(v.shape) for k, v in dm.state_dict().items()}
    if "txtfusion.projector.weight" not in shapes:
        raise Krea2Error(f"Krea2LoraLoader: the model input is a {type(model.model).__name__} model, not Krea 2.")
    shapes = {k: ((v[0] * v[1],) if k.endswith(".mod.lin") and len(v) == 2 else v) for k, v in shapes.items()}
    return infer_config(shapes, "the connected MODEL")


def real_weight(model, key: str):
    """The float32 value of the model's weight ``key`` (canonical name) as the layer computes with it:
    ComfyUI's quantized tensors dequantized and scaled-fp8 weights multiplied by their scale (the host's own
    ``convert_*`` function), not the raw stored numbers."""
    from .internals import key_weight
    module_name = key.rsplit(".", 1)[0]
    mod = model.model.diffusion_model.get_submodule(module_name)
    if getattr(mod, "gguf_qtype", None) is not None:  # GGUF bytes: their values, not the bytes as numbers
        from ...krea2_model.formats.gguf_dequant import dequantize
        return dequantize(mod.weight.detach(), mod.gguf_qtype, mod.gguf_shape, torch.float32)
    w, _, convert = key_weight(model.model, "diffusion_model." + key)
    if hasattr(w, "dequantize"):
        w = w.dequantize()
    w = w.detach().to(torch.float32, copy=True)
    return convert(w, inplace=True) if convert is not None else w


def _adapters():
    try:
        from comfy.weight_adapter import LoHaAdapter, LoKrAdapter, LoRAAdapter
        return {"lora": LoRAAdapter, "lokr": LoKrAdapter, "loha": LoHaAdapter}
    except ImportError:  # very old hosts take the tuples directly
        return None


def apply_lora(model, path: str, strength: float, strength_text: float = 1.0, blocks: set | None = None):
    """A patched clone of ``model`` and a report ``{"applied", "filtered", "unmapped"}``. Text fusion and
    text projection weights get ``strength * strength_text``; ``blocks`` limits the transformer blocks."""
    cfg = model_config_of(model)
    if blocks is not None and (min(blocks) < 0 or max(blocks) >= cfg.layers):
        outside = sorted(b for b in blocks if not 0 <= b < cfg.layers)
        raise Krea2Error(f"Krea2LoraLoader: blocks {', '.join(map(str, outside[:8]))} are outside this model's "
                         f"blocks 0-{cfg.layers - 1} ({cfg.layers} blocks); the filter would match nothing there. "
                         "Give indices in that range.")
    patches, unmapped = parse_lora(path, cfg)  # read and checked even at strength 0: a wrong file is an error
    if strength == 0:
        return model, {"applied": 0, "filtered": 0, "unmapped": list(unmapped)}
    kept, filtered = [], 0
    for p in patches:
        m = _BLOCK.match(p.key)
        if blocks is not None and m and int(m.group(1)) not in blocks:
            filtered += 1
            continue
        kept.append(p)
    dora = [p.key for p in kept if p.dora_scale is not None]
    base = None
    if dora:  # exact DoRA needs the unpatched weights (small: only the DoRA targets)
        base = {k: real_weight(model, k) for k in dora}
    comfy = to_comfy_patches(kept, "diffusion_model.", adapters=_adapters(), base_weights=base)
    text = {k: v for k, v in comfy.items() if k[len("diffusion_model."):].startswith(_TEXT)}
    rest = {k: v for k, v in comfy.items() if k not in text}
    m = adopt(model.clone())  # core's native Krea 2 MODEL gets the same no-second-copy patching as ours
    applied = set()
    if rest:
        applied |= set(m.add_patches(rest, strength))
    if text:
        applied |= set(m.add_patches(text, strength * strength_text))
    missing = [k for k in comfy if k not in applied]
    if missing:
        raise LoraError(f"{path}: {len(missing)} patch targets are not weights of this model (first: {missing[:3]}); "
                        "the model is not the Krea 2 size this LoRA was made for.")
    return m, {"applied": len(applied), "filtered": filtered, "unmapped": list(unmapped)}
