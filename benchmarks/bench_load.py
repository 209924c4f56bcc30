"""Loading a full-width Krea 2 checkpoint: time and peak RSS against the file size and the bytes kept.

    python benchmarks/bench_load.py [--blocks 2] [--reps 3] [--dir DIR]

Writes a synthetic checkpoint of the full model's width (hidden 6144, text 2560, every tensor of
Krea 2 except that only ``--blocks`` of the 28 blocks are present) as bf16 and as fp8 safetensors,
then loads it with ``krea2_model.load_transformer`` in a fresh subprocess per run (peak RSS =
the high-water RSS at the end minus the RSS after the imports: ``VmHWM`` after resetting it with
``/proc/self/clear_refs``, since ``ru_maxrss`` starts a child at its parent's peak; ``ru_maxrss``
where /proc is missing), cases interleaved:

* bf16 file kept as bf16;
* bf16 file kept as fp8 storage (``dtype=float8_e4m3fn, operations=krea2_model.model.ops.CastOps``);
* fp8 file kept as fp8 storage;
* for comparison, bf16 -> fp8 as the loader did before issue 6 (each tensor through safetensors'
  memory map, then cast), whose touched file pages count in the process's RSS.

A same-dtype load on the CPU keeps safetensors' memory map (zero copy, file-backed pages that
arrive on first use), so each run also reports the peak after every weight has been read once.

Loading is a single-threaded read/copy, so CPU/wall is recorded for every run but not used to
drop runs (the 1.85 rule of the compute benchmarks would drop them all). Appends to RESULTS.md.
"""

from __future__ import annotations

import os
import sys

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import _common  # noqa: E402

_common.pin()

import argparse  # noqa: E402
import dataclasses  # noqa: E402
import json  # noqa: E402
import statistics  # noqa: E402
import subprocess  # noqa: E402
import tempfile  # noqa: E402

CHILD = r"""
import json, resource, sys, time
sys.path.insert(0, {root!r})
import torch
import krea2_model
from krea2_model.model.ops import CastOps
def status_kb(field):
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(field + ":"):
                return int(line.split()[1])
    return None
# ru_maxrss survives fork+exec (it starts at the parent's peak), so on Linux reset the high-water
# mark of this address space (clear_refs 5) and measure VmHWM from the RSS after the imports.
try:
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")
    base, hwm = status_kb("VmRSS"), True
except OSError:
    base, hwm = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss, False
c0, w0 = time.process_time(), time.perf_counter()
kw = {kw}
if kw.pop("cast_ops", False):
    kw["operations"] = CastOps
if "dtype" in kw:
    kw["dtype"] = getattr(torch, kw["dtype"])
src = {path!r}
if kw.pop("mmap", False):  # the previous loader: tensors through safetensors' memory map
    from krea2_model.formats.safetensors_io import open_source
    src = open_source(src)
    src._reader = None
m = krea2_model.load_transformer(src, **kw)
w1, c1 = time.perf_counter(), time.process_time()
peak = status_kb("VmHWM") if hwm else resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
# memory-mapped weights come in on first use: touch every weight, as a first step would
for t in m.state_dict().values():
    t.view(-1)[::512].float().sum()
    t.view(torch.uint8).max()
peak_used = status_kb("VmHWM") if hwm else resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
kept = sum(t.numel() * t.element_size() for t in m.state_dict().values())
dtypes = sorted({{str(t.dtype) for t in m.state_dict().values()}})
print(json.dumps(dict(wall=w1 - w0, cpu=c1 - c0, peak=(peak - base) * 1024, peak_used=(peak_used - base) * 1024,
                      kept=kept, dtypes=dtypes)))
"""


def write_checkpoint(path, cfg, dtype, seed=0):
    """Canonical random weights for ``cfg`` in ``dtype``, generated tensor by tensor."""
    import torch
    from safetensors.torch import save_file

    from krea2_model.formats.transformer_file import expected_shapes

    g = torch.Generator().manual_seed(seed)
    tile = (torch.randn(2 ** 20, generator=g) * 0.02).to(dtype)  # values only need to be finite and varied
    out = {}
    for k, shape in expected_shapes(cfg).items():
        t = torch.empty(shape, dtype=dtype)
        flat = t.view(-1)
        for i in range(0, flat.numel(), tile.numel()):
            n = min(tile.numel(), flat.numel() - i)
            flat[i:i + n].copy_(tile[:n])
        out[k] = t
    save_file(out, path, metadata={"format": "pt"})
    del out


def run_child(path, kw):
    code = CHILD.format(root=_common.ROOT, path=path, kw=repr(kw))
    res = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=1800)
    if res.returncode != 0:
        raise RuntimeError(f"load failed ({kw}):\n{res.stderr[-3000:]}")
    return json.loads(res.stdout.strip().splitlines()[-1])


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--blocks", type=int, default=2, help="transformer blocks in the synthetic file (default 2)")
    ap.add_argument("--reps", type=int, default=3)
    ap.add_argument("--dir", default=None, help="where to write the files (default: a temporary folder)")
    ap.add_argument("--keep", action="store_true", help="keep the files")
    ap.add_argument("--no-results", action="store_true")
    a = ap.parse_args(argv)

    import torch

    from krea2_model.tiny.transformer import CONFIGS

    cfg = dataclasses.replace(CONFIGS["full"], layers=a.blocks)
    tmp = a.dir or tempfile.mkdtemp(prefix="krea2-load-")
    os.makedirs(tmp, exist_ok=True)
    files = {"bf16": os.path.join(tmp, f"krea2_w6144_{a.blocks}blocks_bf16.safetensors"),
             "fp8": os.path.join(tmp, f"krea2_w6144_{a.blocks}blocks_fp8.safetensors")}
    for name, dt in (("bf16", torch.bfloat16), ("fp8", torch.float8_e4m3fn)):
        if not os.path.exists(files[name]):
            print(f"writing {files[name]}", flush=True)
            write_checkpoint(files[name], cfg, dt)
    sizes = {k: os.path.getsize(v) for k, v in files.items()}
    cases = {
        "bf16 file -> bf16": (files["bf16"], {"dtype": "bfloat16"}),
        "bf16 file -> fp8 storage": (files["bf16"], {"dtype": "float8_e4m3fn", "cast_ops": True}),
        "fp8 file -> fp8 storage": (files["fp8"], {"dtype": "float8_e4m3fn", "cast_ops": True}),
        "before: bf16 -> fp8 via mmap": (files["bf16"], {"dtype": "float8_e4m3fn", "cast_ops": True, "mmap": True}),
    }
    results = {k: [] for k in cases}
    for r in range(a.reps):
        for name, (path, kw) in cases.items():
            res = run_child(path, dict(kw))
            results[name].append(res)
            print(f"  [{r}] {name:<26} {res['wall']:7.2f}s cpu/wall {res['cpu'] / res['wall']:.2f} "
                  f"peak {res['peak'] / 2**30:.2f} GiB kept {res['kept'] / 2**30:.2f} GiB", flush=True)
    rows = []
    for name, (path, kw) in cases.items():
        rs = results[name]
        size = os.path.getsize(path)
        peak = max(x["peak"] for x in rs)
        used = max(x["peak_used"] for x in rs)
        kept = rs[0]["kept"]
        rows.append([name, f"{size / 2**30:.3f}", f"{kept / 2**30:.3f}", f"{peak / 2**30:.3f}", peak / kept,
                     peak / size, f"{used / 2**30:.3f}", used / kept, statistics.median(x["wall"] for x in rs),
                     " ".join(f"{x['wall']:.2f}({x['cpu'] / x['wall']:.2f})" for x in rs)])
    head = ["case", "file GiB", "kept GiB", "peak RSS GiB, load", "load peak / kept", "load peak / file",
            "peak RSS GiB, weights touched", "touched peak / kept", "median load s", "runs: wall s (CPU/wall)"]
    txt = _common.fmt_table(head, rows)
    txt += (f"\n\nSynthetic file: full width (hidden {cfg.hidden}, text {cfg.text_dim}, mlp {cfg.mlp_hidden}), "
            f"{a.blocks} of 28 blocks; peak RSS = high-water RSS minus RSS after imports (VmHWM reset via "
            "clear_refs), fresh process per run, max over runs; 'load' = right after load_transformer, "
            "'weights touched' = after reading every weight once (memory-mapped bf16 pages arrive on first use).")
    print(txt)
    if not a.no_results:
        _common.append_results("bench_load", "python " + " ".join(["benchmarks/bench_load.py"] + sys.argv[1:]),
                               txt, {"files": f"{sizes['bf16'] / 2**30:.2f} GiB bf16, {sizes['fp8'] / 2**30:.2f} GiB fp8"})
    if not a.keep and not a.dir:
        for f in files.values():
            os.remove(f)
        os.rmdir(tmp)


if __name__ == "__main__":
    main()
