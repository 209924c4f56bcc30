"""The one GPU check: full-size Krea 2 in a real ComfyUI on CUDA, our MODEL against native's, case by case.

    python benchmarks/gpu_check.py --comfy /path/to/ComfyUI [--budget 420] [--results benchmarks/RESULTS.md]
    python benchmarks/gpu_check.py --tiny [--comfy DIR]          # the same code path on the CPU (unit tier)

One prepared call for a lent GPU (an H200: under 8 minutes). Random full-size weights (hidden 6144, 28 blocks,
12.9B parameters; Qwen3-VL-4B with its vision tower) are written once as files, then every case runs in a fresh
process that starts ComfyUI the way ``main.py`` does with that case's command-line flags (dynamic VRAM with
comfy-aimdo where the flags leave it on), loads the same file through core's loader and through ours, and
samples 1024 x 1024 (4096 image tokens), cfg 1, euler / simple. Per case: whether the outputs agree (relative
difference of the final latents), the per-step time ratio ours / native (median step, after a warm-up sample),
and the peak GPU memory of each side (``torch.cuda.max_memory_reserved``, plus the device's used memory read
with ``torch.cuda.mem_get_info`` at every step, which sees what aimdo maps outside torch's allocator).

Cases, in this order, as many as ``--budget`` seconds allow (the rest are marked "not reached"):

1. ``default_bf16``: ComfyUI's default flags (dynamic VRAM on), bf16. Also: our attention function alone at full
   size with ``torch.nn.attention.sdpa_kernel`` restricted to the flash and memory-efficient kernels, without a
   mask, with a key mask, with a regional mask, and the text tower's causal calls in bf16 and float32
   (grouped-query attention with a mask is where PyTorch falls back to its math kernel);
2. ``fp8_e4m3fn_fast``: ``weight_dtype=fp8_e4m3fn_fast`` on both loaders;
3. ``disable_dynamic_vram``: ``--disable-dynamic-vram`` (the legacy ModelPatcher);
4. ``lowvram``: ``--lowvram`` with ``--reserve-vram`` leaving less than the model, so both offload;
5. ``gguf_q8_0`` / ``gguf_q4_k``: our GGUF loader (native reads no GGUF): Q8_0 made from the same weights (agreement
   against our bf16 MODEL), Q4_K as random blocks (time only); times against native's bf16 step;
6. ``text_encoder``: our text encoder with one image, and TextGenerate (greedy, 32 tokens), against core's
   CLIPLoader type krea2 on the same file;
7. ``lora``: a rank-64 LoRA through core's LoraLoaderModelOnly path on both MODELs.

The table goes to stdout, to ``--json`` if given, and is appended to ``--results`` with the GPU's name.
``--tiny`` runs every case on the CPU with small native-compatible sizes (``--cpu`` added to every case, so
dynamic VRAM cannot start): it checks the script, not the GPU; its table is never appended to RESULTS.md
unless ``--results`` is given. Needs a ComfyUI host (``--comfy``, ``COMFYUI_PATH``, or the tests' discovery);
without one only our side runs and every native column says why.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time

HERE = os.path.dirname(os.path.abspath(__file__))
PACK = os.path.dirname(HERE)

#: (case, ComfyUI flags, options); "RESERVE" is replaced by a --reserve-vram that leaves less than the model
CASES = [
    ("default_bf16", [], {"attention_check": True}),
    ("fp8_e4m3fn_fast", [], {"weight_dtype": "fp8_e4m3fn_fast"}),
    ("disable_dynamic_vram", ["--disable-dynamic-vram"], {}),
    ("lowvram", ["--lowvram", "--reserve-vram", "RESERVE"], {}),
    ("gguf_q8_0", [], {"gguf": "Q8_0"}),
    ("gguf_q4_k", [], {"gguf": "Q4_K"}),
    ("text_encoder", [], {"text": True}),
    ("lora", [], {"lora": True}),
]


# ----------------------------------------------------------------------------------------------- assets

def _configs(tiny: bool):
    from krea2_model import Krea2Config
    from krea2_model.text.qwen3 import Qwen3TextConfig
    if not tiny:
        return Krea2Config(), Qwen3TextConfig()
    # native ComfyUI derives its sizes from a few shapes (head 128, 20 text heads, 256-wide time embedding)
    return (Krea2Config(hidden=256, heads=2, kv_heads=1, head_dim=128, mlp_hidden=768, layers=2, time_dim=256,
                        text_dim=160, text_taps=12, text_heads=20, text_kv_heads=20, text_head_dim=8,
                        text_mlp_hidden=512),
            Qwen3TextConfig(hidden=160, layers=36, heads=2, kv_heads=1, head_dim=80, mlp_hidden=64, vocab=151936))


def _q8_0(w):
    """``w (rows, cols)`` as GGUF Q8_0 bytes: per 32 values an fp16 scale ``max|x| / 127``, then 32 int8."""
    import torch
    rows, cols = w.shape
    x = w.float().reshape(-1, 32)
    d = x.abs().amax(dim=1, keepdim=True) / 127.0
    q = torch.where(d > 0, x / d.clamp_min(1e-30), torch.zeros_like(x)).round().clamp(-127, 127).to(torch.int8)
    return torch.cat([d.half().view(torch.uint8), q.view(torch.uint8)], dim=1).reshape(rows, cols // 32 * 34)


def _write_gguf(path, sd, qtype, seed):
    """Krea 2 GGUF (original names): Linear weights in ``qtype`` (Q8_0 from ``sd``; Q4_K random blocks), the rest
    F32. Written with the gguf package's writer, tensor by tensor."""
    import gguf
    import numpy as np
    import torch
    from krea2_model.tiny.gguf import random_blocks
    rng = np.random.default_rng(seed)
    w = gguf.GGUFWriter(path, "krea2")
    for k, v in sd.items():
        block = 256 if qtype == "Q4_K" else 32
        if v.ndim == 2 and v.shape[1] % block == 0 and k.endswith(".weight"):
            if qtype == "Q8_0":
                arr = _q8_0(v).cpu().numpy()
            else:
                arr = random_blocks(v.shape[0], v.shape[1], qtype, 2.0 * v.shape[1] ** -0.5, rng)
            w.add_tensor(k, arr, raw_shape=arr.shape, raw_dtype=gguf.GGMLQuantizationType[qtype])
        else:
            w.add_tensor(k, v.to(torch.float32).cpu().numpy())
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()


def make_assets(work: str, tiny: bool, cases) -> dict:
    """The files every case reads, written once (full size: ~26 GB bf16 transformer, ~9 GB text encoder)."""
    import torch
    from safetensors.torch import save_file
    from krea2_model.tiny import lora as tiny_lora
    from krea2_model.tiny import text as tiny_text
    from krea2_model.tiny import transformer as tiny
    cfg, tcfg = _configs(tiny)
    dev = "cuda" if torch.cuda.is_available() and not tiny else "cpu"
    t0 = time.perf_counter()
    out = {"cfg": cfg.to_dict(), "text_cfg": dict(tcfg.__dict__)}
    sd = tiny.random_state_dict(cfg, 1, dtype=torch.bfloat16) if tiny else _random_on(cfg, dev)
    out["model"] = os.path.join(work, "krea2_check_bf16.safetensors")
    save_file({"model.diffusion_model." + k: v.contiguous().cpu() for k, v in sd.items()}, out["model"])
    names = {c[0] for c in cases}
    for q in ("Q8_0", "Q4_K"):
        if f"gguf_{q.lower()}" in names:
            out["gguf_" + q] = os.path.join(work, f"krea2_check_{q}.gguf")
            _write_gguf(out["gguf_" + q], sd, q, seed=2)
    if "lora" in names:
        lo = tiny_lora.make_lora(cfg, "comfy", seed=3, rank=8 if tiny else 64)
        out["lora"] = os.path.join(work, "krea2_check_lora.safetensors")
        save_file({k: v.to(torch.bfloat16).contiguous() for k, v in lo.state_dict.items()}, out["lora"],
                  metadata=lo.metadata or None)
    del sd
    if "text_encoder" in names:
        tsd = tiny_text.random_state_dict(tcfg, 4, dtype=torch.bfloat16)
        out["text"] = tiny_text.write(tsd, os.path.join(work, "qwen3vl_check.safetensors"), "full-vl", tcfg)
    out["assets_s"] = round(time.perf_counter() - t0, 1)
    return out


def _random_on(cfg, dev):
    """Full-size canonical random weights made on ``dev`` (fan-in scaled; norms and tables small)."""
    import torch
    from krea2_model.formats.transformer_file import expected_shapes
    g = torch.Generator(device=dev).manual_seed(1)
    sd = {}
    for k, shape in expected_shapes(cfg).items():
        t = torch.empty(shape, dtype=torch.float32 if k.endswith(".scale") else torch.bfloat16, device=dev)
        std = 0.1 if k.endswith((".scale", ".lin")) else 0.02 if k.endswith(".bias") else shape[-1] ** -0.5
        sd[k] = t.normal_(0.0, std, generator=g)
    return sd


# ----------------------------------------------------------------------------------------------- worker

def _boot(flags, pack_parent, pack_name):
    """Start ComfyUI in this process as ``main.py`` would with ``flags``: argument parsing, then comfy-aimdo
    (dynamic VRAM) exactly when main.py would start it, then the pack. Returns ``(pack import, dynamic)``."""
    import importlib
    sys.argv = ["main.py", *flags]
    sys.path.insert(0, os.getcwd())
    sys.path.insert(0, pack_parent)
    sys.path.insert(0, PACK)  # krea2_model for the pure checks (the pack imports it relatively)
    import comfy.options
    comfy.options.enable_args_parsing()
    from comfy.cli_args import args
    dynamic = False
    enables = getattr(__import__("comfy.cli_args", fromlist=["x"]), "enables_dynamic_vram", None)
    if enables is not None and enables():
        import comfy_aimdo.control as aimdo
        try:
            aimdo.init(simple_vram_headroom=None if args.reserve_vram is None else int(args.reserve_vram * 1024 ** 3))
        except TypeError:
            aimdo.init()
        import comfy.memory_management
        import comfy.model_management as mm
        import comfy.model_patcher
        if mm.is_nvidia() and mm.torch_version_numeric >= (2, 8):
            try:
                ok = aimdo.init_devices((d.index, int(args.vram_headroom * 1024 ** 3)) for d in mm.get_all_torch_devices())
            except TypeError:
                ok = aimdo.init_devices(d.index for d in mm.get_all_torch_devices())
            if ok:
                comfy.model_patcher.CoreModelPatcher = comfy.model_patcher.ModelPatcherDynamic
                comfy.memory_management.aimdo_enabled = True
                dynamic = True
    import torch
    torch.set_grad_enabled(False)
    return (lambda name: importlib.import_module(pack_name + "." + name)), dynamic


class Steps:
    """A sampler callback: wall time of every step (after a device sync) and the device's used memory."""

    def __init__(self, torch):
        self.torch, self.t, self.used = torch, [], 0

    def __call__(self, *args):
        cuda = self.torch.cuda.is_available()
        if cuda:
            self.torch.cuda.synchronize()
            free, total = self.torch.cuda.mem_get_info()
            self.used = max(self.used, total - free)
        self.t.append(time.perf_counter())

    def step_s(self):
        d = [b - a for a, b in zip(self.t, self.t[1:])]
        return statistics.median(d) if d else float("nan")


def _sample(torch, comfy, patcher, ctx, latent_hw, steps, seed=1):
    import comfy.sample
    import comfy.model_management as mm
    g = torch.Generator().manual_seed(seed)
    latent = torch.zeros(1, 16, 1, *latent_hw)
    noise = torch.randn(latent.shape, generator=g)
    rec = Steps(torch)
    if torch.cuda.is_available():
        torch.cuda.reset_peak_memory_stats()
    out = comfy.sample.sample(patcher, noise, steps, 1.0, "euler", "simple", [[ctx, {}]], [[torch.zeros_like(ctx), {}]],
                              latent, seed=seed, callback=rec)
    peak = torch.cuda.max_memory_reserved() if torch.cuda.is_available() else 0
    mm.unload_all_models()
    mm.soft_empty_cache()
    return out.float(), rec.step_s(), max(peak, rec.used)


def _side(torch, comfy, load, ctx, hw, steps):
    t0 = time.perf_counter()
    patcher = load()
    load_s = time.perf_counter() - t0
    _sample(torch, comfy, patcher, ctx, hw, 2)  # warm-up: kernels, first load to the device
    out, step, peak = _sample(torch, comfy, patcher, ctx, hw, steps)
    return patcher, {"latent": out, "step_s": step, "peak_gb": peak / 1e9, "load_s": round(load_s, 1),
                     "patcher": type(patcher).__name__}


def _attention_check(torch, cfg):
    """Our attention alone at full size under sdpa_kernel(flash, efficient): an error means PyTorch would have
    needed its math kernel."""
    from krea2_model.model.attention import attention  # noqa: the pack's own, on sys.path in the worker
    if not torch.cuda.is_available():
        return "not run (CPU: the flash / efficient kernel restriction is a CUDA check)"
    from torch.nn.attention import SDPBackend, sdpa_kernel
    L = 4096 + 512
    q = torch.randn(1, cfg.heads, L, cfg.head_dim, device="cuda", dtype=torch.bfloat16)
    k = torch.randn(1, cfg.kv_heads, L, cfg.head_dim, device="cuda", dtype=torch.bfloat16)
    mask = torch.ones(1, 1, 1, L, dtype=torch.bool, device="cuda")
    mask[..., -40:] = False
    res = []
    # the text tower's causal calls: Qwen3-VL-4B's 32 query / 8 key-value heads of 128, a 600-token prompt
    tq = torch.randn(1, 32, 600, 128, device="cuda")
    tk = torch.randn(1, 8, 600, 128, device="cuda")
    calls = [("joint, no mask", lambda: attention(q, k, k)), ("joint, key mask", lambda: attention(q, k, k, mask)),
             ("joint fp32, key mask", lambda: attention(q.float(), k.float(), k.float(), mask))]
    # regional prompts: a (1, 1, L, L) boolean mask (two regions over a 64 x 64 token grid)
    from krea2_model.model.regions import regional_attention_mask
    inside = torch.zeros(2, 4096, dtype=torch.bool, device="cuda")
    inside[0, :2048], inside[1, 2048:] = True, True
    rmask = regional_attention_mask(L - 4096 - 60, (30, 30), inside)
    calls.append(("joint, regional mask", lambda: attention(q, k, k, rmask)))
    for dt in (torch.bfloat16, torch.float32):
        calls.append((f"text causal {str(dt)[6:]}", lambda dt=dt: attention(tq.to(dt), tk.to(dt), tk.to(dt),
                                                                          is_causal=True)))
    with sdpa_kernel([SDPBackend.FLASH_ATTENTION, SDPBackend.EFFICIENT_ATTENTION]):
        for name, call in calls:
            try:
                call()
                res.append(f"{name}: ok")
            except RuntimeError as e:
                res.append(f"{name}: FAILS ({str(e).splitlines()[0][:80]})")
    return "; ".join(res)


def worker(spec_path):
    spec = json.load(open(spec_path))
    case, flags, opts = spec["case"], spec["flags"], spec["opts"]
    pack, dynamic = _boot(flags, spec["pack_parent"], spec["pack_name"])
    import torch
    import comfy
    import comfy.sd
    import comfy.utils
    cm = pack("nodes.host.model")
    cfg = pack("krea2_model").Krea2Config(**spec["assets"]["cfg"])
    side = spec["side"]
    hw = (side, side)
    ctx = torch.randn(1, 40, cfg.text_taps * cfg.text_dim, generator=torch.Generator().manual_seed(4))
    res = {"case": case, "flags": " ".join(flags) or "(defaults)", "dynamic_vram": dynamic,
           "gpu": torch.cuda.get_device_name() if torch.cuda.is_available() else "cpu"}
    a = spec["assets"]
    wd = opts.get("weight_dtype", "default")
    if opts.get("attention_check"):
        res["attention"] = _attention_check(torch, cfg)
    if opts.get("text"):
        res.update(_text_case(torch, pack, a, spec))
        print(json.dumps(res))
        return
    native_opts = {}
    if wd != "default":
        native_opts = {"dtype": torch.float8_e4m3fn, "fp8_optimizations": wd == "fp8_e4m3fn_fast"}
    nat = ours = None
    try:
        np_, nat = _side(torch, comfy, lambda: comfy.sd.load_diffusion_model(a["model"], model_options=native_opts),
                         ctx, hw, spec["steps"])
        if opts.get("lora"):
            lora = comfy.utils.load_torch_file(a["lora"])
            np_ = comfy.sd.load_lora_for_models(np_, None, lora, 1.0, 0)[0]
            nat = _side(torch, comfy, lambda: np_, ctx, hw, spec["steps"])[1]
    except Exception as e:
        res["native_error"] = f"{type(e).__name__}: {e}"[:300]
    path = a["gguf_" + opts["gguf"]] if opts.get("gguf") else a["model"]
    op, ours = _side(torch, comfy, lambda: cm.load_model(path, wd), ctx, hw, spec["steps"])
    if opts.get("lora"):
        lora = comfy.utils.load_torch_file(a["lora"])
        op = comfy.sd.load_lora_for_models(op, None, lora, 1.0, 0)[0]
        ours = _side(torch, comfy, lambda: op, ctx, hw, spec["steps"])[1]
    res.update({"ours_step_s": ours["step_s"], "ours_peak_gb": round(ours["peak_gb"], 2),
                "ours_patcher": ours["patcher"]})
    if nat is not None:
        res.update({"native_step_s": nat["step_s"], "native_peak_gb": round(nat["peak_gb"], 2),
                    "ratio": ours["step_s"] / nat["step_s"]})
        if opts.get("gguf") != "Q4_K":
            ref = nat["latent"]
            if opts.get("gguf") == "Q8_0":  # against our bf16 MODEL on the weights it was made from
                ref = _side(torch, comfy, lambda: cm.load_model(a["model"]), ctx, hw, spec["steps"])[1]["latent"]
            res["rel_diff"] = ((ours["latent"] - ref).norm() / ref.norm()).item()
    print(json.dumps(res))


def _text_case(torch, pack, a, spec):
    """Our CLIP on the full-VL file: one image prompt encoded, and TextGenerate greedy; core's krea2 CLIP on the
    same file where the host has it (it builds the full 4B tower, so not in --tiny)."""
    import comfy.sd
    cc = pack("nodes.host.clip")
    img = torch.rand(1, 384, 384, 3, generator=torch.Generator().manual_seed(5))
    out = {}

    def run(clip, image):
        t0 = time.perf_counter()
        cond = clip.encode_from_tokens_scheduled(clip.tokenize("a red fox asleep on a mossy stone"))[0][0].float()
        enc = time.perf_counter() - t0
        if image:  # Krea's image layout (ours only: core's CLIP lays images out as Qwen-Image-Edit)
            t0 = time.perf_counter()
            clip.encode_from_tokens_scheduled(clip.tokenize("the same, at dusk", images=[img]))
            out["ours_image_encode_s"] = round(time.perf_counter() - t0, 3)
        t0 = time.perf_counter()
        tok = clip.tokenize("a fox", image=None, skip_template=False, min_length=1, thinking=False)
        ids = clip.generate(tok, do_sample=False, max_length=32)
        gen = time.perf_counter() - t0
        return cond, enc, [int(i) for i in ids], gen

    c1, e1, g1, t1 = run(cc.load_clip(a["text"]), True)
    out.update({"ours_encode_s": round(e1, 3), "ours_generate_tok_s": round(len(g1) / t1, 1)})
    if spec["tiny"] or not hasattr(comfy.sd.CLIPType, "KREA2"):
        out["native_error"] = "not run: core's krea2 CLIP builds the full Qwen3-VL-4B (--tiny) or is absent"
        return out
    c2, e2, g2, t2 = run(comfy.sd.load_clip([a["text"]], clip_type=comfy.sd.CLIPType.KREA2), False)
    n = min(c1.shape[1], c2.shape[1])
    out.update({"native_encode_s": round(e2, 3), "native_generate_tok_s": round(len(g2) / t2, 1),
                "ratio": e1 / e2, "rel_diff": ((c1[:, :n] - c2[:, :n]).norm() / c2[:, :n].norm()).item(),
                "generated_equal": g1 == g2})
    return out


# ----------------------------------------------------------------------------------------------- driver

def _pack_root(work: str) -> tuple[str, str]:
    """``(parent, name)`` the workers import the pack by: its own folder when the name is a Python identifier, else
    a link named ``krea2_nodes`` in ``work`` (a clone in ``/tmp/tmp.XyZ`` would import as the module ``tmp``)."""
    name = os.path.basename(PACK)
    if name.isidentifier():
        return os.path.dirname(PACK), name
    parent = os.path.join(work, "pack")
    os.makedirs(parent, exist_ok=True)
    link = os.path.join(parent, "krea2_nodes")
    if not os.path.exists(link):
        os.symlink(PACK, link, target_is_directory=True)
    return parent, "krea2_nodes"


def _host(arg):
    if arg:
        return arg
    sys.path.insert(0, PACK)
    try:
        from krea2_model.tiny.comfy_server import find_host
        found = find_host()
        return str(found) if found else None
    except Exception:
        return None


def _row(r):
    def f(k, fmt):
        v = r.get(k)
        return fmt.format(v) if isinstance(v, (int, float)) and not isinstance(v, bool) else "-"
    if "not_reached" in r or "error" in r:
        return f"| {r['case']} | {r.get('flags', '')} | {r.get('not_reached') or 'ERROR: ' + r['error']} |||||||"
    note = r.get("native_error", "")
    if r.get("attention"):
        note = (note + "; " if note else "") + "attention under flash/efficient only: " + r["attention"]
    step_o = f("ours_step_s", "{:.3f}") if "ours_step_s" in r else f("ours_encode_s", "{:.3f}")
    step_n = f("native_step_s", "{:.3f}") if "native_step_s" in r else f("native_encode_s", "{:.3f}")
    return (f"| {r['case']} | {r['flags']} | {'on' if r.get('dynamic_vram') else 'off'} | {step_o} | {step_n} | "
            f"{f('ratio', '{:.3f}')} | {f('ours_peak_gb', '{:.1f}')} / {f('native_peak_gb', '{:.1f}')} | "
            f"{f('rel_diff', '{:.2e}')} | {note} |")


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--tiny", action="store_true", help="small sizes on the CPU: checks the script")
    ap.add_argument("--comfy", default=os.environ.get("COMFYUI_PATH"), help="ComfyUI folder (default: discovery)")
    ap.add_argument("--python", default=None, help="the host's Python (default: this one)")
    ap.add_argument("--work", default=None, help="folder for the generated files (default: a temp folder)")
    ap.add_argument("--budget", type=float, default=420.0, help="seconds; cases not started by then are skipped")
    ap.add_argument("--steps", type=int, default=8)
    ap.add_argument("--cases", default=",".join(c[0] for c in CASES))
    ap.add_argument("--results", default=None, help="append the table here (default: RESULTS.md, not with --tiny)")
    ap.add_argument("--json", default=None)
    ap.add_argument("--worker", default=None, help=argparse.SUPPRESS)
    a = ap.parse_args(argv)
    if a.worker:
        return worker(a.worker)
    t0 = time.perf_counter()
    sys.path.insert(0, PACK)
    import torch
    if not a.tiny and not torch.cuda.is_available():
        sys.exit("gpu_check.py: no CUDA device (use --tiny to check the script on the CPU)")
    wanted = [c for c in CASES if c[0] in a.cases.split(",")]
    host = _host(a.comfy)
    py = a.python or (os.path.join(host, ".venv", "bin", "python") if host and a.tiny and
                      os.path.exists(os.path.join(host, ".venv", "bin", "python")) else sys.executable)
    work = a.work or tempfile.mkdtemp(prefix="krea2-gpu-check-")
    pack_parent, pack_name = _pack_root(work)
    assets = make_assets(work, a.tiny, wanted)
    print(f"assets in {assets['assets_s']} s: {work}", flush=True)
    side = 16 if a.tiny else 128  # latent side: 1024 px / 8
    rows = []
    for name, flags, opts in wanted:
        if host is None:
            rows.append({"case": name, "not_reached": "no ComfyUI host (give --comfy)"})
            continue
        if time.perf_counter() - t0 > a.budget:
            rows.append({"case": name, "not_reached": f"not reached (budget {a.budget:.0f} s spent)"})
            continue
        flags = list(flags)
        if "RESERVE" in flags:  # leave ComfyUI less VRAM than the bf16 model: it must offload
            total = torch.cuda.get_device_properties(0).total_memory / 1e9 if torch.cuda.is_available() else 0
            flags[flags.index("RESERVE")] = f"{max(0.0, total - os.path.getsize(assets['model']) / 2e9):.0f}"
        if a.tiny:  # the CPU: no dynamic VRAM, and ComfyUI refuses the VRAM modes beside --cpu
            flags = ["--cpu"] + [f for f in flags if f not in ("--lowvram", "--reserve-vram", "RESERVE")
                                 and not f.replace(".", "").isdigit()]
        spec = {"case": name, "flags": flags, "opts": opts, "assets": assets, "side": side, "steps": a.steps,
                "tiny": a.tiny, "pack_parent": pack_parent, "pack_name": pack_name}
        sp = os.path.join(work, f"{name}.json")
        json.dump(spec, open(sp, "w"))
        r = subprocess.run([py, os.path.abspath(__file__), "--worker", sp], capture_output=True, text=True,
                           cwd=host, timeout=max(60.0, a.budget * 2))
        try:
            rows.append(json.loads(r.stdout.strip().splitlines()[-1]))
        except (IndexError, ValueError):
            rows.append({"case": name, "flags": " ".join(flags),
                         "error": (r.stderr.strip().splitlines() or ["no output"])[-1][:300]})
        print(_row(rows[-1]), flush=True)
    gpu = next((r["gpu"] for r in rows if "gpu" in r), "cpu")
    head = ("| case | flags | dynamic VRAM | ours s/step | native s/step | ours / native | peak GB ours / native | "
            "rel. diff | notes |\n|---|---|---|---|---|---|---|---|---|")
    table = head + "\n" + "\n".join(_row(r) for r in rows)
    print(table)
    if a.json:
        json.dump({"gpu": gpu, "rows": rows, "tiny": a.tiny}, open(a.json, "w"), indent=1)
    results = a.results or (None if a.tiny else os.path.join(HERE, "RESULTS.md"))
    if results:
        with open(results, "a") as f:
            f.write(f"\n## gpu_check{' (--tiny, CPU)' if a.tiny else ''}: {gpu}, "
                    f"{time.strftime('%Y-%m-%d')}, torch {torch.__version__}\n\n"
                    f"`python benchmarks/gpu_check.py {' '.join(argv or sys.argv[1:])}`; 1024x1024 (4096 image "
                    f"tokens), {a.steps} steps, cfg 1, median step after a warm-up sample; rel. diff of the final "
                    f"latents (GGUF Q8_0: against our bf16 MODEL; text encoder: conditioning).\n\n{table}\n")
    return rows


if __name__ == "__main__":
    main()
