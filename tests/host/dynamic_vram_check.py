"""Every loader as a GPU user's ComfyUI builds models (dynamic VRAM), emulated in-process on the CPU.

    <host python> tests/host/dynamic_vram_check.py spec.json        (cwd: a ComfyUI folder with dynamic VRAM)

``spec.json``: ``{"pack_parent", "pack_name", "native": file core's UNET loader reads, "transformers": {case: [path, weight_dtype]},
"texts": {case: path}, "lora": a LoRA for the transformers, "image_text": the case with a vision tower}``.
Prints one JSON line: per case, the output with the construction flag off and on, and how many layers the host
built lazily while the flag was on; ``tests/host/test_host_dynamic_vram.py`` asserts on it.

Why an emulation, and why it is faithful. On an NVIDIA GPU with torch >= 2.8, ComfyUI 0.33 starts comfy-aimdo
and sets ``comfy.memory_management.aimdo_enabled = True`` and ``CoreModelPatcher = ModelPatcherDynamic``
(``main.py``). What that changes for a loader: ``comfy.ops`` Linear / Embedding layers are built without
parameters (``weight = None``, a meta embedding) and filled by their own ``_load_from_state_dict``, and
``comfy.utils.load_torch_file`` reads through aimdo's zero-copy mmap. aimdo itself cannot start on a CPU
(``init_devices`` fails for the cpu device, and with the flag forced on ``load_torch_file`` raises "comfy-aimdo
is not initialized" for core's loaders too). So here the flag is on while models are built and loaded, files
are read with it off (the bytes are the same either way), and the patcher class is the dynamic one (which
hands a CPU load device to the plain ModelPatcher, as it does on a GPU machine for CPU-placed models). Core's
own ``load_diffusion_model`` runs through the same emulation as the yardstick: it must give what it gives
with the flag off.
"""

import contextlib
import json

from host_script import boot, sampling_inputs  # noqa: E402  (this folder is on sys.path when run as a script)

spec, pack = boot()

import torch  # noqa: E402
import comfy.memory_management as mem  # noqa: E402
import comfy.model_management as mm  # noqa: E402
import comfy.model_patcher as mp  # noqa: E402
import comfy.ops  # noqa: E402
import comfy.sample  # noqa: E402
import comfy.sd  # noqa: E402
import comfy.utils  # noqa: E402

cm = pack("nodes.host.model")
cc = pack("nodes.host.clip")
ce = pack("nodes.host.clip_encode")
cl = pack("nodes.host.lora")

# the same emulation the whole-graph test installs in a server (files read with the flag off, lazily built
# Linear layers counted); importing it patches comfy.utils.load_torch_file and the Linear constructor
import dynamic_vram_emulation as emulation  # noqa: E402

LAZY = emulation._count


@contextlib.contextmanager
def construction_flag(on: bool):
    saved = mem.aimdo_enabled, mp.CoreModelPatcher
    mem.aimdo_enabled = on
    if on:
        mp.CoreModelPatcher = mp.ModelPatcherDynamic
    LAZY[0] = 0
    try:
        yield
    finally:
        mem.aimdo_enabled, mp.CoreModelPatcher = saved


_in = sampling_inputs(1)  # noise / latent only; contexts are made for each model's width below


def sample(patcher, ctx):
    g = torch.Generator().manual_seed(5)
    unc = torch.randn(ctx.shape, generator=g)
    out = comfy.sample.sample(patcher, _in["noise"], 2, 2.0, "euler", "simple", [[ctx, {}]], [[unc, {}]],
                              _in["latent"], seed=1)
    mm.unload_all_models()
    return out.flatten().tolist()


def context_for(patcher):
    dm = patcher.model.diffusion_model
    cfg = getattr(dm, "config", None)
    width = cfg.text_taps * cfg.text_dim if cfg is not None else spec["native_ctx_width"]
    return torch.randn(1, 9, width, generator=torch.Generator().manual_seed(4))


def transformer_case(load):
    out = {}
    for flag in (False, True):
        with construction_flag(flag):
            try:
                patcher = load()
                lazy = LAZY[0]
            except Exception as e:  # reported, asserted by the test
                out["on" if flag else "off"] = {"error": f"{type(e).__name__}: {e}"}
                continue
        ctx = context_for(patcher)
        side = {"latent": sample(patcher, ctx), "lazy_layers": lazy, "patcher": type(patcher).__name__}
        if spec.get("lora") and isinstance(patcher.model.diffusion_model, cm.Krea2Transformer):
            side["ours_lora"] = sample(cl.apply_lora(patcher, spec["lora"], 0.8)[0], ctx)
            core, _ = comfy.sd.load_lora_for_models(patcher, None, comfy.utils.load_torch_file(spec["lora"]), 0.8, 0)
            side["core_lora"] = sample(core, ctx)
            # the factory the host calls for a non-dynamic copy (TorchCompileModel, hooks, multi-GPU clones)
            init = getattr(patcher, "cached_patcher_init", None)
            side["rebuilt"] = sample(init[0](*init[1], disable_dynamic=True), ctx) if init else None
        out["on" if flag else "off"] = side
    return out


def text_case(path, with_image):
    out = {}
    for flag in (False, True):
        with construction_flag(flag):
            try:
                clip = cc.load_clip(path)
                lazy = LAZY[0]
            except Exception as e:
                out["on" if flag else "off"] = {"error": f"{type(e).__name__}: {e}"}
                continue
        side = {"cond": ce.encode(clip, "a red fox in the snow")[0][0].flatten().tolist(), "lazy_layers": lazy}
        tokens = clip.tokenize("a red fox")
        try:
            side["generated"] = [int(t) for t in clip.generate(tokens, do_sample=False, max_length=4)]
        except Exception as e:  # reported; the test says which formats must generate
            side["generated_error"] = f"{type(e).__name__}: {e}"
            side["generated"] = None
        if with_image:
            img = torch.linspace(0, 1, 64 * 96 * 3).reshape(1, 64, 96, 3)
            t = clip.tokenizer.tokenize_with_weights("the same, in the style of this", images=[img])
            side["image_cond"] = clip.encode_from_tokens_scheduled(t)[0][0].flatten().tolist()
        init = getattr(clip.patcher, "cached_patcher_init", None)
        side["rebuilt"] = init is not None and init[0](*init[1], disable_dynamic=True).model is not clip.patcher.model
        mm.unload_all_models()
        out["on" if flag else "off"] = side
    return out


res = {"aimdo_flag": hasattr(mem, "aimdo_enabled"), "transformers": {}, "texts": {}}
if spec.get("native"):
    res["native"] = transformer_case(lambda: comfy.sd.load_diffusion_model(spec["native"]))
for name, (path, weight_dtype) in spec["transformers"].items():
    res["transformers"][name] = transformer_case(lambda p=path, w=weight_dtype: cm.load_model(p, w))
for name, path in spec["texts"].items():
    res["texts"][name] = text_case(path, name == spec.get("image_text"))
print(json.dumps(res))
