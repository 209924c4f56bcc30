"""Two regional prompts in one forward (Krea2RegionalPrompt) against core's ConditioningSetMask with the same
prompts, both on our MODEL in ComfyUI's own sampler, on the CPU: per-step time, ratio in one run.

    <ComfyUI's python> benchmarks/bench_regional.py --comfy ~/comfy/ComfyUI [--tokens 1024] [--reps 3] [--results]

ConditioningSetMask is what ComfyUI offers today: the sampler runs the model for the base prompt and for each
masked prompt and blends the outputs by mask, so two regions cost three forwards per step (cfg 1). Ours runs one
forward over ``[base text | region texts | image]`` with the regional attention mask. The model is the
Krea-proportioned CPU benchmark model (width 1024, 8 query / 2 KV heads of 128, 4 blocks, 12 taps of 640), loaded
with Krea2ModelLoader's code from a file, fp32; prompts of 40 (base) and 12 + 14 (regions) tokens; masks the left and
right halves. Steps are timed with the sampler's callback (median of the steps of ``--reps`` interleaved samples,
after one warm-up round), in wall and in CPU time; the CPU/wall of every sample is printed, and on a shared
machine (a sample under 1.85) the CPU-time ratio is the figure.
"""

from __future__ import annotations

import os
import sys

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import _common  # noqa: E402

_common.pin()

import argparse  # noqa: E402
import statistics  # noqa: E402
import tempfile  # noqa: E402
import time  # noqa: E402


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--comfy", default=os.environ.get("COMFYUI_PATH", os.path.expanduser("~/comfy/ComfyUI")))
    ap.add_argument("--tokens", type=int, default=1024)
    ap.add_argument("--steps", type=int, default=4)
    ap.add_argument("--reps", type=int, default=3)
    ap.add_argument("--results", action="store_true", help="append to benchmarks/RESULTS.md")
    a = ap.parse_args()
    command = "python benchmarks/bench_regional.py " + " ".join(sys.argv[1:])
    sys.argv = ["main.py", "--cpu"]
    os.chdir(a.comfy)
    sys.path.insert(0, a.comfy)
    sys.path.insert(0, os.path.dirname(_common.ROOT))
    import comfy.options
    comfy.options.enable_args_parsing()
    import importlib
    import torch
    torch.set_grad_enabled(False)
    import comfy.sample
    pack = os.path.basename(_common.ROOT)
    cm = importlib.import_module(pack + ".nodes.host.model")
    regions_mod = importlib.import_module(pack + ".krea2_model.model.regions")
    tiny = importlib.import_module(pack + ".krea2_model.tiny.transformer")
    cfg = tiny.CONFIGS["bench"]
    path = tiny.write(tiny.random_state_dict(cfg, 0), os.path.join(tempfile.mkdtemp(), "krea2_bench.safetensors"),
                      "comfy")
    model = cm.load_model(path, "default")
    side = int(round(a.tokens ** 0.5)) * 2  # latent side: 2 latent pixels per token
    g = torch.Generator().manual_seed(0)
    width = cfg.text_taps * cfg.text_dim
    base, r1, r2 = (torch.randn(1, n, width, generator=g) for n in (40, 12, 14))
    left = torch.zeros(side * 8, side * 8)
    left[:, : side * 4] = 1.0
    right = 1.0 - left
    regions = regions_mod.RegionalPrompts([regions_mod.make_region(r1, left, "region_1", width),
                                           regions_mod.make_region(r2, right, "region_2", width)])
    cases = {
        "regional, one forward": [[base, {"krea2_regions": regions}]],
        "ConditioningSetMask x2": [[base, {}], [r1, {"mask": left[None], "set_area_to_bounds": False,
                                                     "mask_strength": 1.0}],
                                   [r2, {"mask": right[None], "set_area_to_bounds": False, "mask_strength": 1.0}]],
    }
    latent = torch.zeros(1, 16, 1, side, side)
    noise = torch.randn(latent.shape, generator=g)
    wall = {k: [] for k in cases}
    cpu = {k: [] for k in cases}
    ratios = {k: [] for k in cases}
    for rep in range(a.reps + 1):  # the first round warms up
        for name, pos in cases.items():
            t = []
            c0, w0 = time.process_time(), time.perf_counter()
            comfy.sample.sample(model, noise, a.steps, 1.0, "euler", "simple", pos, [[torch.zeros_like(base), {}]],
                                latent, seed=1,
                                callback=lambda *_: t.append((time.perf_counter(), time.process_time())))
            if rep:
                ratios[name].append((time.process_time() - c0) / (time.perf_counter() - w0))
                wall[name] += [b[0] - x[0] for x, b in zip(t, t[1:])]
                cpu[name] += [b[1] - x[1] for x, b in zip(t, t[1:])]
    med_w = {k: statistics.median(v) for k, v in wall.items()}
    med_c = {k: statistics.median(v) for k, v in cpu.items()}
    quiet = all(r >= _common.MIN_CPU_RATIO for v in ratios.values() for r in v)
    one, masked = "regional, one forward", "ConditioningSetMask x2"
    lines = [f"| {k} | {med_w[k] * 1000:.0f} ms | {med_c[k] * 1000:.0f} ms | "
             f"{', '.join(f'{r:.2f}' for r in ratios[k])} |" for k in cases]
    txt = ("| case (our MODEL, ComfyUI's sampler, cfg 1) | median step, wall | median step, CPU time | "
           "CPU/wall per sample |\n|---|---|---|---|\n" + "\n".join(lines) +
           f"\n\nConditioningSetMask / regional per step: **{med_c[masked] / med_c[one]:.2f}x in CPU time**, "
           f"{med_w[masked] / med_w[one]:.2f}x wall ({a.tokens} image tokens, bench model fp32, CPU; "
           + ("every sample at CPU/wall >= 1.85" if quiet else
              "a shared machine: some samples under CPU/wall 1.85, so the CPU-time ratio is the figure") + ")")
    print(txt)
    if a.results:
        _common.append_results("bench_regional", command, txt, {"tokens": a.tokens})


if __name__ == "__main__":
    main()
