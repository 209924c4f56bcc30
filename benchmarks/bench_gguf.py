"""GGUF on the CPU: dequantization throughput per type, peak RSS loading a Q4_K file against its size, and the
step time of GGUF Q8_0 / Q4_K models against the same model in bf16.

    python benchmarks/bench_gguf.py [--tokens 1024,4096] [--reps 3] [--rss-blocks 1] [--skip dequant,rss,step]

* **dequant**: one ``(4096, 4096)`` weight per type, dequantized by ``krea2_model.formats.gguf_dequant`` to
  bf16 (as a layer does at cast time); GB/s of bf16 weights produced and of GGUF bytes read. Blocks are
  quantized by the gguf package where it can, random valid blocks otherwise (the generator's method).
* **rss**: a full-width Krea 2 transformer (hidden 6144, text 2560, every tensor, ``--rss-blocks`` of the 28
  blocks) written as Q4_K (rows that do not fit 256 in Q8_0 / F32), loaded with ``load_transformer`` in a
  fresh process; peak RSS (VmHWM after resetting it, minus the RSS after the imports) right after the load,
  after every packed weight has been read once, and after one bf16 forward at 256 image tokens (which
  dequantizes each layer's weight once); each divided by the file size.
* **step**: the Krea-proportioned ``bench`` model (docs/architecture.md) at ``--tokens`` image tokens and a 40-token
  prompt, bf16 compute: the bf16 model vs GGUF Q8_0 and Q4_K files of the same shapes (Q4_K where rows fit
  256, else Q8_0), interleaved runs; runs under CPU/wall 1.85 are dropped.

Appends one section to RESULTS.md (``--no-results``: print only).
"""

from __future__ import annotations

import os
import sys

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import _common  # noqa: E402

_common.pin()

import argparse  # noqa: E402
import json  # noqa: E402
import statistics  # noqa: E402
import subprocess  # noqa: E402
import tempfile  # noqa: E402
import time  # noqa: E402

import numpy as np  # noqa: E402
import torch  # noqa: E402

from krea2_model import Krea2Config, load_transformer  # noqa: E402
from krea2_model.formats.gguf_dequant import QTYPES, dequantize  # noqa: E402
from krea2_model.formats.transformer_file import expected_shapes  # noqa: E402
from krea2_model.tiny import gguf as tiny_gguf  # noqa: E402
from krea2_model.tiny.transformer import CONFIGS, random_state_dict  # noqa: E402

import _models  # noqa: E402


def _blocks_for(qtype: str, rows: int, cols: int, rng) -> np.ndarray:
    t = torch.randn(rows, cols, generator=torch.Generator().manual_seed(0)) / cols ** 0.5
    arr, _, used = tiny_gguf.encode_tensor(t, qtype, rng)
    assert used == qtype
    return np.ascontiguousarray(arr).view(np.uint8)


def bench_dequant(reps: int) -> str:
    rng = np.random.default_rng(0)
    rows, cols = 4096, 4096
    raws = {q: torch.from_numpy(_blocks_for(q, rows, cols, rng)).reshape(-1) for q in QTYPES}
    runs = _common.Runs(min_ratio=0.0)
    cases = {q: (lambda q=q: dequantize(raws[q], q, (rows, cols), torch.bfloat16)) for q in QTYPES}
    _common.interleave(cases, reps, runs, verbose=False)
    out = []
    for q in QTYPES:
        walls = [w for w, _ in runs.all[q]]
        ratios = [c / w for w, c in runs.all[q]]
        t = statistics.median(walls)
        out.append([q, f"{raws[q].numel() / (rows * cols):.4f}", f"{t * 1e3:.1f}", f"{rows * cols * 2 / t / 1e9:.2f}",
                    f"{raws[q].numel() / t / 1e9:.2f}", f"{statistics.median(ratios):.2f}"])
    return ("### dequantization, one 4096 x 4096 weight to bf16\n\n" +
            _common.fmt_table(["type", "bytes / weight", "median ms", "GB/s bf16 out", "GB/s GGUF in",
                               "CPU/wall"], out) +
            f"\n\nMedian of {reps} runs per type, interleaved; all runs kept (elementwise work: CPU/wall is recorded, "
            "not used to drop runs).\n")


def _write_full_width_q4k(path: str, blocks: int) -> dict:
    """Every tensor of a full-width Krea 2 with ``blocks`` blocks, Linear rows as random valid Q4_K blocks
    (Q8_0 / F32 where rows do not fit), written without ever building float weights."""
    import gguf
    cfg = Krea2Config(layers=blocks)
    rng = np.random.default_rng(0)
    w = gguf.GGUFWriter(path, "krea2")
    kinds = {}
    for k, shape in expected_shapes(cfg).items():
        if len(shape) == 2 and shape[1] % 256 == 0 and not k.endswith(".scale"):
            q = "Q4_K"
            arr = tiny_gguf.random_blocks(shape[0], shape[1], q, 2.0 / shape[1] ** 0.5, rng)
        elif len(shape) == 2 and shape[1] % 32 == 0:
            q = "Q8_0"
            arr = _blocks_for(q, shape[0], shape[1], rng).reshape(shape[0], -1)
        else:
            q = "F32"
            arr = (rng.standard_normal(shape) * 0.05).astype(np.float32)
        w.add_tensor(k, arr, raw_dtype=None if q == "F32" else gguf.GGMLQuantizationType[q])
        kinds[q] = kinds.get(q, 0) + 1
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return kinds


RSS_CHILD = r"""
import json, sys, time
sys.path.insert(0, {root!r})
import torch
import krea2_model
def status_kb(field):
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(field + ":"):
                return int(line.split()[1])
with open("/proc/self/clear_refs", "w") as f:
    f.write("5")
base = status_kb("VmRSS")
t0 = time.perf_counter()
m = krea2_model.load_transformer({path!r})
load_s = time.perf_counter() - t0
peak_load = status_kb("VmHWM")
for p in m.parameters():
    p.view(torch.uint8).max()
peak_touched = status_kb("VmHWM")
cfg = m.config
g = torch.Generator().manual_seed(0)
x = torch.randn(1, cfg.channels, 32, 32, generator=g).bfloat16()
ctx = torch.randn(1, 40, cfg.text_taps * cfg.text_dim, generator=g).bfloat16()
with torch.no_grad():
    v = m(x, torch.tensor([0.7]), ctx)
peak_forward = status_kb("VmHWM")
held = sum(p.numel() * p.element_size() for p in m.parameters())
print(json.dumps(dict(load_s=load_s, peak_load=(peak_load - base) * 1024, peak_touched=(peak_touched - base) * 1024,
                      peak_forward=(peak_forward - base) * 1024, held=held, finite=bool(torch.isfinite(v).all()))))
"""


def bench_rss(blocks: int, reps: int, work: str) -> str:
    path = os.path.join(work, f"krea2_full_width_{blocks}b_Q4_K.gguf")
    kinds = _write_full_width_q4k(path, blocks)
    size = os.path.getsize(path)
    results = []
    for _ in range(reps):
        r = subprocess.run([sys.executable, "-c", RSS_CHILD.format(root=_common.ROOT, path=path)],
                           capture_output=True, text=True, timeout=1800)
        if r.returncode != 0:
            raise RuntimeError(r.stderr[-3000:])
        results.append(json.loads(r.stdout.strip().splitlines()[-1]))
    worst = {k: max(x[k] for x in results) for k in ("peak_load", "peak_touched", "peak_forward")}
    gib = lambda b: f"{b / 2 ** 30:.3f}"  # noqa: E731
    rows = [["right after load_transformer", gib(worst["peak_load"]), f"{worst['peak_load'] / size:.3f}"],
            ["every packed weight read once", gib(worst["peak_touched"]), f"{worst['peak_touched'] / size:.3f}"],
            ["after one bf16 forward (256 image tokens)", gib(worst["peak_forward"]),
             f"{worst['peak_forward'] / size:.3f}"]]
    params = sum(int(torch.Size(s).numel()) for s in expected_shapes(Krea2Config(layers=blocks)).values())
    return (f"### peak RSS loading a Q4_K file\n\nFull-width Krea 2 with {blocks} of 28 blocks: {params / 1e9:.2f} B "
            f"parameters, file {gib(size)} GiB (tensors: {kinds}); the same weights in bf16 would be "
            f"{params * 2 / 2 ** 30:.2f} GiB. Load time median "
            f"{statistics.median(x['load_s'] for x in results):.2f} s; parameters held "
            f"{gib(results[0]['held'])} GiB.\n\n" +
            _common.fmt_table(["point", "peak RSS GiB (max of runs)", "peak / file size"], rows) +
            f"\n\n{reps} fresh processes; peak RSS = VmHWM (reset via clear_refs after the imports) minus the RSS "
            "after the imports. Packed weights are file-backed pages of the memory-mapped GGUF.\n")


def _gguf_of(sd: dict, path: str, kind: str) -> None:
    def pick(name):
        shape = tuple(sd[name].shape)
        if len(shape) != 2 or name.endswith(".scale"):
            return "F32"
        if kind == "Q4_K" and shape[1] % 256 == 0:
            return "Q4_K"
        return "Q8_0" if shape[1] % 32 == 0 else "F32"
    tiny_gguf.write_gguf(sd, path, "krea2", pick)


def bench_step(tokens: int, reps: int, work: str) -> str:
    cfg = CONFIGS["bench"]
    sd = random_state_dict(cfg, 0)
    models = {"bf16": _models.build_ours(cfg, sd, torch.bfloat16)}
    for kind in ("Q8_0", "Q4_K"):
        p = os.path.join(work, f"bench_{kind}.gguf")
        _gguf_of(sd, p, kind)
        models[f"GGUF {kind}"] = load_transformer(p)
    sizes = {f"GGUF {k}": os.path.getsize(os.path.join(work, f"bench_{k}.gguf")) for k in ("Q8_0", "Q4_K")}
    x, sigma, ctx = _models.inputs(cfg, tokens, 40, torch.bfloat16)
    outs = {}

    def case(name):
        def run():
            with torch.no_grad():
                outs[name] = models[name](x, sigma, ctx)
        return run
    runs = _common.Runs()
    _common.interleave({n: case(n) for n in models}, reps, runs, min_kept=2, max_reps=reps + 3)
    base = runs.median("bf16")
    cpu = {n: statistics.median(c for _, c in runs.all[n]) for n in models}
    rows = []
    for n in models:
        d = ((outs[n].float() - outs["bf16"].float()).norm() / outs["bf16"].float().norm()).item()
        rows.append([n, runs.median(n), len(runs.kept(n)), runs.median(n) / base, cpu[n], cpu[n] / cpu["bf16"],
                     f"{d:.1e}" if n == "GGUF Q8_0" else "", f"{sizes[n] / 2 ** 20:.1f}" if n in sizes else
                     f"{sum(p.numel() * p.element_size() for p in models[n].parameters()) / 2 ** 20:.1f}",
                     runs.trace(n)])
    return (f"### step, bf16 compute, {tokens} image tokens, 40-token prompt ('bench' model)\n\n" +
            _common.fmt_table(["case", "median s (kept)", "kept", "time / bf16", "median CPU s (all runs)",
                               "CPU / bf16", "rel. diff vs bf16", "weights MiB",
                               "runs: wall s (CPU/wall; x = dropped)"], rows) +
            "\n\nThe Q4_K file keeps Q8_0 for rows that do not fit 256 (text width 640, latent 64) and F32 for norms "
            "and tables; its Q4_K rows are random valid blocks (the gguf package cannot quantize K types), so only its "
            "time compares with bf16. Q8_0 is quantized from the bf16 model's weights: its relative difference is "
            "the quantization error. The CPU-time columns count every run (a fallback when the machine is shared "
            "and runs fall under CPU/wall 1.85).\n")


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--tokens", default="1024", help="image tokens of the step case, comma-separated (1024,4096)")
    ap.add_argument("--reps", type=int, default=3)
    ap.add_argument("--rss-blocks", type=int, default=1)
    ap.add_argument("--skip", default="", help="comma-separated: dequant, rss, step")
    ap.add_argument("--no-results", action="store_true")
    a = ap.parse_args(argv)
    skip = set(filter(None, a.skip.split(",")))
    torch.set_num_threads(_common.THREADS)
    parts = []
    with tempfile.TemporaryDirectory() as work:
        if "dequant" not in skip:
            parts.append(bench_dequant(max(a.reps, 5)))
            print(parts[-1], flush=True)
        if "rss" not in skip:
            parts.append(bench_rss(a.rss_blocks, a.reps, work))
            print(parts[-1], flush=True)
        if "step" not in skip:
            for tokens in (int(t) for t in a.tokens.split(",")):
                parts.append(bench_step(tokens, a.reps, work))
                print(parts[-1], flush=True)
    if not a.no_results:
        import importlib.metadata
        _common.append_results("bench_gguf", "python " + " ".join(["benchmarks/bench_gguf.py"] + sys.argv[1:]),
                               "\n".join(parts), {"gguf": importlib.metadata.version("gguf")})


if __name__ == "__main__":
    main()
