"""Offloading is real: the Turbo sampling loop on a model larger than the VRAM budget given to
ComfyUI completes through partial loading and matches the fully loaded result.

Run with a ComfyUI host's python on a machine with a GPU (one prepared call; see the device notes):

    python scripts/gpu_offload_check.py --comfy /path/to/ComfyUI [--hidden 3072 --layers 12 --budget-gb 3]
    python scripts/gpu_offload_check.py --comfy /path/to/ComfyUI --cpu-dry-run   # plumbing only, no GPU

It builds a random Krea 2 transformer (bf16 file in a temp dir), loads it with the pack's
Krea2ModelLoader code path, samples 8 Turbo steps (cfg 1, euler/simple, Krea2ModelSampling) fully
loaded, then again with ComfyUI told to reserve all VRAM but ``--budget-gb`` (what --reserve-vram
does), and prints one JSON line: model size, budget, whether the second load was partial (weights
left on the CPU), peak GPU memory of each run, and the relative difference of the two latents.
Exit status 0 only if the partial run was partial and the latents agree to 1e-3 (bf16).
"""

import argparse
import importlib
import json
import os
import sys
import tempfile
import time

HERE = os.path.dirname(os.path.abspath(__file__))
PACK = os.path.dirname(HERE)


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--comfy", default=os.environ.get("COMFYUI_PATH"), help="ComfyUI source folder")
    ap.add_argument("--hidden", type=int, default=3072)
    ap.add_argument("--layers", type=int, default=12)
    ap.add_argument("--budget-gb", type=float, default=3.0, help="VRAM left to ComfyUI for the partial run")
    ap.add_argument("--size", type=int, default=1024, help="image side in pixels")
    ap.add_argument("--cpu-dry-run", action="store_true", help="check the plumbing on a CPU (no partial load)")
    a = ap.parse_args()
    if not a.comfy or not os.path.isfile(os.path.join(a.comfy, "comfy", "model_management.py")):
        sys.exit("give --comfy (or COMFYUI_PATH): a ComfyUI source folder")

    sys.argv = [sys.argv[0]] + (["--cpu"] if a.cpu_dry_run else [])
    sys.path.insert(0, a.comfy)
    sys.path.insert(0, os.path.dirname(PACK))
    import comfy.options
    comfy.options.enable_args_parsing()
    import torch
    import comfy.model_management as mm
    import comfy.sample

    pack = importlib.import_module(os.path.basename(PACK))
    cm = importlib.import_module(pack.__name__ + ".nodes.host.model")
    cs = importlib.import_module(pack.__name__ + ".nodes.host.sampling")
    tiny = importlib.import_module(pack.__name__ + ".krea2_model.tiny.transformer")
    Krea2Config = importlib.import_module(pack.__name__ + ".krea2_model.model.transformer").Krea2Config

    cfg = Krea2Config(hidden=a.hidden, heads=a.hidden // 128, kv_heads=max(1, a.hidden // 512), head_dim=128,
                      mlp_hidden=a.hidden * 8 // 3 // 128 * 128, layers=a.layers, text_dim=640, text_taps=12,
                      text_heads=5, text_kv_heads=5, text_mlp_hidden=1792)
    tmp = tempfile.mkdtemp(prefix="krea2-offload-")
    path = tiny.write(tiny.random_state_dict(cfg, 0, torch.bfloat16), os.path.join(tmp, "big.safetensors"), "comfy")
    model_bytes = os.path.getsize(path)

    dev = mm.get_torch_device()
    g = torch.Generator().manual_seed(0)
    cond = [[torch.randn(1, 40, cfg.text_taps * cfg.text_dim, generator=g), {}]]
    neg = [[torch.zeros_like(cond[0][0]), {}]]
    latent = torch.zeros(1, 16, 1, a.size // 8, a.size // 8)
    noise = torch.randn(latent.shape, generator=torch.Generator().manual_seed(1))

    def sample(tag):
        patcher = cm.load_model(path, "default")
        patcher, _ = cs.patch_model_sampling(patcher, "turbo", a.size, a.size)
        if dev.type == "cuda":
            torch.cuda.reset_peak_memory_stats()
        t0 = time.time()
        out = comfy.sample.sample(patcher, noise, 8, 1.0, "euler", "simple", cond, neg, latent, denoise=1.0,
                                  disable_pbar=True, seed=1)
        info = {"seconds": round(time.time() - t0, 2),
                "loaded_bytes": int(patcher.loaded_size()) if hasattr(patcher, "loaded_size") else None,
                "peak_gpu_bytes": int(torch.cuda.max_memory_allocated()) if dev.type == "cuda" else None}
        mm.unload_all_models()
        mm.soft_empty_cache()
        return out.float().cpu(), info

    full, full_info = sample("full")
    if dev.type == "cuda":
        total = mm.get_total_memory(dev)
        mm.EXTRA_RESERVED_VRAM = max(0, int(total - a.budget_gb * 1024 ** 3))  # what --reserve-vram sets
    part, part_info = sample("partial")
    diff = ((part - full).norm() / full.norm()).item()
    partial = part_info["loaded_bytes"] is not None and part_info["loaded_bytes"] < 0.9 * model_bytes
    res = {"device": str(torch.cuda.get_device_name(0)) if dev.type == "cuda" else "cpu", "model_bytes": model_bytes,
           "budget_bytes": int(a.budget_gb * 1024 ** 3), "full": full_info, "partial": part_info,
           "partial_load": partial, "rel_diff": diff}
    print(json.dumps(res))
    ok = diff <= 1e-3 and (partial or a.cpu_dry_run)
    sys.exit(0 if ok else 1)


if __name__ == "__main__":
    main()
