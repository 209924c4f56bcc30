"""Our TextGenerate sampler against core's, in-process in a real ComfyUI on the CPU.

    <host python> tests/host/generate_check.py spec.json        (cwd: a ComfyUI folder)

``spec.json``: ``{"pack_parent", "pack_name"}``. For random logits of Qwen's vocabulary size, a token history and
each set of sampling options, core's own ``BaseGenerate.sample_token`` (``comfy/text_encoders/llama.py``, what
TextGenerate runs for ComfyUI's LLM text encoders) and our ``sample_next`` draw with generators seeded alike;
prints one JSON line: per option set, how many of the seeds gave the same token.
"""

import json

from host_script import boot  # noqa: E402

spec, pack = boot()

import torch  # noqa: E402

gen_mod = pack("krea2_model.text.generate")
try:
    from comfy.text_encoders.llama import BaseGenerate
except ImportError:
    BaseGenerate = None

res = {}
if BaseGenerate is not None and hasattr(BaseGenerate, "sample_token"):
    g = torch.Generator().manual_seed(0)
    logits = torch.randn(1, 151936, generator=g) * 3.0
    logits[0, :20] += torch.linspace(8.0, 4.0, 20)  # a few likely tokens, as a model's logits have
    history = [3, 7, 7, 11, 151645]
    options = {
        "textgenerate_defaults": dict(temperature=0.7, top_k=64, top_p=0.95, min_p=0.05, repetition_penalty=1.05),
        "hot_no_top_k": dict(temperature=1.6, top_k=0, top_p=0.9, min_p=0.0, repetition_penalty=1.0),
        "min_p_only": dict(temperature=1.0, top_k=0, top_p=1.0, min_p=0.2, repetition_penalty=1.0),
        "penalties": dict(temperature=1.3, top_k=40, top_p=1.0, min_p=0.0, repetition_penalty=2.0,
                          presence_penalty=0.5),
        "top_k_only": dict(temperature=1.0, top_k=5, top_p=1.0, min_p=0.0, repetition_penalty=1.0),
    }
    for name, o in options.items():
        same, seeds = 0, 60
        for seed in range(seeds):
            core = BaseGenerate.sample_token(None, logits.clone(), o["temperature"], o["top_k"], o["top_p"],
                                             o["min_p"], o["repetition_penalty"], list(history),
                                             torch.Generator().manual_seed(seed), do_sample=True,
                                             presence_penalty=o.get("presence_penalty", 0.0))
            ours = gen_mod.sample_next(logits.clone(), list(history), True, o["temperature"], o["top_k"], o["top_p"],
                                       o["min_p"], o["repetition_penalty"], o.get("presence_penalty", 0.0),
                                       torch.Generator().manual_seed(seed))
            same += int(core.reshape(-1)[0]) == ours
        res[name] = {"same": same, "seeds": seeds}
print(json.dumps(res))
