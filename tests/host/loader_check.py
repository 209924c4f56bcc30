"""Our MODEL loader in a real ComfyUI, in-process on the CPU: a TypeError raised *inside* a host call is the
host's error and reaches the caller; the loader never retries it as if it meant an older host signature.

    <host python> tests/host/loader_check.py spec.json        (cwd: a ComfyUI folder)

``spec.json``: ``{"pack_parent", "pack_name", "model"}``. Prints one JSON line.
"""

import json

from host_script import boot  # noqa: E402

spec, pack = boot()

import comfy.supported_models_base as smb  # noqa: E402

cm = pack("nodes.host.model")
res = {"plain": None, "inner_type_error": None}
m = cm.load_model(spec["model"], "default")
res["plain"] = type(m.model.diffusion_model).__name__

real = smb.BASE.set_inference_dtype
calls = []


def failing_once(self, *args, **kwargs):
    calls.append(sorted(kwargs))
    if len(calls) == 1:
        raise TypeError("raised inside set_inference_dtype")
    return real(self, *args, **kwargs)


failing_once.__signature__ = __import__("inspect").signature(real)
smb.BASE.set_inference_dtype = failing_once
try:
    cm.load_model(spec["model"], "default")
    res["inner_type_error"] = "swallowed"
except TypeError as e:
    res["inner_type_error"] = str(e)
res["calls"] = calls
print(json.dumps(res))
