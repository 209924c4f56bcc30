"""Shared plumbing of the benchmarks: thread pinning, interleaved timing, the results file.

Import this module before ``torch``: :func:`pin` re-executes the script with
``OMP_PROC_BIND=spread OMP_PLACES=cores`` when they are not set, because this VM often packs both
torch threads onto one core (unpinned timings were off by up to 2.7x). Every run records its
CPU time / wall time; runs under :data:`MIN_CPU_RATIO` are dropped (a thread was descheduled).
"""

from __future__ import annotations

import datetime
import os
import platform
import statistics
import subprocess
import sys
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
RESULTS = os.path.join(ROOT, "benchmarks", "RESULTS.md")
PIN_ENV = {"OMP_PROC_BIND": "spread", "OMP_PLACES": "cores"}


def pin() -> None:
    """Re-exec the current script with the OpenMP pinning variables set, unless already set."""
    if all(os.environ.get(k) == v for k, v in PIN_ENV.items()):
        return
    if "torch" in sys.modules:
        raise RuntimeError("benchmarks._common.pin() must run before torch is imported")
    env = dict(os.environ, **PIN_ENV)
    os.execve(sys.executable, [sys.executable] + sys.argv, env)


if ROOT not in sys.path:
    sys.path.insert(0, ROOT)

#: threads torch uses (all cores) and the CPU/wall a run must reach to count
THREADS = os.cpu_count() or 1
MIN_CPU_RATIO = 1.85 if THREADS >= 2 else 0.9


def timed(fn):
    """``(wall_s, cpu_s)`` of one call of ``fn`` (CPU time of the whole process, all threads)."""
    c0, w0 = time.process_time(), time.perf_counter()
    fn()
    w1, c1 = time.perf_counter(), time.process_time()
    return w1 - w0, c1 - c0


class Runs:
    """Per-case lists of ``(wall, cpu)``; kept runs are those with cpu/wall >= MIN_CPU_RATIO."""

    def __init__(self, min_ratio: float = MIN_CPU_RATIO):
        self.min_ratio = min_ratio
        self.all: dict[str, list[tuple[float, float]]] = {}

    def add(self, name, wall, cpu):
        self.all.setdefault(name, []).append((wall, cpu))

    def kept(self, name):
        return [w for w, c in self.all.get(name, []) if w > 0 and c / w >= self.min_ratio]

    def median(self, name):
        k = self.kept(name)
        return statistics.median(k) if k else float("nan")

    def trace(self, name) -> str:
        """Every run as ``wall(cpu/wall)``, dropped ones marked with ``x``."""
        parts = []
        for w, c in self.all.get(name, []):
            r = c / w if w > 0 else 0.0
            parts.append(f"{w:.3f}({r:.2f}{'' if r >= self.min_ratio else 'x'})")
        return " ".join(parts)


def interleave(cases: dict, reps: int, runs: Runs, warmup: int = 1, verbose=True, min_kept: int = 0,
               max_reps: int = 0):
    """Run every case ``warmup`` times, then ``reps`` rounds of all cases in turn (interleaved, so a
    slow phase of the machine hits every case alike). With ``min_kept``, extra rounds (up to
    ``max_reps`` in all) are run while some case has fewer kept runs than that."""
    for _ in range(warmup):
        for fn in cases.values():
            fn()
    r = 0
    limit = max(reps, max_reps)
    while r < limit:
        if r >= reps and all(len(runs.kept(n)) >= min_kept for n in cases):
            break
        for name, fn in cases.items():
            w, c = timed(fn)
            runs.add(name, w, c)
            if verbose:
                print(f"  [{r}] {name:<28} {w:8.3f}s  cpu/wall {c / w:4.2f}", flush=True)
        r += 1


def cpu_name() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown CPU"


def mem_gib() -> float:
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemTotal"):
                    return int(line.split()[1]) / 2 ** 20
    except OSError:
        pass
    return float("nan")


def git_rev() -> str:
    try:
        return subprocess.run(["git", "-C", ROOT, "rev-parse", "--short", "HEAD"], capture_output=True, text=True,
                              timeout=10).stdout.strip() or "?"
    except Exception:
        return "?"


def machine_line(extra: dict | None = None) -> str:
    import torch

    parts = [f"{datetime.datetime.now(datetime.timezone.utc):%Y-%m-%d %H:%M UTC}",
             f"{cpu_name()} x{THREADS} threads, {mem_gib():.0f} GiB",
             f"python {platform.python_version()}", f"torch {torch.__version__}",
             f"OMP_PROC_BIND={os.environ.get('OMP_PROC_BIND')} OMP_PLACES={os.environ.get('OMP_PLACES')}",
             f"pack {git_rev()}"]
    for k, v in (extra or {}).items():
        parts.append(f"{k} {v}")
    return "; ".join(parts)


def fmt_table(header: list[str], rows: list[list]) -> str:
    def cell(v):
        if isinstance(v, float):
            return f"{v:.3f}" if abs(v) < 100 else f"{v:.1f}"
        return str(v)
    out = ["| " + " | ".join(header) + " |", "|" + "|".join("---" for _ in header) + "|"]
    out += ["| " + " | ".join(cell(v) for v in r) + " |" for r in rows]
    return "\n".join(out)


def append_results(title: str, command: str, body: str, extra: dict | None = None) -> None:
    text = (f"\n## {title}\n\n`{command}`\n\n{machine_line(extra)}\n\n{body.rstrip()}\n")
    with open(RESULTS, "a") as f:
        f.write(text)
    print(text)


def find_comfyui() -> str | None:
    """A ComfyUI source tree: ``COMFYUI_PATH``; else the pack's grandparent when it sits in
    ``ComfyUI/custom_nodes``; else ``~/comfy/ComfyUI``."""
    cands = [os.environ.get("COMFYUI_PATH"),
             os.path.dirname(os.path.dirname(ROOT)) if os.path.basename(os.path.dirname(ROOT)) == "custom_nodes"
             else None,
             os.path.expanduser("~/comfy/ComfyUI")]
    for c in cands:
        if c and os.path.isfile(os.path.join(c, "comfy", "ldm", "krea2", "model.py")):
            return c
    return None
