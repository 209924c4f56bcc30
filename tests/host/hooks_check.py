"""What the host's hooks see on our MODEL and on native Krea 2's, checked in-process on the CPU device.

    <host python> tests/host/hooks_check.py spec.json        (cwd: a ComfyUI folder with native Krea 2)

``spec.json``: ``{"pack_parent", "pack_name", "model", "ctx_width"}``. Prints one JSON line;
``tests/host/test_host_hooks.py`` asserts on it.

Both MODELs load the same file (ours through ``nodes.host.model.load_model``, native through core's
``comfy.sd.load_diffusion_model``) and sample the same conditioning with one reference latent
(``index_timestep_zero``) through ``comfy.sample.sample`` (cfg 2, so cond and uncond share a batch), with
a DIFFUSION_MODEL wrapper and an attn1_output_patch that only record what they are given. Also the
sampler's memory estimate with and without the reference, and what each model's ``extra_conds`` /
``extra_conds_shapes`` make of the same conditioning keys (prompt, references with and without a method, a
method without references).
"""

import json

from host_script import boot, sampling_inputs  # noqa: E402  (this folder is on sys.path when run as a script)

spec, pack = boot()

import comfy.patcher_extension as pe  # noqa: E402
import comfy.sample  # noqa: E402
import comfy.sampler_helpers  # noqa: E402
import comfy.sd  # noqa: E402

cm = pack("nodes.host.model")


def observe(model):
    """A clone of ``model`` with a recording wrapper and output patch; returns (clone, record)."""
    rec = {"wrapper_calls": 0, "wrapper_args": None, "patch": []}
    m = model.clone()

    def wrapper(executor, *args, **kwargs):
        rec["wrapper_calls"] += 1
        rec["wrapper_args"] = [list(args[0].shape), isinstance(args[-1], dict), len(args),
                               sorted(k for k in kwargs if k != "control")]
        return executor(*args, **kwargs)

    def out_patch(out, extra):
        rec["patch"].append({"L": out.shape[1], "width": out.shape[2], "block_index": extra["block_index"],
                             "total_blocks": extra["total_blocks"], "block_type": extra["block_type"],
                             "img_slice": list(extra["img_slice"]), "cond_or_uncond": list(extra["cond_or_uncond"]),
                             "sigmas": [round(float(s), 6) for s in extra["sigmas"]],
                             "uuids": len(extra["uuids"]),
                             "ref_tokens": extra.get("reference_image_num_tokens")})
        return out

    m.add_wrapper_with_key(pe.WrappersMP.DIFFUSION_MODEL, "krea2_test", wrapper)
    m.set_model_attn1_output_patch(out_patch)
    return m, rec


_in = sampling_inputs(spec["ctx_width"])
ctx, unc, ref, latent, noise, with_ref = (_in[k] for k in ("ctx", "unc", "ref", "latent", "noise", "with_ref"))

def summary(cond):
    """A comfy.conds object as plain data: its class and what it holds (shapes and sums of tensors)."""
    def of(v):
        if hasattr(v, "shape"):
            return [list(v.shape), round(float(v.double().sum()), 6)]
        if isinstance(v, list):
            return [of(x) for x in v]
        return v
    return [type(cond).__name__, of(cond.cond)]


COND_CASES = {"prompt": {}, "references": with_ref, "no_method": {"reference_latents": [ref]},
              "method_only": {"reference_latents_method": "index"}}


res = {}
for side, model in (("ours", cm.load_model(spec["model"])), ("native", comfy.sd.load_diffusion_model(spec["model"]))):
    m, rec = observe(model)
    pos, neg = [[ctx, dict(with_ref)]], [[unc, dict(with_ref)]]
    out = comfy.sample.sample(m, noise, 2, 2.0, "euler", "simple", pos, neg, latent, seed=1)
    shape = [2] + list(latent.shape[1:])
    mem = {}
    for name, extra in (("plain", {}), ("ref", with_ref)):
        conds = {"positive": [{"cross_attn": ctx, "model_conds": {}, **extra}]}
        mem[name] = comfy.sampler_helpers.estimate_memory(m, latent.shape, conds)[0] if hasattr(
            comfy.sampler_helpers, "estimate_memory") else None
    conds = {}
    for name, extra in COND_CASES.items():
        kw = {"cross_attn": ctx, **extra}
        conds[name] = {"conds": {k: summary(v) for k, v in sorted(m.model.extra_conds(**kw).items())},
                       "shapes": m.model.extra_conds_shapes(**kw)}
    res[side] = {"rec": rec, "latent": out.flatten().tolist(), "memory": mem, "conds": conds,
                 "class": type(m.model.diffusion_model).__name__}
print(json.dumps(res))
