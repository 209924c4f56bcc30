"""ComfyUI's per-layer quantized transformer files, written with the host's own quantizers (comfy_kitchen's
layouts, as ComfyUI's quantization tools write them), for the side-by-side checks.

    <host python> tests/host/quant_assets.py spec.json        (cwd: a ComfyUI folder)

``spec.json``: ``{"src": fp32 ComfyUI-layout file, "out": {format: path}}``. Formats: ``int8_tensorwise``,
``int8_convrot`` (int8_tensorwise with the ConvRot rotation, Comfy-Org's int8 Krea 2 releases),
``convrot_w4a4``, ``float8_e4m3fn``, ``nvfp4``, ``mxfp8``. The Linear weights of the blocks whose input width
fits the format are quantized (weight + its scales + ``comfy_quant``); everything else is kept. Prints one JSON
line: per format, the number of quantized layers, or the host's error when it cannot write that format.
"""

import json
import os
import sys

spec = json.load(open(sys.argv[1]))
sys.argv = ["main.py", "--cpu"]
sys.path.insert(0, os.getcwd())

import torch  # noqa: E402
from safetensors.torch import load_file, save_file  # noqa: E402

from comfy.quant_ops import QUANT_ALGOS, QuantizedTensor  # noqa: E402

#: format -> (comfy_quant format, extra JSON, quantize kwargs, input width multiple)
FORMATS = {
    "int8_tensorwise": ("int8_tensorwise", {}, {}, 1),
    "int8_convrot": ("int8_tensorwise", {"convrot": True, "convrot_groupsize": 256},
                     {"convrot": True, "convrot_groupsize": 256, "per_channel": True}, 256),
    "convrot_w4a4": ("convrot_w4a4", {"convrot_groupsize": 256}, {"convrot_groupsize": 256}, 256),
    "float8_e4m3fn": ("float8_e4m3fn", {}, {}, 1),
    "nvfp4": ("nvfp4", {}, {}, 16),
    "mxfp8": ("mxfp8", {}, {}, 32),
}

src = load_file(spec["src"])
report = {}
for name, path in spec["out"].items():
    fmt, conf, kw, multiple = FORMATS[name]
    try:
        layout = QUANT_ALGOS[fmt]["comfy_tensor_layout"]
        out, n = {}, 0
        for k, v in src.items():
            base = k[:-len(".weight")]
            if k.endswith(".weight") and ".blocks." in k and v.ndim == 2 and v.shape[1] % multiple == 0:
                q = QuantizedTensor.from_float(v.float(), layout, **kw)
                out.update({key: t.contiguous() for key, t in q.state_dict(base + ".weight").items()})
                out[base + ".comfy_quant"] = torch.tensor(list(json.dumps({"format": fmt, **conf}).encode()),
                                                          dtype=torch.uint8)
                n += 1
            else:
                out[k] = v
        save_file(out, path)
        report[name] = n
    except Exception as e:  # this host (version, CPU) cannot write the format: reported, the test decides
        report[name] = f"{type(e).__name__}: {e}"
print(json.dumps(report))
