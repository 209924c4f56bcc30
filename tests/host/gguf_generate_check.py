"""Generation from a GGUF text encoder with and without the per-call layer copies, plain and patched, in-process in
a real ComfyUI on the CPU (issue 20).

    <host python> tests/host/gguf_generate_check.py spec.json        (cwd: a ComfyUI folder)

``spec.json``: ``{"pack_parent", "pack_name", "text_encoder", "reference"}`` (a GGUF file; the same weights
dequantized, as safetensors). Our CLIP through
``nodes.host.clip.load_clip``, tokenized and generated as core's TextGenerate does (``CLIP.tokenize`` with the
template, ``CLIP.generate`` greedy; the CLIP's model loaded by the host first). Each case twice: with the host's
copy budget (every layer dequantized once for the call, with the weight patches) and with ``copy_budget`` 0 (every
layer dequantized per use). Patched: core's ``CLIP.add_patches`` with a ``diff`` on every layer's MLP down
projection, also on the reference file (core's own patching of plain weights). Prints one JSON line: the token ids
and the number of layers copied per case.
"""

import json

from host_script import boot  # noqa: E402

spec, pack = boot()

import torch  # noqa: E402

cc = pack("nodes.host.clip")
ops = pack("krea2_model.formats.gguf_ops")

copied = []
real_exit = ops.call_copies.__exit__


def recording_exit(self, *exc):
    copied.append(self.layers)
    return real_exit(self, *exc)


ops.call_copies.__exit__ = recording_exit
clip = cc.load_clip(spec["text_encoder"])
budget = cc.Krea2ClipModel.__dict__["copy_budget"]  # the staticmethod itself


def run(copies: bool, clip) -> list:
    cc.Krea2ClipModel.copy_budget = budget if copies else staticmethod(lambda device: 0)
    tokens = clip.tokenize("a red fox in the snow", skip_template=False, min_length=1, thinking=False)
    if hasattr(clip, "generate"):
        out = clip.generate(tokens, do_sample=False, max_length=10)
    else:  # hosts before TextGenerate: the same call on the CLIP model
        clip.load_model()
        out = clip.cond_stage_model.generate(tokens, do_sample=False, max_length=10)
    return [int(t) for t in out]


res = {"plain_copies": run(True, clip), "plain_per_use": run(False, clip)}
sd = clip.patcher.model_state_dict()
keys = [k for k in sd if k.endswith("mlp.down_proj.weight")]
g = torch.Generator().manual_seed(0)
patches = {}
for k in keys:
    mod = clip.patcher.model
    for part in k.split(".")[:-1]:
        mod = getattr(mod, part)
    shape = tuple(mod.gguf_shape) if getattr(mod, "gguf_qtype", None) is not None else tuple(mod.weight.shape)
    patches[k] = (torch.randn(shape, generator=g) * 0.5,)
patched = clip.clone()  # as core's LoRA loaders do
res["patched_keys"] = len(patched.add_patches(patches, 1.0))
res["lora_copies"], res["lora_per_use"] = run(True, patched), run(False, patched)
ref = cc.load_clip(spec["reference"]).clone()  # the same weights dequantized by the gguf package, safetensors
ref.add_patches(patches, 1.0)
res["lora_reference"] = run(False, ref)
res["copied_layers"] = copied[:4]
res["layers"] = len(keys)
print(json.dumps(res))
