"""The host-hook protocol: how ComfyUI's ``transformer_options`` reach the Krea 2 forward.

Read in one place, :func:`read`, at the top of the forward: ``patches["post_input"]`` (:func:`post_input`),
``patches["attn1_patch"]`` and ``patches["attn1_output_patch"]`` (:class:`AttentionHooks`, which also carries a
host's attention and RoPE functions), ``patches_replace["dit"][("single_block", i)]`` (:func:`replaced_block`). The
blocks see a per-call copy of the options carrying ``total_blocks``, ``block_type``, ``img_slice`` and
``block_index``; every other key passes through. Native ComfyUI Krea 2 calls the same hooks with the same arguments.
"""

from __future__ import annotations

import torch

from ..errors import ConditioningError
from .attention import attention
from .positions import position_ids, rope_from_ids


def read(transformer_options: dict | None) -> tuple[dict, dict, dict]:
    """``(opts, patches, replace)``: a per-call copy of the options, its ``patches``, its ``patches_replace["dit"]``."""
    opts = {} if transformer_options is None else dict(transformer_options)
    return opts, opts.get("patches") or {}, (opts.get("patches_replace") or {}).get("dit") or {}


def attention_hooks(patches: dict, opts: dict, backend=None, rope_fn=None) -> "AttentionHooks | None":
    """The :class:`AttentionHooks` for this forward, or None when no patch and no host function is set."""
    if patches.get("attn1_patch") or patches.get("attn1_output_patch") or backend is not None or rope_fn is not None:
        return AttentionHooks(patches, opts, backend, rope_fn)
    return None


def replaces_blocks(replace: dict) -> bool:
    """Whether any ``("single_block", i)`` replacement is set (then every block runs out of place)."""
    return any(isinstance(k, tuple) and k[:1] == ("single_block",) for k in replace)


class AttentionHooks:
    """The host's attention patches for one forward, called as native ComfyUI Krea 2 calls them.

    ``patches["attn1_patch"]``: ``fn(q, k, v, pe=..., attn_mask=..., extra_options=...)`` with q ``(B, H, L, D)``,
    k, v ``(B, Hkv, L, D)`` after the q/k norms, before RoPE and before any K/V head repeat; it returns a
    dict that may replace ``q``, ``k``, ``v``, ``pe``, ``attn_mask``. ``pe`` is given in ComfyUI's layout
    ``(B, 1, L, D/2, 2, 2)`` (rotation matrices ``[[cos, -sin], [sin, cos]]``), built once per forward
    and only when such a patch is set. ``patches["attn1_output_patch"]``: ``fn(out, extra_options)`` with
    ``out (B, L, H*D)`` before the output gate. ``extra_options`` is a copy of the forward's
    transformer_options at the current block (``block_index``, ``img_slice``, ...).

    ``backend``: the attention function, ``fn(q, k, v, mask, transformer_options)`` with the :func:`attention`
    contract plus the forward's live options (a host's own attention choice and its per-call overrides,
    see :attr:`Krea2Transformer.attention_backend`); None: :func:`attention`."""

    def __init__(self, patches: dict, options: dict, backend=None, rope_fn=None):
        self.qkv = list(patches.get("attn1_patch", ()))
        self.out = list(patches.get("attn1_output_patch", ()))
        self.options = options
        self.backend = backend
        self.rope_fn = rope_fn
        self._pe = None  # (our rope, its host-layout twin)

    def attend(self, q, k, v, mask):
        if self.backend is None:
            return attention(q, k, v, mask)
        return self.backend(q, k, v, mask, self.options)

    def apply_rope(self, q, k, rope):
        """``q (B, H, L, D)``, ``k (B, Hkv, L, D)`` rotated by the host's ``rope_fn(q, k, pe)`` (see
        :attr:`Krea2Transformer.rope_backend`), with ``pe`` in the host's layout."""
        return self.rope_fn(q, k, self._host_pe(rope, q.shape[0]))

    def _host_pe(self, rope, batch):
        if self._pe is None or self._pe[0] is not rope:
            cos, sin = rope[0], rope[1]
            pe = torch.stack([cos, -sin, sin, cos], dim=-1).unflatten(-1, (2, 2))   # (L, D/2, 2, 2)
            self._pe = (rope, pe.expand(batch, 1, *pe.shape).contiguous())
        return self._pe[1]

    def on_qkv(self, q, k, v, rope, mask):
        extra = dict(self.options)
        pe = None if rope is None else self._host_pe(rope, q.shape[0])
        given = pe
        for fn in self.qkv:
            got = fn(q, k, v, pe=pe, attn_mask=mask, extra_options=extra)
            q, k, v = got.get("q", q), got.get("k", k), got.get("v", v)
            pe, mask = got.get("pe", pe), got.get("attn_mask", mask)
        if pe is not given:  # a patch moved the positions: rotate with its matrices
            rope = None if pe is None else (pe[..., 0, 0], pe[..., 1, 0])
            if pe is not None:
                self._pe = (rope, pe)  # a host rope function gets the patch's own matrices
        return q, k, v, rope, mask

    def on_out(self, out):
        extra = dict(self.options)
        for fn in self.out:
            out = fn(out, extra)
        return out


def post_input(cfg, fns, img, txt, rope, gh, gw, ref_grids, opts):
    """ComfyUI's ``patches["post_input"]``: each ``fn({"img", "txt", "img_ids", "txt_ids",
    "transformer_options"})`` returns that dict, possibly with new tokens or positions. Ids are
    ``(B, L, 3)`` float32 as native passes them; changed ids rebuild RoPE (one set for the batch)."""
    B = img.shape[0]
    ids = position_ids(txt.shape[1], ((0, gh, gw),) + tuple((i, a, b) for i, (a, b) in enumerate(ref_grids, 1)))
    ids = ids.to(device=img.device, dtype=torch.float32)
    img_ids = ids[txt.shape[1]:].expand(B, -1, -1)
    txt_ids = ids[:txt.shape[1]].expand(B, -1, -1)
    given = (img_ids, txt_ids)
    for fn in fns:
        got = fn({"img": img, "txt": txt, "img_ids": img_ids, "txt_ids": txt_ids, "transformer_options": opts})
        img, txt, img_ids, txt_ids = got["img"], got["txt"], got["img_ids"], got["txt_ids"]
    if img_ids is not given[0] or txt_ids is not given[1]:
        new = torch.cat([txt_ids, img_ids], dim=1)
        if not bool((new == new[:1]).all()):
            raise ConditioningError("a post_input patch gave each sample its own position ids; Krea 2 "
                                    "takes one set of positions for the whole batch.")
        rope = rope_from_ids(cfg, new[0], img.device)
    return img, txt, rope


def replaced_block(fn, blk, h, vec, rope, mask, hooks, vec_ref, ref_start, opts):
    """A block replaced through ``patches_replace["dit"][("single_block", i)]`` (the Flux convention):
    ``fn(args, {"original_block": block})`` with ``args`` = ``img`` (the whole ``(B, L, hidden)``
    sequence, text first), ``vec``, ``pe``, ``attn_mask``, ``transformer_options`` (plus ``vec_ref``
    and ``ref_start`` for t = 0 references); returns a dict whose ``img`` is the block's output.
    The original block runs out of place here: the replacement may still read ``args["img"]``."""
    def original(args):
        return {"img": blk(args["img"], args["vec"], args["pe"], args.get("attn_mask"), hooks,
                           args.get("vec_ref"), args.get("ref_start"), inplace=False)}

    args = {"img": h, "vec": vec, "pe": rope, "attn_mask": mask, "transformer_options": opts,
            "vec_ref": vec_ref, "ref_start": ref_start}
    return fn(args, {"original_block": original})["img"]
