"""Writes the example workflows: UI format (example_workflows/*.json, ComfyUI's template folder)
and their API-format twins (example_workflows/api/*.json) from one graph description each.

    python scripts/make_workflows.py

The unit tier converts each UI file back to API format by the frontend's rules
(tests/ui_to_api.py) and checks it equals the twin, so the two never drift apart.
"""

import json
import os
import sys

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, os.path.join(HERE, "..", "tests"))
from ui_to_api import WIDGETS, OUTPUTS  # noqa: E402

OUT = os.path.join(HERE, "..", "example_workflows")
NEGATIVE = ("blurry, low quality, jpeg artifacts, watermark, text overlay, deformed hands, extra fingers, "
            "oversaturated, cartoon")
STYLE_PROMPT = "A lighthouse on a rocky coast at dusk, in the style of the reference image"
PROMPT = ("A red fox curled up asleep on a moss-covered stone in a misty pine forest at dawn, soft golden light "
          "through the trees, shallow depth of field, photograph")


def graph_turbo(lora=False):
    g = {
        "model": ("Krea2ModelLoader", {"model_name": "krea2_turbo_bf16.safetensors", "weight_dtype": "default"}),
        "sampling": ("Krea2ModelSampling", {"model": ("model", 0), "variant": "turbo", "width": 1024,
                                            "height": 1024}),
        "clip": ("Krea2TextEncoderLoader", {"text_encoder_name": "qwen3vl_4b_bf16.safetensors"}),
        "pos": ("Krea2TextEncode", {"clip": ("clip", 0), "text": PROMPT}),
        "neg": ("ConditioningZeroOut", {"conditioning": ("pos", 0)}),
        "latent": ("EmptySD3LatentImage", {"width": 1024, "height": 1024, "batch_size": 1}),
        "ksampler": ("KSampler", {"model": ("sampling", 0), "seed": 42, "steps": 8, "cfg": 1.0,
                                  "sampler_name": "euler", "scheduler": "simple", "positive": ("pos", 0),
                                  "negative": ("neg", 0), "latent_image": ("latent", 0), "denoise": 1.0}),
        "vae": ("VAELoader", {"vae_name": "qwen_image_vae.safetensors"}),
        "decode": ("VAEDecode", {"samples": ("ksampler", 0), "vae": ("vae", 0)}),
        "save": ("SaveImage", {"images": ("decode", 0), "filename_prefix": "krea2_turbo"}),
    }
    if lora:
        g["lora"] = ("Krea2LoraLoader", {"model": ("model", 0), "lora_name": "krea2_style_lora.safetensors",
                                         "strength": 1.0})
        g["sampling"][1]["model"] = ("lora", 0)
        g["save"][1]["filename_prefix"] = "krea2_turbo_lora"
    return g


def graph_style_reference():
    """Turbo with one reference image through Krea2ReferenceEncode (the training-matched encoding), and a
    style-reference LoRA slot as in Comfy-Org's Krea 2 style-reference template."""
    g = graph_turbo()
    g["lora"] = ("Krea2LoraLoader", {"model": ("model", 0), "lora_name": "krea2_style_reference.safetensors",
                                     "strength": 1.0})
    g["sampling"][1]["model"] = ("lora", 0)
    g["image"] = ("LoadImage", {"image": "krea2_reference.png"})
    g["pos"] = ("Krea2ReferenceEncode", {"clip": ("clip", 0), "text": STYLE_PROMPT, "vae": ("vae", 0),
                                         "image": ("image", 0), "method": "style / edit (timestep zero)"})
    g["save"][1]["filename_prefix"] = "krea2_style_reference"
    order = ["model", "lora", "sampling", "clip", "vae", "image", "pos", "neg", "latent", "ksampler", "decode",
             "save"]
    return {k: g[k] for k in order}


def graph_core_reference():
    """Turbo with one reference image through core's nodes (VAEEncode -> ReferenceLatent ->
    FluxKontextMultiReferenceLatentMethod index_timestep_zero), as Comfy-Org's style-reference template
    wires native Krea 2, here on our MODEL; the same LoRA slot."""
    g = graph_style_reference()
    g["pos"] = ("Krea2TextEncode", {"clip": ("clip", 0), "text": STYLE_PROMPT})
    g["encode"] = ("VAEEncode", {"pixels": ("image", 0), "vae": ("vae", 0)})
    g["ref"] = ("ReferenceLatent", {"conditioning": ("pos", 0), "latent": ("encode", 0)})
    g["method"] = ("FluxKontextMultiReferenceLatentMethod", {"conditioning": ("ref", 0),
                                                             "reference_latents_method": "index_timestep_zero"})
    g["ksampler"][1]["positive"] = ("method", 0)
    g["save"][1]["filename_prefix"] = "krea2_core_reference"
    order = ["model", "lora", "sampling", "clip", "vae", "image", "encode", "pos", "ref", "method", "neg", "latent",
             "ksampler", "decode", "save"]
    return {k: g[k] for k in order}


REGION_BASE = "A sunlit meadow at the edge of a pine forest, two animals resting in the grass, photograph"
REGION_PROMPTS = ("A red fox curled up asleep", "A white snowy owl perched on a stump, eyes open")


def graph_regional():
    """Turbo with two regional prompts in one forward (Krea2RegionalPrompt): a fox on the left half, an owl on the
    right, the base prompt everywhere; the masks are made with core's SolidMask and MaskComposite."""
    g = graph_turbo()
    g["pos"] = ("Krea2TextEncode", {"clip": ("clip", 0), "text": REGION_BASE})
    g["r1"] = ("Krea2TextEncode", {"clip": ("clip", 0), "text": REGION_PROMPTS[0]})
    g["r2"] = ("Krea2TextEncode", {"clip": ("clip", 0), "text": REGION_PROMPTS[1]})
    g["black"] = ("SolidMask", {"value": 0.0, "width": 1024, "height": 1024})
    g["half"] = ("SolidMask", {"value": 1.0, "width": 512, "height": 1024})
    g["left"] = ("MaskComposite", {"destination": ("black", 0), "source": ("half", 0), "x": 0, "y": 0,
                                   "operation": "add"})
    g["right"] = ("MaskComposite", {"destination": ("black", 0), "source": ("half", 0), "x": 512, "y": 0,
                                    "operation": "add"})
    g["regional"] = ("Krea2RegionalPrompt", {"conditioning": ("pos", 0), "region_1": ("r1", 0), "mask_1": ("left", 0),
                                             "region_2": ("r2", 0), "mask_2": ("right", 0)})
    g["ksampler"][1]["positive"] = ("regional", 0)
    g["save"][1]["filename_prefix"] = "krea2_regional"
    order = ["model", "sampling", "clip", "black", "half", "pos", "r1", "r2", "left", "right", "regional", "neg",
             "latent", "ksampler", "vae", "decode", "save"]
    return {k: g[k] for k in order}


def graph_raw():
    return {
        "model": ("Krea2ModelLoader", {"model_name": "krea2_raw_bf16.safetensors", "weight_dtype": "default"}),
        "sampling": ("Krea2ModelSampling", {"model": ("model", 0), "variant": "raw", "width": 1024, "height": 1024}),
        "clip": ("Krea2TextEncoderLoader", {"text_encoder_name": "qwen3vl_4b_bf16.safetensors"}),
        "pos": ("Krea2TextEncode", {"clip": ("clip", 0), "text": PROMPT}),
        "neg": ("Krea2TextEncode", {"clip": ("clip", 0), "text": NEGATIVE}),
        "latent": ("EmptySD3LatentImage", {"width": 1024, "height": 1024, "batch_size": 1}),
        "ksampler": ("KSampler", {"model": ("sampling", 0), "seed": 42, "steps": 52, "cfg": 4.5,
                                  "sampler_name": "euler", "scheduler": "simple", "positive": ("pos", 0),
                                  "negative": ("neg", 0), "latent_image": ("latent", 0), "denoise": 1.0}),
        "vae": ("VAELoader", {"vae_name": "qwen_image_vae.safetensors"}),
        "decode": ("VAEDecode", {"samples": ("ksampler", 0), "vae": ("vae", 0)}),
        "save": ("SaveImage", {"images": ("decode", 0), "filename_prefix": "krea2_raw"}),
    }


TITLES = {"pos": "Prompt", "neg": "Negative prompt", "r1": "Region 1 prompt", "r2": "Region 2 prompt",
          "left": "Region 1 mask (left half)", "right": "Region 2 mask (right half)"}
# body height (px) per node type at width 380: slots + widgets (20 px each), the prompt box, the preview
HEIGHTS = {"Krea2ModelSampling": 160, "Krea2TextEncode": 200, "KSampler": 270, "Krea2LoraLoader": 140,
           "EmptySD3LatentImage": 110, "SaveImage": 300, "LoadImage": 340, "Krea2ReferenceEncode": 280,
           "VAEEncode": 70, "ReferenceLatent": 70, "FluxKontextMultiReferenceLatentMethod": 90,
           "SolidMask": 110, "MaskComposite": 140, "Krea2RegionalPrompt": 210}
#: widget values a UI file holds after the listed widgets (LoadImage's upload button)
TRAILING_WIDGETS = {"LoadImage": ["image"]}
# values of our nodes' optional (advanced) widgets, written out so UI and API twins say the same
DEFAULTS = {
    "Krea2ModelSampling": {"base_shift": 0.5, "max_shift": 1.15},
    "Krea2TextEncode": {"taps": "2,5,8,11,14,17,20,23,26,29,32,35", "max_tokens": 512},
    "Krea2LoraLoader": {"strength_text_fusion": 1.0, "blocks": ""},
}


def with_defaults(g):
    return {name: (cls, {**DEFAULTS.get(cls, {}), **inputs}) for name, (cls, inputs) in g.items()}


def to_api(g):
    ids = {name: str(i + 1) for i, name in enumerate(g)}
    api = {}
    for name, (cls, inputs) in g.items():
        ins = {k: ([ids[v[0]], v[1]] if isinstance(v, tuple) else v) for k, v in inputs.items()}
        api[ids[name]] = {"class_type": cls, "inputs": ins, "_meta": {"title": TITLES.get(name, cls)}}
    return api


def to_ui(g):
    ids = {name: i + 1 for i, name in enumerate(g)}
    links, nodes = [], []
    out_links = {}
    for name, (cls, inputs) in g.items():
        for k, v in inputs.items():
            if isinstance(v, tuple):
                lid = len(links) + 1
                src_cls = g[v[0]][0]
                typ = OUTPUTS[src_cls][v[1]]
                links.append([lid, ids[v[0]], v[1], ids[name], None, typ, k])
                out_links.setdefault((v[0], v[1]), []).append(lid)
    order = {name: i for i, name in enumerate(g)}
    cols = {"model": 0, "clip": 0, "vae": 0, "image": 0, "encode": 1, "ref": 2, "method": 2, "latent": 1,
            "sampling": 1, "lora": 1, "pos": 1, "neg": 1,
            "ksampler": 2, "decode": 3, "save": 3, "black": 0, "half": 0, "r1": 1, "r2": 1, "left": 2, "right": 2,
            "regional": 3}
    rows = {}
    for name, (cls, inputs) in g.items():
        col = cols.get(name, 1)
        row = rows.get(col, 0)
        # Node body heights as the frontend draws them (title bar and a gap on top), so no node hides
        # another's widgets; the browser tier checks the loaded graph for overlaps.
        height = HEIGHTS.get(cls, 120)
        rows[col] = row + height + 70
        node_inputs = []
        link_inputs = [(k, v) for k, v in inputs.items() if isinstance(v, tuple)]
        for slot, (k, v) in enumerate(link_inputs):
            lid = next(l for l in links if l[3] == ids[name] and l[6] == k)
            lid[4] = slot
            node_inputs.append({"name": k, "type": OUTPUTS[g[v[0]][0]][v[1]], "link": lid[0]})
        widgets = []
        for wname, control in WIDGETS[cls]:
            widgets.append(inputs[wname])
            if control:
                widgets.append("fixed")
        widgets += TRAILING_WIDGETS.get(cls, [])
        outputs = [{"name": t, "type": t, "links": out_links.get((name, i), []), "slot_index": i}
                   for i, t in enumerate(OUTPUTS[cls])]
        node = {"id": ids[name], "type": cls, "pos": [40 + 420 * col, 40 + row], "size": [380, height],
                "flags": {}, "order": order[name], "mode": 0, "inputs": node_inputs, "outputs": outputs,
                "properties": {"Node name for S&R": cls}, "widgets_values": widgets}
        if name in TITLES:
            node["title"] = TITLES[name]
        nodes.append(node)
    return {"last_node_id": len(nodes), "last_link_id": len(links), "nodes": nodes,
            "links": [l[:6] for l in links], "groups": [], "config": {}, "extra": {"ds": {"scale": 0.8,
                                                                                        "offset": [0, 0]}},
            "version": 0.4}


def main():
    for fname, g0 in (("krea2_turbo_text_to_image", graph_turbo()), ("krea2_raw_text_to_image", graph_raw()),
                     ("krea2_turbo_lora", graph_turbo(lora=True)),
                     ("krea2_turbo_style_reference", graph_style_reference()),
                     ("krea2_turbo_reference_core_nodes", graph_core_reference()),
                     ("krea2_turbo_regional_prompt", graph_regional())):
        g = with_defaults(g0)
        with open(os.path.join(OUT, fname + ".json"), "w") as f:
            json.dump(to_ui(g), f, indent=1)
            f.write("\n")
        with open(os.path.join(OUT, "api", fname + ".json"), "w") as f:
            json.dump(to_api(g), f, indent=1)
            f.write("\n")
        print("wrote", fname)


if __name__ == "__main__":
    main()
