"""The models the benchmarks compare, built from one random canonical state dict.

* ours: :class:`krea2_model.Krea2Transformer`;
* diffusers: ``Krea2Transformer2DModel`` (diffusers 0.42.1), fed as its pipeline feeds it (text padded
  to 512 tokens with a mask) or unpadded;
* native: ComfyUI's ``comfy.ldm.krea2.model.SingleStreamDiT`` from a host source tree, with the
  attention ComfyUI picks for the device or with PyTorch SDPA;
* floor: the GEMMs and attention kernels of one forward of ours, replayed alone.
"""

from __future__ import annotations

import sys

import torch
import torch.nn.functional as F

import importlib

from krea2_model import Krea2Transformer
from krea2_model.tiny.transformer import diffusers_config, to_layout

k2attention = importlib.import_module("krea2_model.model.attention")

PAD_TO = 512        # the reference pipeline's text length (prompt padded in the middle, mask)
SUFFIX = 5          # assistant-suffix tokens after the padding


def build_ours(cfg, sd, dtype, device="cpu"):
    with torch.device("meta"):
        m = Krea2Transformer(cfg, dtype=dtype)
    m.load_state_dict({k: (v.float() if k.endswith(".scale") else v.to(dtype)) for k, v in sd.items()}, assign=True)
    return m.to(device).eval()


def build_diffusers(cfg, sd, dtype, device="cpu"):
    from diffusers import Krea2Transformer2DModel

    with torch.device("meta"):
        m = Krea2Transformer2DModel(**diffusers_config(cfg))
    dsd = to_layout(sd, "diffusers")
    m.load_state_dict({k: v.to(dtype) for k, v in dsd.items()}, assign=True)
    m = m.to(device=device, dtype=dtype).eval()  # (diffusers warns about the norms; they are set back below)
    # the norms stay fp32, as diffusers' `_keep_in_fp32_modules` does when it loads a checkpoint
    for name, mod in m.named_modules():
        if type(mod).__name__ == "Krea2RMSNorm":
            mod.float()
    return m


class Native:
    """ComfyUI's own Krea 2 model from the host tree at ``host`` (imported in this process)."""

    def __init__(self, host: str, cpu: bool):
        if host not in sys.path:
            sys.path.insert(0, host)
        import comfy.options
        comfy.options.args_parsing = False
        import comfy.cli_args
        comfy.cli_args.args.cpu = cpu
        import comfy.model_management  # noqa: F401  (device and attention choice happen at import)
        import comfy.ops
        import comfy.ldm.modules.attention as att
        import comfy.ldm.krea2.model as km
        self.km, self.att, self.ops = km, att, comfy.ops
        self.default_attention = km.optimized_attention_masked
        self.default_name = getattr(self.default_attention, "__name__", str(self.default_attention))
        self.host = host
        try:
            import comfyui_version
            self.version = comfyui_version.__version__
        except Exception:
            self.version = "?"

    def build(self, cfg, sd, dtype, device="cpu"):
        km = self.km
        with torch.device("meta"):
            m = km.SingleStreamDiT(features=cfg.hidden, tdim=cfg.time_dim, txtdim=cfg.text_dim, heads=cfg.heads,
                                   kvheads=cfg.kv_heads, multiplier=4, layers=cfg.layers, patch=cfg.patch,
                                   channels=cfg.channels, theta=cfg.rope_theta, txtlayers=cfg.text_taps,
                                   txtheads=cfg.text_heads, txtkvheads=cfg.text_kv_heads, dtype=dtype,
                                   operations=self.ops.disable_weight_init)
        m.load_state_dict({k: (v.float() if k.endswith(".scale") else v.to(dtype)) for k, v in sd.items()},
                          assign=True)
        return (m if device is None else m.to(device)).eval()

    def use_attention(self, which: str):
        """``'default'`` (what ComfyUI picked for this device) or ``'sdpa'`` (its PyTorch attention)."""
        self.km.optimized_attention_masked = self.default_attention if which == "default" \
            else self.att.attention_pytorch

    def cases(self, fn) -> dict:
        """The two native cases to time: ``fn()`` under ComfyUI's default attention for the device and under
        its PyTorch SDPA, as ``{"native ComfyUI, default (<name>)": ..., "native ComfyUI, SDPA": ...}``."""
        def under(which):
            def run():
                self.use_attention(which)
                return fn()
            return run
        return {f"native ComfyUI, default ({self.default_name})": under("default"), "native ComfyUI, SDPA": under("sdpa")}


def inputs(cfg, tokens: int, text_len: int, dtype, device="cpu", seed=1, batch=1):
    side = int(round(tokens ** 0.5))
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(batch, cfg.channels, side * cfg.patch, side * cfg.patch, generator=g).to(device, dtype)
    ctx = torch.randn(batch, text_len, cfg.text_taps * cfg.text_dim, generator=g).to(device, dtype)
    sigma = torch.full((batch,), 0.7, device=device)
    return x, sigma, ctx


class DiffusersCall:
    """Calls ``Krea2Transformer2DModel`` on ComfyUI-style inputs, padded as the pipeline pads or not."""

    def __init__(self, model, cfg, padded: bool):
        self.m, self.cfg, self.padded = model, cfg, padded
        self._pos = {}

    def prep(self, x, ctx):
        cfg, p = self.cfg, self.cfg.patch
        B, C, H, W = x.shape
        gh, gw = H // p, W // p
        img = x.view(B, C, gh, p, gw, p).permute(0, 2, 4, 1, 3, 5).reshape(B, gh * gw, C * p * p)
        c = ctx.view(B, ctx.shape[1], cfg.text_taps, cfg.text_dim)
        mask = None
        if self.padded:
            n = c.shape[1]
            pad = c.new_zeros(B, PAD_TO - n, cfg.text_taps, cfg.text_dim)
            c = torch.cat([c[:, :n - SUFFIX], pad, c[:, n - SUFFIX:]], dim=1)
            mask = torch.zeros(B, PAD_TO, dtype=torch.bool, device=x.device)
            mask[:, :n - SUFFIX] = True
            mask[:, PAD_TO - SUFFIX:] = True
        L = c.shape[1]
        key = (L, gh, gw)
        if key not in self._pos:
            ti = torch.zeros(L, 3)
            ii = torch.zeros(gh, gw, 3)
            ii[..., 1] = torch.arange(gh)[:, None]
            ii[..., 2] = torch.arange(gw)[None, :]
            self._pos[key] = torch.cat([ti, ii.reshape(-1, 3)]).to(x.device)
        return img, c, mask, self._pos[key], (B, C, gh, gw)

    def __call__(self, x, sigma, ctx):
        img, c, mask, pos, (B, C, gh, gw) = self.prep(x, ctx)
        out = self.m(img, c, sigma, pos, encoder_attention_mask=mask, return_dict=False)[0]
        p = self.cfg.patch
        return out.view(B, gh, gw, C, p, p).permute(0, 3, 1, 4, 2, 5).reshape(B, C, gh * p, gw * p)


class Floor:
    """The GEMMs (``F.linear`` with the same weights and input shapes) and attention kernels
    (``F.scaled_dot_product_attention`` on the shapes ours hands it) of one forward of ``model``,
    recorded once and replayed alone on preallocated inputs."""

    def __init__(self, model, args, kwargs=None):
        self.linears, self.attn = [], []
        hooks = []
        bufs = {}

        def buf(shape, like):  # one random input per shape (keeps the replay's memory small)
            key = (tuple(shape), like.dtype, like.device)
            if key not in bufs:
                bufs[key] = torch.randn(shape, dtype=like.dtype, device=like.device)
            return bufs[key]

        def pre(mod, inp):
            x = inp[0]
            self.linears.append((buf(x.shape, x), mod.weight, mod.bias))
        for mod in model.modules():
            if isinstance(mod, torch.nn.Linear):
                hooks.append(mod.register_forward_pre_hook(pre))

        def rec(q, k, v, mask):
            b, h, l, d = q.shape
            hkv = k.shape[1]
            qg = buf((b, hkv, (h // hkv) * l, d), q)
            self.attn.append((qg, buf(k.shape, k), buf(v.shape, v), mask))  # k and v may share a buffer
            return k2attention.sdpa_attention(q, k, v, mask)
        before = model.attention_backend
        model.attention_backend = lambda q, k, v, mask, _options: rec(q, k, v, mask)
        try:
            with torch.inference_mode():
                model(*args, **(kwargs or {}))
        finally:
            model.attention_backend = before
            for h in hooks:
                h.remove()

    def __call__(self):
        for x, w, b in self.linears:
            F.linear(x, w, b)
        for q, k, v, m in self.attn:
            F.scaled_dot_product_attention(q, k, v, attn_mask=m)

    def gemm_only(self):
        for x, w, b in self.linears:
            F.linear(x, w, b)
