"""The text-stage cache: Krea 2's text fusion + projection computed once per conditioning.

The text stage never depends on the timestep, so a sampler that sends the same prompt every step
needs it once. An entry is keyed on the conditioning's content (ComfyUI builds a new tensor every
step), its mask, the compute dtype, and the text-stage weights as they are *now*: the same Parameter
objects at the same version and storage, the same sampled values, and the same host weight hooks.
"""

from __future__ import annotations

import weakref

import torch


def stage_weights(roots) -> tuple[list, list]:
    """``(params, hooks)`` of the modules under ``roots``: every parameter, and every host weight hook
    (ComfyUI's per-module ``weight_function`` / ``bias_function`` lists, through which low-VRAM mode
    applies LoRA at cast time) as ``(module id, attribute, functions)``."""
    params, hooks = [], []
    for root in roots:
        for mod in root.modules():
            for p in mod._parameters.values():
                if p is not None:
                    params.append(p)
            for attr in ("weight_function", "bias_function"):
                fns = getattr(mod, attr, None)
                if fns:
                    hooks.append((id(mod), attr, tuple(fns)))
    return params, hooks


def _ref(obj):
    try:
        return weakref.ref(obj)
    except TypeError:  # not weak-referenceable: hold it (entries are few and replaced on new prompts)
        return lambda o=obj: o


def _version(p) -> int:
    try:
        return p._version
    except RuntimeError:  # inference tensors keep no version counter; the fingerprint still guards them
        return -1


def _fingerprint(params) -> torch.Tensor | None:
    """16 evenly spaced values of every parameter, as one float32 vector (on the first one's device)."""
    if not params:
        return None
    dev = params[0].device
    parts = []
    for p in params:
        flat = p.detach().reshape(-1)
        step = max(1, flat.numel() // 16)
        parts.append(flat[::step][:16].to(device=dev, dtype=torch.float32))
    return torch.cat(parts)


class TextCache:
    """A few ``(conditioning, mask, dtype, weights) -> text tokens`` entries, most recent first
    (several: a sampler may send cond and uncond in separate calls every step, and regional prompts add
    one conditioning per region). Keys hold
    copies of the conditioning and mask, and weak references to the weights and hooks, so a
    replaced weight or a freed LoRA hook is never mistaken for a live one."""

    def __init__(self, size: int = 12):
        self.size = size
        self.entries: list[dict] = []

    def clear(self):
        self.entries.clear()

    @staticmethod
    def _same_tensor(a, b) -> bool:
        if a is None or b is None:
            return a is None and b is None
        return a.shape == b.shape and a.dtype == b.dtype and a.device == b.device and torch.equal(a, b)

    @staticmethod
    def _same_weights(e, params, hooks) -> bool:
        if len(e["params"]) != len(params) or len(e["hooks"]) != len(hooks):
            return False
        for (r, version, ptr), p in zip(e["params"], params):
            if r() is not p or version != _version(p) or ptr != p.data_ptr():
                return False
        for (mod_id, attr, refs), (hmod_id, hattr, fns) in zip(e["hooks"], hooks):
            if mod_id != hmod_id or attr != hattr or len(refs) != len(fns) or \
                    any(r() is not f for r, f in zip(refs, fns)):
                return False
        return True

    def get(self, context, mask, dtype, weights):
        params, hooks = weights
        fp = None
        for i, e in enumerate(self.entries):
            if e["dtype"] != dtype or not self._same_weights(e, params, hooks):
                continue
            if not (self._same_tensor(e["context"], context) and self._same_tensor(e["mask"], mask)):
                continue
            if fp is None:
                fp = _fingerprint(params)
            if not self._same_tensor(e["fingerprint"], fp):
                continue
            self.entries.insert(0, self.entries.pop(i))
            return e["out"]
        return None

    def put(self, context, mask, dtype, weights, out):
        params, hooks = weights
        entry = dict(context=context.detach().clone(), mask=None if mask is None else mask.detach().clone(),
                     dtype=dtype, out=out.detach(),
                     params=[(_ref(p), _version(p), p.data_ptr()) for p in params],
                     hooks=[(m, a, tuple(_ref(f) for f in fns)) for m, a, fns in hooks],
                     fingerprint=_fingerprint(params))
        self.entries.insert(0, entry)
        del self.entries[self.size:]


def caching_enabled(default: bool, opts: dict | None, has_backend: bool) -> bool:
    """Whether a forward may reuse the text stage: the model's ``cache_text`` unless the options say
    ``krea2_cache_text``; never under a host's per-call attention override (it may do anything: it sees every
    call, as on native), autograd or compilation."""
    enabled = default
    if opts is not None and "krea2_cache_text" in opts:
        enabled = bool(opts["krea2_cache_text"])
    if has_backend and opts is not None and "optimized_attention_override" in opts:
        enabled = False
    return enabled and not torch.is_grad_enabled() and not torch.compiler.is_compiling()
