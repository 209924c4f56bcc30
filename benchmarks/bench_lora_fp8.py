"""Memory of LoRA patching on fp8 weights through ComfyUI: peak RSS while patching against the fp8 model.

    <ComfyUI python> benchmarks/bench_lora_fp8.py [--comfy DIR] [--hidden 2048 --layers 8 --rank 32] [--reps 1]

Requirement measured (a measurement, not a test): on fp8 weights, a LoRA applied through
Krea2LoraLoader keeps the peak memory while patching under 1.1x the fp8 model.

Writes a random Krea 2 transformer (bf16 file) and a random LoRA (``comfy`` style, rank ``--rank``) on
every Linear weight of every block, then runs each case in a fresh subprocess of the host python with
ComfyUI imported in-process on the CPU device (``--cpu``), the model loaded by ``nodes.host.model.load_model``
with ``weight_dtype="fp8_e4m3fn"``:

* ``none``: ``load_models_gpu`` of an unpatched clone (control: what loading alone costs);
* ``ours``: what ``Krea2LoraLoader`` does: ``nodes.host.lora.apply_lora`` (``ModelPatcher.add_patches``) +
  ``comfy.model_management.load_models_gpu``; our model's ``Krea2ModelPatcher`` sees load device == offload
  device and applies the patched Linear weights at cast time (ComfyUI's ``LowVramPatch`` on the module, no
  backup, weights untouched); then ``unload_all_models``;
* ``core``: the same patches on ComfyUI's plain ``ModelPatcher`` (what any other model gets, and what this
  pack did before): ``patch_weight_to_device`` writes a patched fp8 weight per key and keeps the original
  in ``patcher.backup``; then ``unload_all_models``;
* ``onthefly``: the same patches on the plain ``ModelPatcher`` loaded through ComfyUI's low-VRAM path
  (``patch_model(lowvram_model_memory=1, force_patch_weights=False)``); then ``unpatch_model``;
* ``ours_x2`` / ``core_x2``: LoRA stacking, the same LoRA applied twice at strength 0.5, whose output is
  compared with the same path applied once at 1.0.

The forward pass after patching runs at ``--latent`` x ``--latent`` latent pixels (``(latent/2)^2`` image
tokens) and is timed: the cast-time path recomputes each LoRA product on every call, the patch-and-backup
path pays nothing per call.

Memory: the child runs with ``MALLOC_MMAP_THRESHOLD_=65536`` (unless ``--glibc-default``) so freed tensors
go back to the OS and RSS follows live memory. The peak of a phase is taken after resetting the kernel's
high-water mark (``/proc/self/clear_refs`` = 5), as ``max(ru_maxrss, VmHWM, 2 ms statm samples)``.
``baseline`` = RSS after the imports. ``ratio`` = (peak while patching - baseline) / fp8 model bytes, where
the fp8 model bytes are the sum of the transformer's parameter bytes (what 1.0x is); ``extra`` = (peak while
patching - RSS before patching) / fp8 model bytes. Every parameter is checked bit for bit after unpatching
(sha256 of its bytes, taken before patching), and the forward output of each patched model is compared with the ``core`` one.
Appends a dated section to benchmarks/RESULTS.md.
"""

from __future__ import annotations

import os
import sys

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import _common  # noqa: E402

_common.pin()

import argparse  # noqa: E402
import hashlib  # noqa: E402
import importlib  # noqa: E402
import json  # noqa: E402
import resource  # noqa: E402
import subprocess  # noqa: E402
import tempfile  # noqa: E402
import threading  # noqa: E402
import time  # noqa: E402

CASES = ("none", "ours", "core", "onthefly", "ours_x2", "core_x2")
PAGE = os.sysconf("SC_PAGE_SIZE")


def bench_config(hidden: int, layers: int):
    from krea2_model.model.transformer import Krea2Config
    return Krea2Config(hidden=hidden, heads=hidden // 128, kv_heads=max(1, hidden // 512), head_dim=128,
                       mlp_hidden=hidden * 8 // 3 // 128 * 128, layers=layers, text_dim=640, text_taps=12,
                       text_heads=5, text_kv_heads=5, text_mlp_hidden=1792)


# ----------------------------------------------------------------------------------------------- memory

def rss() -> int:
    """Current resident bytes (statm field 2)."""
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * PAGE


def hwm() -> int:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) * 1024
    return 0


def maxrss() -> int:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


def reset_peak() -> bool:
    """Reset the kernel's peak RSS to the current RSS (ru_maxrss and VmHWM follow it); False if refused."""
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
        return True
    except OSError:
        return False


class Sampler:
    """Samples the current RSS every ``period`` seconds in a thread (torch ops release the GIL)."""

    def __init__(self, period=0.002):
        self.period, self.top, self._stop = period, 0, False
        self._t = threading.Thread(target=self._run, daemon=True)
        self._t.start()

    def _run(self):
        while not self._stop:
            r = rss()
            if r > self.top:
                self.top = r
            time.sleep(self.period)

    def mark(self):
        self.top = rss()

    def stop(self):
        self._stop = True
        self._t.join()


class Phase:
    """Peak RSS over a ``with`` block (after resetting the high-water mark) and its wall / CPU time."""

    def __init__(self, sampler):
        self.s = sampler

    def __enter__(self):
        self.reset = reset_peak()
        self.before = rss()
        self.s.mark()
        self.c0, self.w0 = time.process_time(), time.perf_counter()
        return self

    def __exit__(self, *exc):
        self.wall, self.cpu = time.perf_counter() - self.w0, time.process_time() - self.c0
        self.after = rss()
        self.peak = max(self.s.top, self.after, hwm() if self.reset else 0, maxrss() if self.reset else 0)
        return False


# ------------------------------------------------------------------------------------------------ child

def child(a):
    """One case in this (fresh) process; prints one JSON line."""
    sys.argv = [sys.argv[0], "--cpu"]
    sys.path.insert(0, a.comfy)
    sys.path.insert(0, os.path.dirname(a.pack))
    import comfy.options
    comfy.options.enable_args_parsing()
    import torch
    import comfy.model_management as mm
    import comfy.model_patcher as mp

    pack = importlib.import_module(os.path.basename(a.pack))
    res_pack = pack.__file__
    cm = importlib.import_module(pack.__name__ + ".nodes.host.model")
    cl = importlib.import_module(pack.__name__ + ".nodes.host.lora")
    torch.set_grad_enabled(False)

    def plain(m):
        """The same patcher on ComfyUI's ordinary ModelPatcher (patch-and-backup on load)."""
        m.__class__ = mp.ModelPatcher
        return m

    sampler = Sampler()
    base = rss()
    res = {"case": a.child, "baseline": base, "maxrss_at_baseline": maxrss(), "comfyui": _comfy_version(a.comfy), "pack": res_pack}
    patcher = cm.load_model(a.model, "fp8_e4m3fn")
    dm = patcher.model.diffusion_model
    params = dict(dm.named_parameters())
    res["model_bytes"] = sum(p.numel() * p.element_size() for p in params.values())
    res["dtypes"] = sorted({str(p.dtype) for p in params.values()})
    res["linear_fp8_bytes"] = sum(p.numel() for p in params.values() if p.dtype == torch.float8_e4m3fn)
    res["compute_dtype"] = str(patcher.model.manual_cast_dtype)

    def digests():
        """sha256 of every parameter's bytes (no copy of the model is kept, so the check costs no RSS)."""
        out = {}
        for k, p in dm.named_parameters():
            t = p.detach().contiguous()
            out[k] = (str(t.dtype), tuple(t.shape), hashlib.sha256(t.view(torch.uint8).numpy().tobytes()).hexdigest())
        return out

    saved = digests()
    g = torch.Generator().manual_seed(0)
    x = torch.randn(1, dm.config.channels, a.latent, a.latent, generator=g)
    ctx = torch.randn(1, 16, dm.config.text_taps * dm.config.text_dim, generator=g)
    sigma = torch.tensor([0.6])

    def forward():
        return dm(x, sigma, ctx).float()

    out_base = forward()
    res["after_load"] = rss()

    m = None
    with Phase(sampler) as ph:
        if a.child == "none":
            m = patcher.clone()
            mm.load_models_gpu([m])
        elif a.child == "ours":
            m, rep = cl.apply_lora(patcher, a.lora, 1.0)
            mm.load_models_gpu([m])
        elif a.child == "core":
            m = plain(cl.apply_lora(patcher, a.lora, 1.0)[0])
            mm.load_models_gpu([m])
        elif a.child == "onthefly":
            m = plain(cl.apply_lora(patcher, a.lora, 1.0)[0])
            m.patch_model(device_to=torch.device("cpu"), lowvram_model_memory=1, force_patch_weights=False)
        elif a.child == "ours_x2":  # stacking: the same LoRA twice at 0.5 (= once at 1.0)
            m, _ = cl.apply_lora(patcher, a.lora, 0.5)
            m, _ = cl.apply_lora(m, a.lora, 0.5)
            mm.load_models_gpu([m])
        elif a.child == "core_x2":
            m = plain(cl.apply_lora(cl.apply_lora(patcher, a.lora, 0.5)[0], a.lora, 0.5)[0])
            mm.load_models_gpu([m])
    res.update(before_patch=ph.before, peak_patch=ph.peak, after_patch=ph.after, patch_wall=ph.wall,
               patch_cpu=ph.cpu, reset_ok=ph.reset)
    res["backup_keys"] = len(m.backup)
    res["backup_bytes"] = sum(b.weight.numel() * b.weight.element_size() for b in m.backup.values())
    res["lowvram_patches"] = sum(1 for mod in dm.modules() for f in getattr(mod, "weight_function", [])
                                 if isinstance(f, mp.LowVramPatch))
    res["patcher"] = type(m).__name__
    res["patched_keys"] = len(m.patches)
    res["patched_bytes"] = sum(params[k[len("diffusion_model."):]].numel() *
                               params[k[len("diffusion_model."):]].element_size() for k in m.patches)
    with Phase(sampler) as fw:
        out = forward()
    res.update(peak_forward=fw.peak, forward_wall=fw.wall, forward_cpu=fw.cpu)
    walls = []
    for _ in range(3):  # the first call above paid the one-time costs; the best of 3 more is the per-call cost
        t0 = time.perf_counter()
        forward()
        walls.append(time.perf_counter() - t0)
    res["forward2_wall"] = min(walls)
    res["lora_effect"] = ((out - out_base).norm() / out_base.norm()).item()

    with Phase(sampler) as up:
        if a.child == "onthefly":
            m.unpatch_model(device_to=torch.device("cpu"))
        else:
            mm.unload_all_models()
    res.update(peak_unpatch=up.peak, after_unpatch=up.after)
    res["restored_bitexact"] = digests() == saved
    res["restored_output_equal"] = bool(torch.equal(forward(), out_base))
    res["stale_weight_functions"] = sum(1 for mod in dm.modules() if len(getattr(mod, "weight_function", [])) > 0)
    sampler.stop()
    if a.child == "none":  # yardstick: the fp8 storage error of the unpatched model (bf16 weights vs fp8)
        del m, patcher, dm, params
        mm.unload_all_models()
        dm = cm.load_model(a.model, "default").model.diffusion_model
        out16 = forward()
        res["fp8_error"] = ((out_base - out16).norm() / out16.norm()).item()
    torch.save(out, os.path.join(a.tmp, f"out_{a.child}.pt"))
    print(json.dumps(res))


def _comfy_version(path):
    try:
        ns = {}
        with open(os.path.join(path, "comfyui_version.py")) as f:
            exec(f.read(), ns)
        return ns.get("__version__", "?")
    except OSError:
        return "?"


# ----------------------------------------------------------------------------------------------- parent

def write_lora(cfg, sd, path, rank, rel=0.1, seed=1):
    """A ``comfy``-style LoRA on every 2-D weight of every block; each update's std is ``rel`` x the
    weight's std (random factors, fan-in scaled down factor)."""
    import torch
    from safetensors.torch import save_file

    g = torch.Generator().manual_seed(seed)
    out = {}
    for k, w in sd.items():
        if not (k.startswith("blocks.") and k.endswith(".weight") and w.ndim == 2):
            continue
        o, i = w.shape
        down = torch.randn(rank, i, generator=g) / i ** 0.5
        up = torch.randn(o, rank, generator=g) * (rel * w.float().std().item() * (i / rank) ** 0.5)
        mod = k[: -len(".weight")]
        out[f"diffusion_model.{mod}.lora_A.weight"] = down.to(torch.bfloat16).contiguous()
        out[f"diffusion_model.{mod}.lora_B.weight"] = up.to(torch.bfloat16).contiguous()
    save_file(out, path, metadata={"format": "pt"})
    return len(out) // 2


def run_child(a, case, model, lora, tmp):
    env = dict(os.environ)
    if not a.glibc_default:
        env["MALLOC_MMAP_THRESHOLD_"] = "65536"
    cmd = [sys.executable, os.path.abspath(__file__), "--child", case, "--comfy", a.comfy, "--model", model,
           "--lora", lora, "--tmp", tmp, "--pack", a.pack, "--latent", str(a.latent)]
    res = subprocess.run(cmd, capture_output=True, text=True, timeout=1800, env=env)
    if res.returncode != 0:
        raise RuntimeError(f"case {case} failed:\n{res.stdout[-2000:]}\n{res.stderr[-4000:]}")
    return json.loads(res.stdout.strip().splitlines()[-1])


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--comfy", default=os.environ.get("COMFYUI_PATH") or _common.find_comfyui(),
                    help="ComfyUI source folder (run with its python)")
    ap.add_argument("--hidden", type=int, default=2048)
    ap.add_argument("--layers", type=int, default=8)
    ap.add_argument("--rank", type=int, default=32)
    ap.add_argument("--latent", type=int, default=32, help="latent side of the timed forward pass (tokens = (latent/2)^2)")
    ap.add_argument("--reps", type=int, default=1, help="runs of every case (fresh process each)")
    ap.add_argument("--cases", default=",".join(CASES))
    ap.add_argument("--dir", default=None, help="where to write the files (default: a temporary folder)")
    ap.add_argument("--glibc-default", action="store_true", help="leave glibc's mmap threshold alone")
    ap.add_argument("--no-results", action="store_true")
    ap.add_argument("--pack", default=_common.ROOT,
                    help="the pack folder the children import (default: this checkout; e.g. a `git archive` "
                         "export of a commit, when others edit the worktree)")
    ap.add_argument("--child", choices=CASES, help=argparse.SUPPRESS)
    ap.add_argument("--model", help=argparse.SUPPRESS)
    ap.add_argument("--lora", help=argparse.SUPPRESS)
    ap.add_argument("--tmp", help=argparse.SUPPRESS)
    ap.add_argument("--write-files", nargs=5, help=argparse.SUPPRESS)
    a = ap.parse_args(argv)
    if not a.comfy or not os.path.isfile(os.path.join(a.comfy, "comfy", "model_patcher.py")):
        sys.exit("give --comfy (or COMFYUI_PATH): a ComfyUI source folder, and run with its python")
    if a.child:
        return child(a)
    if a.write_files:
        hidden, layers, rank, model, lora = a.write_files
        import torch
        from krea2_model.tiny import transformer as tiny
        cfg = bench_config(int(hidden), int(layers))
        sd = tiny.random_state_dict(cfg, 0, torch.bfloat16)
        tiny.write(sd, model, "comfy")
        print(f"  LoRA on {write_lora(cfg, sd, lora, int(rank))} block weights", flush=True)
        return

    import torch

    cfg = bench_config(a.hidden, a.layers)
    tmp = a.dir or tempfile.mkdtemp(prefix="krea2-lora-fp8-")
    os.makedirs(tmp, exist_ok=True)
    model = os.path.join(tmp, f"krea2_h{a.hidden}_l{a.layers}_bf16.safetensors")
    lora = os.path.join(tmp, f"lora_h{a.hidden}_l{a.layers}_r{a.rank}.safetensors")
    if not (os.path.exists(model) and os.path.exists(lora)):
        # in a subprocess: a child's ru_maxrss starts at the spawning parent's high-water mark (the kernel
        # carries it over at exec), so the parent must never hold the weights
        print(f"writing {model} and {lora}", flush=True)
        subprocess.run([sys.executable, os.path.abspath(__file__), "--write-files", str(a.hidden), str(a.layers),
                        str(a.rank), model, lora], check=True)
    cases = [c for c in a.cases.split(",") if c]
    runs = {c: [] for c in cases}
    for r in range(a.reps):
        for c in cases:
            res = run_child(a, c, model, lora, tmp)
            runs[c].append(res)
            mb = res["model_bytes"]
            print(f"  [{r}] {c:<9} ratio {(res['peak_patch'] - res['baseline']) / mb:.3f} "
                  f"extra {(res['peak_patch'] - res['before_patch']) / mb:.3f} patch {res['patch_wall']:.2f}s "
                  f"restored {res['restored_bitexact']}", flush=True)

    outs = {c: torch.load(os.path.join(tmp, f"out_{c}.pt")) for c in cases}
    ref = outs.get("core")
    GiB = 2 ** 30
    rows = []
    fw_core = min(x["forward2_wall"] for x in runs["core"]) if "core" in runs else None
    for c in cases:
        rs = runs[c]
        worst = max(rs, key=lambda x: x["peak_patch"] - x["baseline"])
        mb = worst["model_bytes"]
        r0 = outs.get(c[:-3]) if c.endswith("_x2") else ref
        vs_std = ((outs[c] - r0).norm() / r0.norm()).item() if r0 is not None else float("nan")
        rows.append([c, worst["patcher"], f"{mb / GiB:.3f}", f"{(worst['after_load'] - worst['baseline']) / GiB:.3f}",
                     f"{(worst['peak_patch'] - worst['baseline']) / GiB:.3f}",
                     f"{(worst['peak_patch'] - worst['baseline']) / mb:.3f}",
                     f"{(worst['peak_patch'] - worst['before_patch']) / mb:.3f}",
                     f"{(worst['after_patch'] - worst['before_patch']) / mb:.3f}",
                     f"{worst['backup_bytes'] / GiB:.3f}",
                     f"{(worst['peak_forward'] - worst['before_patch']) / mb:.3f}",
                     " ".join(f"{x['patch_wall']:.2f}({x['patch_cpu'] / max(x['patch_wall'], 1e-9):.2f})" for x in rs),
                     " ".join(f"{x['forward2_wall']:.2f}" for x in rs),
                     f"{min(x['forward2_wall'] for x in rs) / fw_core:.3f}" if fw_core else "-",
                     f"{worst['lora_effect']:.4f}", f"{vs_std:.2e}",
                     "yes" if all(x["restored_bitexact"] for x in rs) else "NO",
                     "yes" if all(x["restored_output_equal"] for x in rs) else
                     f"no ({max(x['stale_weight_functions'] for x in rs)} stale weight_function)"])
    head = ["case", "patcher", "fp8 model GiB", "RSS after load - baseline GiB", "peak patching - baseline GiB",
            "ratio (peak - baseline) / model", "extra peak / model", "kept after patch / model", "backup GiB",
            "forward peak above pre-patch / model", "patch s (CPU/wall)", "forward s (best of 3 after the 1st)", "forward / core", "LoRA effect (rel)",
            "rel diff vs core (x2: vs the same path once)", "weights bit-exact after unpatch", "output = unpatched after unpatch"]
    w = runs[cases[0]][0]
    txt = _common.fmt_table(head, rows)
    fp8_err = [x["fp8_error"] for x in runs.get("none", []) if "fp8_error" in x]
    if fp8_err:
        txt += (f"\n\nYardstick for 'rel diff vs core': the unpatched model's output with fp8 weights differs "
                f"from the same model with bf16 weights by {fp8_err[0]:.2e} (relative); the core path rounds "
                f"each patched weight to fp8 again (stochastic rounding), the cast-time paths (ours, onthefly) add "
                f"the update to the float32 compute copy.")
    txt += (f"\n\nRandom Krea 2 transformer hidden {cfg.hidden}, {cfg.layers} blocks, mlp {cfg.mlp_hidden}, "
            f"bf16 file {os.path.getsize(model) / GiB:.3f} GiB loaded with weight_dtype fp8_e4m3fn "
            f"(parameters {', '.join(w['dtypes'])}; compute dtype {w['compute_dtype']}); LoRA rank {a.rank} on every "
            f"2-D weight of every block ({max(x[0]['patched_keys'] for x in runs.values())} keys), update std 0.1x the weight's; forward at a {a.latent}x{a.latent} latent ({(a.latent // 2) ** 2} image tokens). Fresh process per case on the CPU device "
            f"(ComfyUI {w['comfyui']}, --cpu); MALLOC_MMAP_THRESHOLD_="
            f"{'default' if a.glibc_default else '65536'}. Peak = max(ru_maxrss, VmHWM, 2 ms statm samples) after "
            f"resetting the high-water mark (clear_refs 5: {'ok' if w['reset_ok'] else 'refused'}).")
    print(txt)
    if not a.no_results:
        _common.append_results("bench_lora_fp8", "python " + " ".join(["benchmarks/bench_lora_fp8.py"] + sys.argv[1:]),
                               txt, {"ComfyUI": w["comfyui"]})
    if not a.dir:
        for f in os.listdir(tmp):
            os.remove(os.path.join(tmp, f))
        os.rmdir(tmp)


if __name__ == "__main__":
    main()
