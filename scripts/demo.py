"""Try Krea 2 in a real, headless ComfyUI without the 40 GB download.

    .venv/bin/python scripts/demo.py [--workflow krea2_turbo_text_to_image] [--size 256] [--comfy PATH]

Generates tiny random models under the example workflows' file names (transformer, Qwen3-VL text
encoder, VAE, LoRA), starts ComfyUI headless with this pack (host discovery as the test tier:
--comfy, COMFYUI_PATH, the pack's grandparent, ~/comfy/ComfyUI), posts the API-format example
workflow to /prompt and prints where the image was saved. Random weights draw noise-like images;
the point is the whole graph running: loaders, encoder, sampling schedule, KSampler, VAE, save.
"""

import argparse
import json
import os
import shutil
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

from krea2_model.tiny.comfy_server import ComfyHost, find_host  # noqa: E402
from krea2_model.tiny.host_assets import make_assets  # noqa: E402


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--workflow", default="krea2_turbo_text_to_image",
                    help="an example in example_workflows/api (without .json)")
    ap.add_argument("--size", type=int, default=256, help="image side in pixels (the examples say 1024)")
    ap.add_argument("--comfy", default=None, help="ComfyUI folder (default: discovered)")
    ap.add_argument("--out", default=os.path.join(ROOT, "demo-output"), help="where to copy the image")
    a = ap.parse_args()
    comfy = a.comfy or find_host()
    if comfy is None:
        sys.exit("no ComfyUI found: pass --comfy or set COMFYUI_PATH (see scripts/make_host.sh to set one up)")
    wf = json.load(open(os.path.join(ROOT, "example_workflows", "api", a.workflow + ".json")))
    for n in wf.values():
        if n["class_type"] in ("EmptySD3LatentImage", "Krea2ModelSampling"):
            n["inputs"]["width"] = n["inputs"]["height"] = a.size
    with ComfyHost(comfy) as host:
        print(f"ComfyUI {host.version} started at {host.url}; writing tiny models ...", flush=True)
        make_assets(str(host.models_dir), host.python, str(host.comfy_dir))
        print("running", a.workflow, "...", flush=True)
        hist = host.run(wf, timeout=1800)
        images = host.outputs(hist, "images")
        os.makedirs(a.out, exist_ok=True)
        for p in images:
            dst = os.path.join(a.out, os.path.basename(str(p)))
            shutil.copy(p, dst)
            print("saved", dst)


if __name__ == "__main__":
    main()
