"""RMSNorm on the CPU: ``F.rms_norm`` against our four-pass form of its own steps (``krea2_model.model.layers``),
at Krea 2's shapes: the block norm over ``(1, 4096 + 512, 6144)`` and the q/k norm over ``(1, 48, 4608, 128)``,
float32, eager inference. Both give the same bits (unit-tested); this is only their speed.

    .venv/bin/python benchmarks/bench_rmsnorm.py [--repeats 15]

Prints the medians and the ratio (F.rms_norm time / ours); the runs alternate so machine noise hits both.
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch
import torch.nn.functional as F


def four_pass(x, w, eps):
    r = x.square().mean(-1, keepdim=True).add_(eps).rsqrt_()
    return torch.mul(x, r).mul_(w)


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--repeats", type=int, default=15)
    args = ap.parse_args(argv)
    torch.manual_seed(0)
    with torch.inference_mode():
        for name, shape in (("block norm", (1, 4608, 6144)), ("q/k norm", (1, 48, 4608, 128))):
            x = torch.randn(shape)
            w = torch.randn(shape[-1]) * 0.1 + 1.0
            assert torch.equal(four_pass(x, w, 1e-5), F.rms_norm(x, (shape[-1],), weight=w, eps=1e-5))
            times = {"F.rms_norm": [], "four passes": []}
            fns = {"F.rms_norm": lambda: F.rms_norm(x, (shape[-1],), weight=w, eps=1e-5),
                   "four passes": lambda: four_pass(x, w, 1e-5)}
            for fn in fns.values():
                fn()  # warm-up
            for _ in range(args.repeats):
                for k, fn in fns.items():
                    t = time.perf_counter()
                    fn()
                    times[k].append(time.perf_counter() - t)
            med = {k: statistics.median(v) for k, v in times.items()}
            print(f"{name} {tuple(shape)}: F.rms_norm {med['F.rms_norm'] * 1e3:.1f} ms, four passes "
                  f"{med['four passes'] * 1e3:.1f} ms: F.rms_norm takes {med['F.rms_norm'] / med['four passes']:.2f}x "
                  f"(torch {torch.__version__}, {torch.get_num_threads()} threads)")


if __name__ == "__main__":
    main()
