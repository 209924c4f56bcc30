"""Each use of a ComfyUI internal (``nodes/host/internals.py``) run on a real host, in-process on the CPU.

    <host python> tests/host/internals_check.py spec.json        (cwd: a ComfyUI folder)

``spec.json``: ``{"pack_parent", "pack_name", "model", "native_model" (or null), "text_encoder"}``. Prints one
JSON line; ``tests/host/test_host_nodes.py`` asserts on it.
"""

import json

from host_script import boot  # noqa: E402

spec, pack = boot()

import torch  # noqa: E402
import comfy.model_patcher as mp  # noqa: E402
import comfy.sd  # noqa: E402

hi = pack("nodes.host.internals")
cm = pack("nodes.host.model")
cc = pack("nodes.host.clip")
ce = pack("nodes.host.clip_encode")
cp = pack("nodes.host.patcher")
res = {}

ours = cm.load_model(spec["model"])
key = "diffusion_model.first.weight"
w, set_func, convert = hi.key_weight(ours.model, key)
res["key_weight"] = {"is_param": w is ours.model.diffusion_model.first.weight, "set": set_func is None,
                     "convert": convert is None}

args = hi.patch_weight_arguments(key, "cpu", (True,), {})
res["patch_args"] = {"names": sorted(args), "key": args["key"] == key, "device_to": args["device_to"] == "cpu",
                     "inplace_update": args["inplace_update"] is True}

# a cast-time patch computes what the host's own LowVramPatch computes
m = ours.clone()
delta = torch.randn_like(w) * 0.01
m.add_patches({key: (delta,)}, 0.5)
base = w.detach().float().clone()
res["low_vram_patch"] = {"is_host_class": hi.low_vram_patch_class() is mp.LowVramPatch,
                         "ours_vs_host": (cp.CastTimePatch(key, m.patches)(base.clone())
                                          - mp.LowVramPatch(key, m.patches)(base.clone())).abs().max().item(),
                         "moved": (cp.CastTimePatch(key, m.patches)(base.clone()) - base).abs().max().item()}

plain = mp.ModelPatcher(ours.model, load_device="cpu", offload_device="cpu")
clone = plain.clone()
adopted = hi.adopt_patcher(clone, cp.Krea2ModelPatcher)
res["adopt"] = {"clone": type(adopted).__name__, "original": type(plain).__name__, "same": adopted is clone,
                "subclass_untouched": type(hi.adopt_patcher(ours.clone(), mp.ModelPatcher)).__name__}

native_cls = hi.native_krea2_class()
res["native"] = {"class": None if native_cls is None else native_cls.__name__, "ours": cm.is_krea2_model(ours)}
if spec.get("native_model"):
    native = comfy.sd.load_diffusion_model(spec["native_model"])
    res["native"]["native"] = cm.is_krea2_model(native)
    res["native"]["native_is_class"] = isinstance(native.model, native_cls)
text_cls = hi.native_krea2_text_class()
clip = cc.load_clip(spec["text_encoder"])
res["text"] = {"class": None if text_cls is None else text_cls.__name__, "ours_is_core": ce.is_core_krea2(clip),
               "ours": ce.is_ours(clip)}
import comfy.model_management as mm  # noqa: E402
loaded = clip.patcher
mm.load_models_gpu([loaded], force_full_load=True)
was = any(lm.model is loaded for lm in mm.current_loaded_models)
res["unload_patcher"] = {"was_loaded": was, "unloaded": hi.unload_patcher(loaded),
                         "still_listed": any(lm.model is loaded for lm in mm.current_loaded_models),
                         "again": hi.unload_patcher(loaded)}
res["checked_on"] = list(hi.CHECKED_ON)
print(json.dumps(res))
