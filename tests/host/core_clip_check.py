"""Core's own Krea 2 text encoder (``CLIPLoader`` type ``krea2``) against ours, in-process on the CPU.

    <host python> tests/host/core_clip_check.py spec.json        (cwd: a ComfyUI folder with native Krea 2)

``spec.json``: ``{"pack_parent", "pack_name", "text_encoder", "model", "prompts": [...], "text_cfg": {...}}``.
Prints one JSON line; ``tests/host/test_host_interop.py`` asserts on it.

Core builds its Krea 2 encoder at the full Qwen3-VL-4B size whatever the file holds (an 8 GB random file
and some 16 GB more to load it do not fit a CI machine), so this script shrinks core's size tables to the
tiny test encoder's before loading: ``QWEN3VL_CONFIGS["qwen3vl_4b"]`` (text tower), ``QWEN3VL_VISION``
(vision tower, unused by text prompts) and the 4B-vs-8B file detection, which keys on a width of 2560.
Everything else is core's code as shipped: ``comfy.sd.load_clip``, its tokenizer and template, its 12-layer
tap, prefix strip and flattening. For each prompt it compares core's conditioning with
``Krea2TextEncode`` on our encoder loaded from the same file, ``Krea2TextEncode`` fed core's CLIP, and
the velocity of our Krea 2 transformer driven by each.
"""

import dataclasses
import json

from host_script import boot  # noqa: E402  (this folder is on sys.path when run as a script)

spec, pack = boot()

import torch  # noqa: E402
from safetensors import safe_open  # noqa: E402
import comfy.sd  # noqa: E402
import comfy.text_encoders.llama as llama  # noqa: E402
import comfy.text_encoders.qwen3vl as qwen3vl  # noqa: E402

cc = pack("nodes.host.clip")
ce = pack("nodes.host.clip_encode")
cm = pack("nodes.host.model")

# -- core's size tables, shrunk to the test encoder's (see the docstring) --------------------------------
t = spec["text_cfg"]
fields = {"hidden_size": t["hidden"], "intermediate_size": t["mlp_hidden"], "num_hidden_layers": t["layers"],
          "num_attention_heads": t["heads"], "num_key_value_heads": t["kv_heads"], "vocab_size": t["vocab"]}
half = t["head_dim"] // 2
Tiny = dataclasses.make_dataclass("TinyQwen3VLConfig", [(k, int, dataclasses.field(default=v)) for k, v in fields.items()],
                                  bases=(llama.Qwen3VL_4BConfig,))
Tiny.head_dim = t["head_dim"]
Tiny.rope_dims = [half - 2 * (half * 5 // 16), half * 5 // 16, half * 5 // 16]  # text tokens: plain RoPE either way
qwen3vl.QWEN3VL_CONFIGS["qwen3vl_4b"] = Tiny
with safe_open(spec["text_encoder"], "pt") as f:  # the test file's few vision tensors fix the vision sizes
    patch = f.get_slice("model.visual.patch_embed.proj.weight").get_shape()
qwen3vl.QWEN3VL_VISION["qwen3vl_4b"] = dict(hidden_size=patch[0], intermediate_size=2 * patch[0], depth=1,
                                            deepstack_visual_indexes=[0])
qwen3vl.QWEN3VL_VISION_COMMON.update(num_heads=2, patch_size=patch[-1], temporal_patch_size=patch[2])
_detect = comfy.sd.detect_te_model


def detect(sd):
    found = _detect(sd)
    if found == comfy.sd.TEModel.QWEN3VL_8B and sd["model.visual.merger.linear_fc2.weight"].shape[0] == t["hidden"]:
        return comfy.sd.TEModel.QWEN3VL_4B
    return found


comfy.sd.detect_te_model = detect

core = comfy.sd.load_clip(ckpt_paths=[spec["text_encoder"]], clip_type=comfy.sd.CLIPType.KREA2,
                          model_options={"dtype": torch.float32})
ours = cc.load_clip(spec["text_encoder"])
model = cm.load_model(spec["model"], "default")
dm = model.model.diffusion_model
g = torch.Generator().manual_seed(0)
x = torch.randn(1, dm.config.channels, 16, 16, generator=g)
sigma = torch.tensor([0.6])


def cond(c):
    return c[0][0].float()


def rel(a, b):
    return ((a - b).norm() / b.norm().clamp_min(1e-12)).item()


res = {"core_clip": type(core.cond_stage_model).__name__, "core_is_krea2": ce.is_core_krea2(core),
       "prompts": []}
for text in spec["prompts"]:
    c_core = cond(core.encode_from_tokens_scheduled(core.tokenize(text)))
    c_ours = cond(ce.encode(ours, text))
    c_node_core = cond(ce.encode(core, text))  # Krea2TextEncode given core's CLIP
    r = {"text": text[:40], "core_shape": list(c_core.shape), "ours_shape": list(c_ours.shape)}
    if c_core.shape == c_ours.shape:
        r["cond_core_vs_ours"] = rel(c_core, c_ours)
        v_core = dm(x, sigma, c_core).float()
        v_ours = dm(x, sigma, c_ours).float()
        r["velocity_core_vs_ours"] = rel(v_core, v_ours)
    r["node_core_shape"] = list(c_node_core.shape)
    if c_node_core.shape == c_ours.shape:  # Krea2TextEncode with core's CLIP: ours, truncation included
        r["node_with_core_clip_vs_ours"] = rel(c_node_core, c_ours)
        r["velocity_node_core_vs_ours"] = rel(dm(x, sigma, c_node_core).float(), dm(x, sigma, c_ours).float())
    res["prompts"].append(r)
print(json.dumps(res))
