"""The host's attention on our MODEL and on native Krea 2's, in-process on the CPU device.

    <host python> tests/host/attention_check.py spec.json        (cwd: a ComfyUI folder with native Krea 2)

``spec.json``: ``{"pack_parent", "pack_name", "models": {name: path}, "ctx_width"}``. Prints one JSON line;
``tests/host/test_host_hooks.py`` asserts on it.

For each model file (fp32 and int8_tensorwise), both MODELs (ours through ``nodes.host.model.load_model``,
native through ``comfy.sd.load_diffusion_model``) run one forward on the same seeded inputs, at 7 and 33
text tokens, with and without an ``index_timestep_zero`` reference: the largest difference, and whether the
outputs are equal bit for bit. Then ``transformer_options["optimized_attention_override"]`` (what attention
selector nodes set): one that records each call and delegates, and one that halves what attention returns;
each side's calls (count, q/k/v shapes, ``block_index``) and outputs.
"""

import json

from host_script import boot  # noqa: E402  (this folder is on sys.path when run as a script)

spec, pack = boot()

import torch  # noqa: E402
import comfy.ldm.modules.attention as host_att  # noqa: E402
import comfy.sd  # noqa: E402

cm = pack("nodes.host.model")

g = torch.Generator().manual_seed(7)
x = torch.randn(1, 16, 8, 8, generator=g)
ctxs = {n: torch.randn(1, n, spec["ctx_width"], generator=g) for n in (7, 33)}
ref = torch.randn(1, 16, 6, 10, generator=g)
sigma = torch.tensor([0.7])


def forward(dm, ctx, refs=False, options=None):
    kw = {"ref_latents": [ref], "ref_latents_method": "index_timestep_zero"} if refs else {}
    return dm(x, sigma, ctx, None, transformer_options=dict(options or {}), **kw)


def recorder(calls, scale=1.0):
    def override(func, q, k, v, heads, **kwargs):
        opts = kwargs.get("transformer_options") or {}
        calls.append([list(q.shape), list(k.shape), list(v.shape), heads, opts.get("block_index")])
        return func(q, k, v, heads, **kwargs) * scale
    return override


res = {"host_attention": getattr(host_att.optimized_attention_masked, "__name__", "?"), "files": {}}
models = {}
plain_out = {}
for name, path in spec["models"].items():
    dms, errors = {}, {}
    for side, load in (("ours", cm.load_model), ("native", comfy.sd.load_diffusion_model)):
        try:
            dms[side] = load(path).model.diffusion_model
            forward(dms[side], ctxs[7])
        except Exception as e:  # a format this host cannot run on the CPU: each side's error is reported
            errors[side] = f"{type(e).__name__}: {e}"[:300]
    if errors:
        res["files"][name] = {"errors": errors}
        continue
    models[name] = dms
    cases = {}
    for n, ctx in ctxs.items():
        for refs in (False, True):
            a, b = forward(dms["ours"], ctx, refs), forward(dms["native"], ctx, refs)
            key = f"{n} tokens{' + reference' if refs else ''}"
            plain_out.setdefault(key, a) if name == "fp32" else None
            cases[key] = {"max_diff": (a - b).abs().max().item(), "rel": ((a - b).norm() / b.norm()).item(),
                          "bitwise": bool(torch.equal(a, b)),
                          "moved": ((a - plain_out[key]).norm() / plain_out[key].norm()).item()
                          if key in plain_out else None}
    res["files"][name] = cases

dms = models["fp32"]
ctx = ctxs[33]
over = {}
for side, dm in dms.items():
    calls, halved = [], []
    plain = forward(dm, ctx)
    seen = forward(dm, ctx, options={"optimized_attention_override": recorder(calls)})
    half = forward(dm, ctx, options={"optimized_attention_override": recorder(halved, 0.5)})
    over[side] = {"calls": calls, "unchanged": bool(torch.equal(seen, plain)), "plain": plain,
                  "half": half, "half_moved": ((half - plain).norm() / plain.norm()).item()}
res["override"] = {side: {k: v for k, v in o.items() if k not in ("plain", "half")} for side, o in over.items()}
res["override"]["half_ours_vs_native"] = ((over["ours"]["half"] - over["native"]["half"]).norm()
                                          / over["native"]["half"].norm()).item()
print(json.dumps(res))
