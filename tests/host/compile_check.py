"""Core's TorchCompileModel path (``set_torch_compile_wrapper``) on our MODEL and on native Krea 2's, in-process.

    <host python> tests/host/compile_check.py spec.json        (cwd: a ComfyUI folder with native Krea 2)

``spec.json``: ``{"pack_parent", "pack_name", "model", "ctx_width", "backend"}``. Prints one JSON line;
``tests/host/test_host_hooks.py`` asserts on it. Both MODELs load the same file and sample the same
conditioning (one ``index_timestep_zero`` reference, cfg 2) plain and compiled; dynamo's frame counter
shows the compiled forward really ran.
"""

import json
import time

from host_script import boot, sampling_inputs  # noqa: E402  (this folder is on sys.path when run as a script)

spec, pack = boot()

import torch  # noqa: E402
import torch._dynamo.utils as dyn_utils  # noqa: E402
import comfy.sample  # noqa: E402
import comfy.sd  # noqa: E402
from comfy_api.torch_helpers import set_torch_compile_wrapper  # noqa: E402

cm = pack("nodes.host.model")

_in = sampling_inputs(spec["ctx_width"])
ctx, unc, ref, latent, noise, with_ref = (_in[k] for k in ("ctx", "unc", "ref", "latent", "noise", "with_ref"))


def sample(m):
    return comfy.sample.sample(m, noise, 2, 2.0, "euler", "simple", [[ctx, dict(with_ref)]], [[unc, dict(with_ref)]],
                               latent, seed=1).flatten().tolist()


res = {}
for side, model in (("ours", cm.load_model(spec["model"])), ("native", comfy.sd.load_diffusion_model(spec["model"]))):
    plain = sample(model)
    m = model.clone()
    set_torch_compile_wrapper(m, backend=spec["backend"])
    torch._dynamo.reset()
    dyn_utils.counters.clear()
    t0 = time.perf_counter()
    compiled = sample(m)
    frames = int(dyn_utils.counters["stats"]["unique_graphs"])
    res[side] = {"plain": plain, "compiled": compiled, "graphs": frames, "seconds": time.perf_counter() - t0,
                 "breaks": sum(dyn_utils.counters["graph_break"].values())}
print(json.dumps(res))
