"""What the host hooks cost: the plain step with the hooks in place against the transformer before them,
and a step with one reference image, ours against native ComfyUI Krea 2, on the CPU; ratios in one run.

    python benchmarks/bench_hooks.py [--tokens 1024] [--dtype float32] [--reps 3] [--before REV]

"before" is ``krea2_model`` as of git revision ``--before`` (default 44dfa26, the last commit without the
hooks), extracted to a temporary folder and imported under another package name, with the same weights.
The reference case is a target of ``--tokens`` image tokens plus one reference of as many
(``index_timestep_zero``, the style-reference method, and ``index``); native runs under ComfyUI's default
attention for the CPU and under its PyTorch SDPA (``COMFYUI_PATH`` / ``~/comfy/ComfyUI``; see bench_step.py
for the dependencies it needs beside this interpreter's torch). Runs are interleaved, CPU/wall recorded,
runs under 1.85 dropped. ``--results`` appends to RESULTS.md.
"""

from __future__ import annotations

import os
import sys

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import _common  # noqa: E402

_common.pin()

import argparse  # noqa: E402
import importlib  # noqa: E402
import subprocess  # noqa: E402
import tempfile  # noqa: E402

import torch  # noqa: E402

from _models import Native, build_ours, inputs  # noqa: E402
from bench_step import HOSTDEPS, cpu_median, rel  # noqa: E402
from krea2_model.tiny.transformer import CONFIGS, random_state_dict  # noqa: E402


def load_before(rev: str):
    """``krea2_model`` at ``rev`` as package ``krea2_before`` (its imports are relative, so a new name works)."""
    d = tempfile.mkdtemp(prefix="krea2-before-")
    tar = subprocess.run(["git", "-C", _common.ROOT, "archive", rev, "krea2_model"], capture_output=True, check=True)
    subprocess.run(["tar", "-x", "-C", d], input=tar.stdout, check=True)
    os.rename(os.path.join(d, "krea2_model"), os.path.join(d, "krea2_before"))
    sys.path.insert(0, d)
    return importlib.import_module("krea2_before")


def build(cls, cfg, sd, dtype):
    with torch.device("meta"):
        m = cls(cfg, dtype=dtype)
    m.load_state_dict({k: (v.float() if k.endswith(".scale") else v.to(dtype)) for k, v in sd.items()}, assign=True)
    return m.eval()


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--tokens", type=int, default=1024)
    ap.add_argument("--dtype", default="float32")
    ap.add_argument("--reps", type=int, default=3)
    ap.add_argument("--max-reps", type=int, default=8)
    ap.add_argument("--before", default="44dfa26")
    ap.add_argument("--text-len", type=int, default=40)
    ap.add_argument("--results", action="store_true", help="append to RESULTS.md")
    a = ap.parse_args(argv)

    cfg = CONFIGS["bench"]
    sd = random_state_dict(cfg, 0)
    dtype = getattr(torch, a.dtype)
    before_pkg = load_before(a.before)
    before_cfg = before_pkg.Krea2Config(**cfg.to_dict())
    now, before = build_ours(cfg, sd, dtype), build(before_pkg.Krea2Transformer, before_cfg, sd, dtype)
    x, s, c = inputs(cfg, a.tokens, a.text_len, dtype)
    ref = inputs(cfg, a.tokens, a.text_len, dtype, seed=2)[0]
    with_ref = dict(ref_latents=[ref], ref_latents_method="index_timestep_zero")
    cases = {
        "ours, plain step (hooks in place)": lambda: now(x, s, c.clone()),
        f"ours before the hooks ({a.before})": lambda: before(x, s, c.clone()),
        "ours, 1 reference, index_timestep_zero": lambda: now(x, s, c.clone(), **with_ref),
        "ours, 1 reference, index": lambda: now(x, s, c.clone(), ref_latents=[ref], ref_latents_method="index"),
    }
    checks = {}
    native = None
    host = _common.find_comfyui()
    if host is not None:
        if os.path.isdir(HOSTDEPS) and HOSTDEPS not in sys.path:
            sys.path.append(HOSTDEPS)
        try:
            native = Native(host, cpu=True)
        except Exception as e:
            print(f"native ComfyUI: cannot import from {host} ({type(e).__name__}: {e})")
    with torch.inference_mode():
        base = now(x, s, c)
        checks[f"ours before the hooks ({a.before})"] = rel(before(x, s, c), base)
        want = now(x, s, c, **with_ref)
        if native is not None:
            nm = native.build(cfg, sd, dtype)
            for name, run in native.cases(lambda: nm(x, s, c, **with_ref)).items():
                label = name.replace("native ComfyUI", "native, 1 reference, index_timestep_zero")
                cases[label] = run
                checks[label] = rel(run(), want)
        runs = _common.Runs()
        _common.interleave(cases, a.reps, runs, min_kept=a.reps, max_reps=a.max_reps)

    def row(name, against):
        t, t0 = runs.median(name), runs.median(against)
        return [name, t, len(runs.kept(name)), t / t0, f"{checks[name]:.1e}" if name in checks else "",
                cpu_median(runs, name) / cpu_median(runs, against), runs.trace(name)]

    plain, ref_ours = "ours, plain step (hooks in place)", "ours, 1 reference, index_timestep_zero"
    rows = [row(n, plain) for n in list(cases)[:2]] + [row(n, ref_ours) for n in list(cases)[2:]]
    head = ["case", "median s (kept runs)", "kept", "time / first row of its group", "rel. diff",
            "CPU / first row of its group", "runs: wall s (CPU/wall; x = dropped)"]
    txt = _common.fmt_table(head, rows)
    txt += (f"\n\nplain step: hooks in place / before = {runs.median(plain) / runs.median(list(cases)[1]):.3f}"
            f" (kept runs); a step with one reference of {a.tokens} tokens on {a.tokens} target tokens: "
            + ", ".join(f"{n} / ours = {runs.median(n) / runs.median(ref_ours):.3f}" for n in list(cases)[4:]))
    print(txt)
    if a.results:
        _common.append_results("bench_hooks", "python " + " ".join(["benchmarks/bench_hooks.py"] + sys.argv[1:]),
                               f"### {a.dtype}, {a.tokens} image tokens (+ {a.tokens} reference)\n\n{txt}",
                               {"model": f"'bench' config, {a.text_len}-token prompt",
                                "native ComfyUI": native.version if native else "not found"})


if __name__ == "__main__":
    main()
