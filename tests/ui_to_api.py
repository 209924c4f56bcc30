"""UI-format workflow -> API format, by the rules the ComfyUI frontend applies on export.

For each node (mode 0; muted/bypassed nodes are left out), widget values are assigned to the
node's widget inputs in definition order (required, then optional), skipping the extra
``control_after_generate`` value that follows a seed widget; linked inputs become
``[source_node_id, source_slot]``. ``WIDGETS`` lists the widget order of every node the examples
use; the host tier checks it against the live ``/object_info``.
"""

# node type -> [(widget input name, has control_after_generate)], in definition order
WIDGETS = {
    "Krea2ModelLoader": [("model_name", False), ("weight_dtype", False)],
    "Krea2ModelSampling": [("variant", False), ("width", False), ("height", False), ("base_shift", False),
                           ("max_shift", False)],
    "Krea2TextEncoderLoader": [("text_encoder_name", False)],
    "Krea2TextEncode": [("text", False), ("taps", False), ("max_tokens", False)],
    "Krea2LoraLoader": [("lora_name", False), ("strength", False), ("strength_text_fusion", False),
                        ("blocks", False)],
    "ConditioningZeroOut": [],
    "EmptySD3LatentImage": [("width", False), ("height", False), ("batch_size", False)],
    "KSampler": [("seed", True), ("steps", False), ("cfg", False), ("sampler_name", False), ("scheduler", False),
                 ("denoise", False)],
    "VAELoader": [("vae_name", False)],
    "VAEDecode": [],
    "SaveImage": [("filename_prefix", False)],
    "LoadImage": [("image", False)],  # its upload button's value follows in the UI file; not exported
    "Krea2ReferenceEncode": [("text", False), ("method", False)],
    "VAEEncode": [], "ReferenceLatent": [],
    "FluxKontextMultiReferenceLatentMethod": [("reference_latents_method", False)],
    "SolidMask": [("value", False), ("width", False), ("height", False)],
    "MaskComposite": [("x", False), ("y", False), ("operation", False)],
    "Krea2RegionalPrompt": [],
}
# node type -> output types
OUTPUTS = {
    "Krea2ModelLoader": ["MODEL"], "Krea2ModelSampling": ["MODEL"], "Krea2TextEncoderLoader": ["CLIP"],
    "Krea2TextEncode": ["CONDITIONING"], "Krea2LoraLoader": ["MODEL"], "ConditioningZeroOut": ["CONDITIONING"],
    "EmptySD3LatentImage": ["LATENT"], "KSampler": ["LATENT"], "VAELoader": ["VAE"], "VAEDecode": ["IMAGE"],
    "SaveImage": [], "LoadImage": ["IMAGE", "MASK"], "Krea2ReferenceEncode": ["CONDITIONING"],
    "VAEEncode": ["LATENT"], "ReferenceLatent": ["CONDITIONING"], "FluxKontextMultiReferenceLatentMethod": ["CONDITIONING"],
    "SolidMask": ["MASK"], "MaskComposite": ["MASK"], "Krea2RegionalPrompt": ["CONDITIONING"],
}


def ui_to_api(ui: dict, widgets: dict = WIDGETS) -> dict:
    links = {l[0]: l for l in ui["links"]}
    api = {}
    for node in ui["nodes"]:
        if node.get("mode", 0) != 0:
            continue
        cls = node["type"]
        if cls not in widgets:
            raise KeyError(f"node type {cls!r} (node {node['id']}) has no known widget order")
        inputs = {}
        values = list(node.get("widgets_values") or [])
        linked = {i["name"]: i for i in node.get("inputs", []) if i.get("link") is not None}
        pos = 0
        for name, control in widgets[cls]:
            if name in linked:  # a widget converted to an input: it still occupies its value slot
                pos += 1 + (1 if control else 0)
                continue
            if pos >= len(values):
                raise ValueError(f"node {node['id']} ({cls}) has too few widget values for {name!r}")
            inputs[name] = values[pos]
            pos += 1 + (1 if control else 0)
        for name, inp in linked.items():
            link = links[inp["link"]]
            inputs[name] = [str(link[1]), link[2]]
        api[str(node["id"])] = {"class_type": cls, "inputs": inputs,
                                "_meta": {"title": node.get("title", cls)}}
    return api
