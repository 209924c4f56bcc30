"""Our CLIP in a real ComfyUI, in-process on the CPU: what it refuses and what it says.

    <host python> tests/host/clip_check.py spec.json        (cwd: a ComfyUI folder)

``spec.json``: ``{"pack_parent", "pack_name", "text_encoder"}``. Prints one JSON line that
``tests/host/test_host_nodes.py`` asserts on: ``load_sd`` with a full, a partial and a foreign state dict, and
the warnings the tokenizer gives for ComfyUI's prompt-weight syntax (read literally by Krea 2).
"""

import json
import logging

from host_script import boot  # noqa: E402  (this folder is on sys.path when run as a script)

spec, pack = boot()

import torch  # noqa: E402

cc = pack("nodes.host.clip")
errors = pack("krea2_model.errors")


class Grab(logging.Handler):
    def __init__(self):
        super().__init__(logging.WARNING)
        self.lines = []

    def emit(self, record):
        self.lines.append(record.getMessage())


grab = Grab()
logging.getLogger("krea2").addHandler(grab)
clip = cc.load_clip(spec["text_encoder"])
model = clip.cond_stage_model
full = {k: v.clone() for k, v in model.transformer.state_dict().items()}
res = {}


def outcome(sd):
    try:
        model.load_sd(sd)
        return {"ok": True}
    except errors.Krea2Error as e:
        return {"ok": False, "error": str(e)}


res["full"] = outcome(full)
partial = dict(full)
dropped = sorted(partial)[:3]
for k in dropped:
    del partial[k]
res["partial"] = dict(outcome(partial), dropped=dropped)
res["foreign"] = outcome(dict(full, **{"text_model.encoder.layers.0.mlp.fc1.weight": torch.zeros(2, 2)}))

before = len(grab.lines)
for text in ("a (red:1.3) fox", "another (blue:0.8) fox", "embedding:my_style a cat", "a plain prompt"):
    clip.tokenize(text)
res["weight_syntax_warnings"] = [m for m in grab.lines[before:] if "literally" in m]
fresh = cc.load_clip(spec["text_encoder"])
before = len(grab.lines)
fresh.tokenize("a plain prompt (with a parenthesis) and no weight")
res["plain_warnings"] = [m for m in grab.lines[before:] if "literally" in m]
print(json.dumps(res))
