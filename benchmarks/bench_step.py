"""One transformer step (and a whole 8-step Turbo sample), ours against every anchor, on the CPU.

    python benchmarks/bench_step.py [--tokens 1024 4096] [--dtypes float32 bfloat16] [--reps 3]

Anchors, all with the same random weights (``krea2_model.tiny.transformer.CONFIGS['bench']`` unless ``--config``):
diffusers 0.42.1 ``Krea2Transformer2DModel`` fed as its pipeline feeds it (text padded to 512 tokens
+ mask) and unpadded; native ComfyUI Krea 2 (``comfy/ldm/krea2/model.py`` from a host tree found by
``COMFYUI_PATH`` / ``~/comfy/ComfyUI``) with the attention ComfyUI picks for the CPU
(sub-quadratic) and with PyTorch SDPA; and the floor: the GEMMs and attention kernels of one
forward, timed alone. Importing ComfyUI's model needs a few of its dependencies next to this
interpreter's torch; without touching torch they can be put in ``benchmarks/.hostdeps``:

    pip install --no-deps --target benchmarks/.hostdeps psutil einops comfy-aimdo==0.4.13 comfy-kitchen==0.2.31

"ours" is one step for a new conditioning (text stage computed); "ours, cached" one step for a
conditioning seen before (a content-equal new tensor, as ComfyUI passes it). Runs are interleaved;
each run's CPU/wall is recorded and runs under 1.85 are dropped. Appends to benchmarks/RESULTS.md.
"""

from __future__ import annotations

import os
import sys

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import _common  # noqa: E402

_common.pin()

import argparse  # noqa: E402
import statistics  # noqa: E402

import torch  # noqa: E402

from _models import (DiffusersCall, Floor, Native, build_diffusers, build_ours, inputs)  # noqa: E402
from krea2_model import sampling  # noqa: E402
from krea2_model.tiny.transformer import CONFIGS, random_state_dict  # noqa: E402

HOSTDEPS = os.path.join(os.path.dirname(os.path.abspath(__file__)), ".hostdeps")


def rel(a, b):
    return ((a.float() - b.float()).norm() / b.float().norm()).item()


def load_native(args):
    if args.no_native:
        return None, "skipped (--no-native)"
    host = _common.find_comfyui()
    if host is None:
        return None, "no ComfyUI tree with comfy/ldm/krea2 found (set COMFYUI_PATH)"
    if os.path.isdir(HOSTDEPS) and HOSTDEPS not in sys.path:
        sys.path.append(HOSTDEPS)
    try:
        return Native(host, cpu=True), None
    except Exception as e:  # a host whose dependencies are missing here
        return None, f"{host}: cannot import comfy.ldm.krea2.model ({type(e).__name__}: {e})"


def step_cases(cfg, sd, dtype, tokens, native, text_len):
    ours = build_ours(cfg, sd, dtype)
    ours_c = build_ours(cfg, sd, dtype)
    ours.cache_text = False
    dif = build_diffusers(cfg, sd, dtype)
    x, s, c = inputs(cfg, tokens, text_len, dtype)
    dp, du = DiffusersCall(dif, cfg, True), DiffusersCall(dif, cfg, False)
    cases = {
        "ours": lambda: ours(x, s, c),
        "ours, cached text": lambda: ours_c(x, s, c.clone()),
        "diffusers padded 512": lambda: dp(x, s, c),
        "diffusers unpadded": lambda: du(x, s, c),
    }
    checks = {}
    with torch.inference_mode():
        ref = ours(x, s, c)
        checks["ours, cached text"] = rel(ours_c(x, s, c), ref)
        checks["diffusers padded 512"] = rel(dp(x, s, c), ref)
        checks["diffusers unpadded"] = rel(du(x, s, c), ref)
        if native is not None:
            nm = native.build(cfg, sd, dtype)
            nat = native.cases(lambda: nm(x, s, c))
            cases.update(nat)
            for name, run in nat.items():
                checks[name] = rel(run(), ref)
        cases["floor (GEMM + attention kernels)"] = Floor(ours, (x, s, c))
    return cases, checks


def sample_cases(cfg, sd, dtype, tokens, native, text_len, steps=8):
    """A whole Turbo sample (Euler, ``steps`` steps, mu 1.15, cfg 1) as a sampler runs it: the
    conditioning arrives as a new (content-equal) tensor at every step."""
    sig = sampling.sigmas(steps, sampling.TURBO_MU)
    ours = build_ours(cfg, sd, dtype)
    ours_nc = build_ours(cfg, sd, dtype)
    ours_nc.cache_text = False
    dif = build_diffusers(cfg, sd, dtype)
    x0, _, c = inputs(cfg, tokens, text_len, dtype, seed=7)

    def euler(model_call):
        def run():
            x = x0
            for i in range(steps):
                s = sig[i:i + 1].expand(x.shape[0])
                v = model_call(x, s, c.clone())
                x = x + (sig[i + 1] - sig[i]) * v
            return x
        return run

    def ours_sample():
        ours.clear_text_cache()  # every sample starts with a prompt the model has not seen
        return euler(ours)()

    cases = {
        "ours (text cached per prompt)": ours_sample,
        "ours, no text cache": euler(ours_nc),
        "diffusers padded 512": euler(DiffusersCall(dif, cfg, True)),
        "diffusers unpadded": euler(DiffusersCall(dif, cfg, False)),
    }
    checks = {}
    with torch.inference_mode():
        ref = ours_sample()
        checks["ours, no text cache"] = rel(euler(ours_nc)(), ref)
        if native is not None:
            nm = native.build(cfg, sd, dtype)
            nat = native.cases(euler(nm))
            cases.update(nat)
            checks["native ComfyUI, SDPA"] = rel(nat["native ComfyUI, SDPA"](), ref)
    return cases, checks


def cpu_median(runs, name):
    return statistics.median(c for _, c in runs.all[name])


def table(runs, cases, ours_name, floor_name=None, checks=None):
    t_ours = runs.median(ours_name)
    c_ours = cpu_median(runs, ours_name)
    rows = []
    for name in cases:
        t = runs.median(name)
        row = [name, t, len(runs.kept(name)), t / t_ours]
        row.append(f"{checks[name]:.1e}" if checks and name in checks else "")
        row += [cpu_median(runs, name), cpu_median(runs, name) / c_ours]
        row.append(runs.trace(name))
        rows.append(row)
    head = ["case", "median s (kept runs)", "kept", f"time / {ours_name}", "rel. diff vs ours",
            "median CPU s (all runs)", "CPU / ours", "runs: wall s (CPU/wall; x = dropped)"]
    text = _common.fmt_table(head, rows)
    if floor_name:
        text += (f"\n\nours / floor = {t_ours / runs.median(floor_name):.3f} (kept runs), "
                 f"{c_ours / cpu_median(runs, floor_name):.3f} (CPU time, all runs)")
    text += ("\n\nThe CPU-time columns are a fallback for a shared machine: they count every run, so they are "
             "only indicative where too few runs reached CPU/wall 1.85.")
    return text


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--tokens", type=int, nargs="+", default=[1024, 4096])
    ap.add_argument("--dtypes", nargs="+", default=["float32", "bfloat16"])
    ap.add_argument("--reps", type=int, default=3, help="kept runs wanted per case (default 3)")
    ap.add_argument("--max-reps", type=int, default=8, help="rounds at most, when runs are dropped (default 8)")
    ap.add_argument("--config", default="bench", choices=sorted(CONFIGS))
    ap.add_argument("--text-len", type=int, default=40)
    ap.add_argument("--no-native", action="store_true")
    ap.add_argument("--no-step", action="store_true", help="only the whole-sample benchmark")
    ap.add_argument("--sample", nargs="*", default=["float32:1024"],
                    help="dtype:tokens of whole 8-step Turbo samples (default float32:1024; none to skip)")
    ap.add_argument("--no-results", action="store_true", help="do not append to RESULTS.md")
    a = ap.parse_args(argv)

    torch.manual_seed(0)
    cfg = CONFIGS[a.config]
    sd = random_state_dict(cfg, 0)
    native, why = load_native(a)
    if why:
        print("native ComfyUI:", why)
    import diffusers
    extra = {"diffusers": diffusers.__version__,
             "native ComfyUI": (f"{native.version} ({native.host}), CPU default attention {native.default_name}"
                                if native else why),
             "model": f"'{a.config}' config (width {cfg.hidden}, {cfg.heads}/{cfg.kv_heads} heads of {cfg.head_dim}, "
                      f"{cfg.layers} blocks, text width {cfg.text_dim}, {cfg.text_taps} taps), "
                      f"{a.text_len}-token prompt"}
    sections = []
    jobs = [] if a.no_step else [(d, t) for d in a.dtypes for t in a.tokens]
    for dname, tokens in jobs:
        dtype = getattr(torch, dname)
        print(f"\n== step, {dname}, {tokens} image tokens", flush=True)
        cases, checks = step_cases(cfg, sd, dtype, tokens, native, a.text_len)
        runs = _common.Runs()
        with torch.inference_mode():
            _common.interleave(cases, a.reps, runs, min_kept=a.reps, max_reps=a.max_reps)
        txt = table(runs, cases, "ours", "floor (GEMM + attention kernels)", checks)
        print(txt)
        sections.append(f"### step, {dname}, {tokens} image tokens\n\n{txt}")
    for spec in a.sample or []:
        dname, tokens = spec.split(":")
        dtype, tokens = getattr(torch, dname), int(tokens)
        print(f"\n== whole 8-step Turbo sample, {dname}, {tokens} image tokens", flush=True)
        cases, checks = sample_cases(cfg, sd, dtype, tokens, native, a.text_len)
        runs = _common.Runs()
        with torch.inference_mode():
            _common.interleave(cases, a.reps, runs, min_kept=a.reps, max_reps=a.max_reps)
        txt = table(runs, cases, "ours (text cached per prompt)", None, checks)
        print(txt)
        sections.append(f"### whole 8-step Turbo sample, {dname}, {tokens} image tokens\n\n{txt}")
    if sections and not a.no_results:
        _common.append_results("bench_step", "python " + " ".join(["benchmarks/bench_step.py"] + sys.argv[1:]),
                               "\n\n".join(sections), extra)


if __name__ == "__main__":
    main()
