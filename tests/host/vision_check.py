"""Our CLIP's image paths in a real ComfyUI, in-process on the CPU, against our pure encoder on the same file.

    <host python> tests/host/vision_check.py spec.json        (cwd: a ComfyUI folder)

``spec.json``: ``{"pack_parent", "pack_name", "text_encoder", "vae", "tokenizer"}``. Runs core's own nodes
where the host has them (``TextEncodeQwenImageEditPlus``, ``TextGenerate``) and ``Krea2ReferenceEncode`` with
our CLIP, and prints one JSON line of comparisons with :mod:`krea2_model` computed from the pieces: the pure
encoder for the conditioning, and for the reference latents the image resized in this script with
``F.interpolate`` (bicubic, antialias) to the 1 MP / 16 px size worked out here, then the host's VAE.
"""

import json
import math

from host_script import boot  # noqa: E402

spec, pack = boot()

import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402
import comfy.sd  # noqa: E402
import comfy.utils  # noqa: E402

cc = pack("nodes.host.clip")
tn = pack("nodes.text_nodes")
k2 = pack("krea2_model")
prompt_mod = pack("krea2_model.text.prompt")
enc_mod = pack("krea2_model.text.encoder")
images_mod = pack("krea2_model.text.images")


def rel(a, b):
    return ((a.float() - b.float()).norm() / b.float().norm().clamp_min(1e-12)).item()


def cond_of(c):
    return c[0][0].float()


g = torch.Generator().manual_seed(3)
img = torch.rand(1, 200, 120, 3, generator=g)        # 200 x 120: sides not on the 16 / 32 px grids
img2 = torch.rand(1, 500, 700, 3, generator=g)       # needs downscaling for the vision tower
clip = cc.load_clip(spec["text_encoder"])
pure = k2.load_text_encoder(spec["text_encoder"], tokenizer=spec["tokenizer"], dtype=torch.float32)
vae = comfy.sd.VAE(sd=comfy.utils.load_torch_file(spec["vae"]))
res = {}

# -- Krea2ReferenceEncode: conditioning and reference latents from the pieces ------------------------------
for method, want_method in (("style / edit (timestep zero)", "index_timestep_zero"), ("identity edit", "index")):
    out = tn.Krea2ReferenceEncode.execute(clip, "make it a watercolour", vae, img, method, image2=img2).args[0]
    extra = out[0][1]
    want_cond = pure.encode("make it a watercolour", images=[img, img2])
    lat = extra["reference_latents"]
    wants = []
    for im in (img, img2):
        h, w = im.shape[1:3]
        s = min(1.0, math.sqrt(1024 * 1024 / (h * w)))
        size = (min(h // 16 * 16, max(16, round(h * s / 16) * 16)), min(w // 16 * 16, max(16, round(w * s / 16) * 16)))
        px = F.interpolate(im.permute(0, 3, 1, 2), size=size, mode="bicubic", antialias=True).clamp(0, 1)
        wants.append(vae.encode(px.permute(0, 2, 3, 1)))
    res[method] = {"method": extra.get("reference_latents_method"), "want_method": want_method,
                   "cond_rel": rel(cond_of(out), want_cond), "cond_shape": list(cond_of(out).shape),
                   "latent_shapes": [list(x.shape) for x in lat], "want_shapes": [list(x.shape) for x in wants],
                   "latent_rel": max(rel(a, b) for a, b in zip(lat, wants))}

# -- core's TextEncodeQwenImageEditPlus with our CLIP: Qwen-Image-Edit's template, our image tokens --------
try:
    from comfy_extras.nodes_qwen import TextEncodeQwenImageEditPlus
except ImportError:
    TextEncodeQwenImageEditPlus = None
if TextEncodeQwenImageEditPlus is not None:
    out = TextEncodeQwenImageEditPlus.execute(clip, "make it a watercolour", vae=None, image1=img).args[0]
    template = ("<|im_start|>system\nDescribe the key features of the input image (color, shape, size, texture, "
                "objects, background), then explain how the user's text instruction should alter or modify the image. "
                "Generate a new image that meets the user's requirements while maintaining consistency with the "
                "original input where appropriate.<|im_end|>\n<|im_start|>user\n{}<|im_end|>\n<|im_start|>assistant\n")
    head, tail = template.split("{}")
    # core resized the image to ~384^2 (area) itself; the same resize, then our layout with its template
    s = math.sqrt(384 * 384 / (200 * 120))
    core_img = comfy.utils.common_upscale(img.movedim(-1, 1), round(120 * s), round(200 * s), "area",
                                          "disabled").movedim(1, -1)
    prepared = [images_mod.prepare(core_img)]
    p = prompt_mod.build_image_prompt_ids(pure.tokenizer, "Picture 1: <|vision_start|><|image_pad|><|vision_end|>"
                                          "make it a watercolour", enc_mod.image_token_counts(prepared),
                                          prefix=head, suffix_text=tail, labels=False)
    want = pure.encode_image_ids(p, prepared).cond
    res["qwen_edit_plus"] = {"cond_rel": rel(cond_of(out), want), "shape": list(cond_of(out).shape),
                             "want_shape": list(want.shape)}

# -- core's TextGenerate with our CLIP: greedy equals our pure generate ------------------------------------
try:
    from comfy_extras.nodes_textgen import TextGenerate
except ImportError:
    TextGenerate = None
if TextGenerate is not None:
    for name, image in (("text", None), ("image", img)):
        got = TextGenerate.execute(clip, "describe this", 6, {"sampling_mode": "off"}, image=image).args[0]
        want = pure.generate("describe this", [image] if image is not None else None, max_new=6)
        res[f"generate_{name}"] = {"got": got, "want": want}
    kw = {"sampling_mode": "on", "temperature": 1.2, "top_k": 40, "top_p": 0.9, "min_p": 0.02,
          "repetition_penalty": 1.05, "seed": 5, "presence_penalty": 0.1}
    a = TextGenerate.execute(clip, "describe this", 6, dict(kw)).args[0]
    b = TextGenerate.execute(clip, "describe this", 6, dict(kw)).args[0]
    res["generate_seeded_same"] = a == b
print(json.dumps(res))
