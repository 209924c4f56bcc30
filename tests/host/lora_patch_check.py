"""How our LoRA patches live in a real ComfyUI's ModelPatcher, checked in-process on the CPU device.

    <host python> tests/host/lora_patch_check.py spec.json        (cwd: the ComfyUI folder)

``spec.json``: ``{"pack_parent", "pack_name", "model", "loras": {style: path}, "stack": [path, path]}``, and
optionally ``"core_model"`` (a file core's own loader reads as native Krea 2) with ``"core_lora"`` and
``"core_ctx_width"`` (its conditioning width).
Prints one JSON line of measurements; ``tests/host/test_host_nodes.py`` (``patch_check``) asserts on it.

For each weight dtype (fp32 file as is, fp8_e4m3fn storage) and each LoRA: the patched model's output
through ``Krea2LoraLoader``'s path (``nodes.host.lora.apply_lora`` + ``load_models_gpu``) against the same
patches on ComfyUI's plain ``ModelPatcher`` (patch-and-backup), what the patcher holds while loaded
(backups, cast-time patches, untouched weights), and the state after unloading (every parameter's bytes,
leftover weight functions, the unpatched output). Also: stacking, a partial unload while loaded, a
``force_patch_weights`` load (what checkpoint saving does) and core's own LoRA loader on our model.
"""

import hashlib
import json

from host_script import boot  # noqa: E402  (this folder is on sys.path when run as a script)

spec, pack = boot()

import torch  # noqa: E402
import comfy.model_management as mm  # noqa: E402
import comfy.model_patcher as mp  # noqa: E402
import comfy.sd  # noqa: E402
import comfy.utils  # noqa: E402

cm = pack("nodes.host.model")
cl = pack("nodes.host.lora")
cp = pack("nodes.host.patcher")
kt = pack("krea2_model.model.transformer")
kl = pack("krea2_model.formats.lora")
FAST = [0]
_fast = cp._add_low_rank


def _counted(weight, patch):  # how often CastTimePatch's fused low-rank path (not ComfyUI's maths) ran
    done = _fast(weight, patch)
    FAST[0] += bool(done)
    return done


cp._add_low_rank = _counted
CPU = torch.device("cpu")


def raw_bytes(t):
    """The stored bytes of a tensor; of a tensor subclass (ComfyUI's QuantizedTensor), of its inner tensors."""
    if type(t) is not torch.Tensor and type(t) is not torch.nn.Parameter and hasattr(t, "__tensor_flatten__"):
        names, _ = t.__tensor_flatten__()
        return b"".join(raw_bytes(getattr(t, n)) for n in names)
    t = t.detach().contiguous().reshape(-1)
    return t.view(torch.uint8).numpy().tobytes()


def digests(dm):
    return {k: hashlib.sha256(raw_bytes(p.data)).hexdigest() for k, p in dm.named_parameters()}


def cast_time_keys(dm):
    keys = []
    for n, m in dm.named_modules():
        for attr, p in (("weight_function", "weight"), ("bias_function", "bias")):
            keys += [f"{n}.{p}" for f in getattr(m, attr, None) or [] if getattr(f, "krea2_cast_time", False)]
    return keys


def linear_keys(dm):
    return {f"{n}.{p}" for n, m in dm.named_modules() if hasattr(m, "weight_function") for p in ("weight", "bias")}


def rel(a, b):
    return ((a - b).norm() / b.norm()).item()


res = {"comfyui_patcher_default": getattr(mp, "CoreModelPatcher", mp.ModelPatcher).__name__}
CASES = [("default", spec["model"], "default"), ("fp8_e4m3fn", spec["model"], "fp8_e4m3fn")]
if spec.get("scaled_model"):  # the same weights as a scaled-fp8 file (ComfyUI's quantized formats)
    CASES.append(("scaled_fp8_file", spec["scaled_model"], "default"))
for wd, model_path, weight_dtype in CASES:
    base = cm.load_model(model_path, weight_dtype)
    dm = base.model.diffusion_model
    cfg = dm.config
    g = torch.Generator().manual_seed(0)  # the same inputs for every weight dtype
    x = torch.randn(1, cfg.channels, 16, 16, generator=g)
    ctx = torch.randn(1, 9, cfg.text_taps * cfg.text_dim, generator=g)
    sigma = torch.tensor([0.7])

    def forward(patcher=None, **kw):
        if patcher is not None:
            mm.load_models_gpu([patcher], **kw)
        return dm(x, sigma, ctx).float()

    lin = linear_keys(dm)
    saved = digests(dm)
    base_sd = {k: v.detach().clone() for k, v in dm.state_dict().items()} if wd == "default" else None

    def hand_merged(path, strength):
        """The same velocity from krea2_model alone: the LoRA's deltas merged into the weights by hand."""
        plain = kt.Krea2Transformer(cfg)
        plain.load_state_dict(kl.merge_into(base_sd, kl.parse_lora(path, cfg)[0], strength))
        return plain.eval()(x, sigma, ctx).float()

    r = {"class": type(base).__name__, "same_device": str(base.load_device) == str(base.offload_device),
         "weight_types": sorted({type(p).__name__ + ":" + str(p.dtype) for p in dm.parameters()})}
    y0 = forward(base)
    mm.unload_all_models()
    r["styles"] = {}
    outs = {}
    for style, path in spec["loras"].items():
        m, rep = cl.apply_lora(base, path, 0.8)
        FAST[0] = 0
        y = forward(m)
        patched = {k[len("diffusion_model."):] for k in m.patches}
        s = {"class": type(m).__name__, "applied": rep["applied"], "patched_linear": len(patched & lin),
             "patched_other": len(patched - lin), "backup_linear": len({k[len("diffusion_model."):] for k in m.backup} & lin),
             "backup_other": len({k[len("diffusion_model."):] for k in m.backup} - lin),
             "cast_time": sorted(cast_time_keys(dm)), "patched_linear_keys": sorted(patched & lin)}
        s["fused_low_rank_calls"] = FAST[0]
        now = digests(dm)
        s["linear_untouched_while_loaded"] = all(now[k] == saved[k] for k in saved if k in lin)
        s["effect"] = rel(y, y0)
        if base_sd is not None:
            s["vs_hand_merge"] = rel(y, hand_merged(path, 0.8))
        mm.unload_all_models()
        s["restored_bitexact"] = digests(dm) == saved
        s["stale_after_unload"] = len(cast_time_keys(dm))
        y_after = forward(base)
        s["output_restored"] = bool(torch.equal(y_after, y0))
        s["output_restored_rel"] = rel(y_after, y0)
        mm.unload_all_models()
        std = m.clone()
        std.__class__ = mp.ModelPatcher  # the same patches, ComfyUI's ordinary patch-and-backup load
        y_std = forward(std)
        s["std_backup_linear"] = len({k[len("diffusion_model."):] for k in std.backup} & lin)
        mm.unload_all_models()
        s["vs_standard"] = rel(y, y_std)
        s["y_standard"] = y_std.tolist()
        s["restored_after_standard"] = digests(dm) == saved
        r["styles"][style] = s
        outs[style] = y

    # stacking: two LoRAs, and one LoRA applied twice at half strength
    a, b = spec["stack"]
    st = cl.apply_lora(cl.apply_lora(base, a, 1.0)[0], b, 0.5)[0]
    y_st = forward(st)
    mm.unload_all_models()
    st_std = st.clone()
    st_std.__class__ = mp.ModelPatcher
    r["stack_vs_standard"] = rel(y_st, forward(st_std))
    mm.unload_all_models()
    half = cl.apply_lora(cl.apply_lora(base, a, 0.4)[0], a, 0.4)[0]
    r["half_twice_vs_once"] = rel(forward(half), outs["comfy"])
    mm.unload_all_models()

    # a partial unload while loaded (ComfyUI freeing memory): the LoRA still applies exactly once
    m, _ = cl.apply_lora(base, a, 0.8)
    forward(m)
    m.partially_unload(CPU, 1e30)
    r["partial_unload_vs_loaded"] = rel(forward(), outs["comfy"])
    mm.unload_all_models()
    r["partial_unload_restored"] = digests(dm) == saved and not cast_time_keys(dm)

    # force_patch_weights (checkpoint saving): the patches are baked into the weights, not applied at cast time
    mm.load_models_gpu([m], force_patch_weights=True)
    now = digests(dm)
    r["forced_baked"] = sum(1 for k in m.patches if now[k[len("diffusion_model."):]] != saved[k[len("diffusion_model."):]])
    r["forced_cast_time"] = len(cast_time_keys(dm))
    r["forced_vs_cast_time"] = rel(forward(), outs["comfy"])
    mm.unload_all_models()
    r["forced_restored"] = digests(dm) == saved

    # core's LoRA loader on our MODEL takes the same path
    core, _ = comfy.sd.load_lora_for_models(base, None, comfy.utils.load_torch_file(a), 0.8, 0.0)
    y_core = forward(core)
    r["core_loader_cast_time"] = len(cast_time_keys(dm))
    r["core_loader_vs_ours"] = rel(y_core, outs["comfy"])
    mm.unload_all_models()
    r["core_loader_restored"] = digests(dm) == saved and not cast_time_keys(dm)
    r["y0"] = y0.tolist()
    r["y"] = {k: v.tolist() for k, v in outs.items()}
    res[wd] = r
    base = dm = m = st = st_std = half = core = std = None
    mm.unload_all_models()
    mm.soft_empty_cache()
if spec.get("core_model"):
    # core's native Krea 2 MODEL (comfy.sd's own loader and plain ModelPatcher) through Krea2LoraLoader's path
    core_base = comfy.sd.load_diffusion_model(spec["core_model"])
    dm = core_base.model.diffusion_model
    lin = linear_keys(dm)
    saved = digests(dm)

    g = torch.Generator().manual_seed(0)
    x = torch.randn(1, 16, 16, 16, generator=g)
    ctx = torch.randn(1, 9, spec["core_ctx_width"], generator=g)
    m, rep = cl.apply_lora(core_base, spec["core_lora"], 0.8)
    mm.load_models_gpu([m])
    y = core_base.model.apply_model(x, torch.tensor([0.7]), c_crossattn=ctx).float()
    patched = {k[len("diffusion_model."):] for k in m.patches}
    c = {"base_class": type(core_base).__name__, "class": type(m).__name__, "patched_linear": len(patched & lin),
         "backup_linear": len({k[len("diffusion_model."):] for k in m.backup} & lin),
         "cast_time": len(cast_time_keys(dm))}
    mm.unload_all_models()
    c["restored_bitexact"] = digests(dm) == saved and not cast_time_keys(dm)
    std = m.clone()
    std.__class__ = mp.ModelPatcher
    mm.load_models_gpu([std])
    c["std_backup_linear"] = len({k[len("diffusion_model."):] for k in std.backup} & lin)
    y_std = core_base.model.apply_model(x, torch.tensor([0.7]), c_crossattn=ctx).float()
    mm.unload_all_models()
    mm.load_models_gpu([core_base])
    y0 = core_base.model.apply_model(x, torch.tensor([0.7]), c_crossattn=ctx).float()
    mm.unload_all_models()
    c["vs_standard"] = rel(y, y_std)
    c["effect"] = rel(y, y0)
    c["base_class_after"] = type(core_base).__name__
    res["core_model"] = c
print(json.dumps(res))
