"""Full-size Krea 2 on a GPU: per-step time and peak memory, ours against native ComfyUI and the floor.

    COMFYUI_PATH=/path/to/ComfyUI python benchmarks/gpu_step.py [--results FILE]

One prepared call (well under 8 minutes on an H100): the full model (hidden 6144, 28 blocks,
12.9B parameters) with random bf16 weights, shared by both models (one copy in GPU memory), at
1024x1024 (4096 image tokens) with a 40-token prompt, batch 1:

* ours (``krea2_model.Krea2Transformer``), a step for a new prompt and a step with the text stage
  cached (what every step but the first of a sample costs);
* native ComfyUI (``comfy.ldm.krea2.model.SingleStreamDiT`` from the tree at ``COMFYUI_PATH``, else
  ``~/comfy/ComfyUI``), with the attention ComfyUI picks for the device and with PyTorch SDPA;
* the floor: the bf16 GEMMs and attention kernels of one forward of ours, replayed alone;
* ours with GGUF Q8_0 weights (``krea2_model.formats.gguf_ops``): every Linear weight packed in memory as
  Q8_0 blocks (made on the device from the same random weights) and dequantized per layer at call time,
  the way a ``.gguf`` file runs; its output is compared with the bf16 model's.

Importing ComfyUI's model needs psutil, einops, comfy-aimdo and comfy-kitchen beside torch; put
them in ``benchmarks/.hostdeps`` (``pip install --no-deps --target benchmarks/.hostdeps ...``) when
the machine has no network, and copy the host's ``comfy/`` and ``comfyui_version.py`` somewhere the
machine sees (e.g. ``benchmarks/.comfy``, then ``COMFYUI_PATH=benchmarks/.comfy``). Without a host
the native rows are skipped and the script says why.

Timing: CUDA events around each step after warm-up, medians of ``--reps`` interleaved runs.
Peak memory: ``torch.cuda.max_memory_allocated`` during one step minus the memory held before it.
Results are appended to ``--results`` (default benchmarks/RESULTS.md; on a lent machine write
under ``$OUT`` and append the file here).

``--tiny`` runs the same code path on the CPU with a small native-compatible config (for checking
the script without a GPU).
"""

from __future__ import annotations

import os
import sys

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import _common  # noqa: E402

if "--tiny" in sys.argv:
    _common.pin()

import argparse  # noqa: E402
import statistics  # noqa: E402
import time  # noqa: E402

import torch  # noqa: E402

from krea2_model import Krea2Config, Krea2Transformer  # noqa: E402

HERE = os.path.dirname(os.path.abspath(__file__))

# a small config whose MLP widths follow native ComfyUI's rule (int(2F/3)*4 rounded up to 128)
TINY = Krea2Config(hidden=256, heads=2, kv_heads=1, head_dim=128, mlp_hidden=768, layers=2, time_dim=256,
                   text_dim=256, text_taps=12, text_heads=2, text_kv_heads=2, text_head_dim=128,
                   text_mlp_hidden=768, text_layerwise_blocks=2, text_refiner_blocks=2)


def random_weights(cfg, dtype, device, seed=0):
    """Canonical random weights made directly on ``device`` (fan-in scaled; norms/tables small)."""
    from krea2_model.formats.transformer_file import expected_shapes

    g = torch.Generator(device=device).manual_seed(seed)
    sd = {}
    for k, shape in expected_shapes(cfg).items():
        dt = torch.float32 if k.endswith(".scale") else dtype
        t = torch.empty(shape, dtype=dt, device=device)
        if k.endswith((".scale", ".lin")):
            t.normal_(0.0, 0.1, generator=g)
        elif k.endswith(".bias"):
            t.normal_(0.0, 0.02, generator=g)
        else:
            t.normal_(0.0, shape[-1] ** -0.5, generator=g)
        sd[k] = t
    return sd


def q8_0_blocks(w: torch.Tensor) -> torch.Tensor:
    """``w (rows, cols)`` as GGUF Q8_0 bytes ``(rows, cols / 32 * 34)``: per 32 values an fp16 scale
    ``d = max|x| / 127`` then the 32 int8 values ``round(x / d)`` (the block layout in docs/architecture.md)."""
    rows, cols = w.shape
    x = w.float().reshape(-1, 32)
    d = x.abs().amax(dim=1, keepdim=True) / 127.0
    q = torch.where(d > 0, x / d.clamp_min(1e-30), torch.zeros_like(x)).round().clamp(-127, 127).to(torch.int8)
    return torch.cat([d.half().view(torch.uint8), q.view(torch.uint8)], dim=1).reshape(rows, cols // 32 * 34)


def build_gguf_q8(cfg, sd, dtype):
    """Our model with every Linear weight as packed Q8_0 blocks (dequantized at call time), other tensors the
    ``sd`` ones (shared)."""
    from krea2_model.formats.gguf_ops import GGUFOps
    with torch.device("meta"):
        m = Krea2Transformer(cfg, dtype=dtype, operations=GGUFOps)
    dense = {}
    for k, v in sd.items():
        mod_name, _, name = k.rpartition(".")
        mod = m.get_submodule(mod_name)
        if name == "weight" and getattr(mod, "gguf_capable", False) and v.ndim == 2 and v.shape[1] % 32 == 0:
            mod._parameters["weight"] = torch.nn.Parameter(q8_0_blocks(v), requires_grad=False)
            mod.gguf_qtype, mod.gguf_shape = "Q8_0", torch.Size(v.shape)
        else:
            dense[k] = v
    m.load_state_dict(dense, assign=True, strict=False)
    return m.eval()


def load_native(device_is_cpu: bool):
    host = _common.find_comfyui()
    local = os.path.join(HERE, ".comfy")
    if host is None and os.path.isfile(os.path.join(local, "comfy", "ldm", "krea2", "model.py")):
        host = local
    if host is None:
        return None, "no ComfyUI tree with comfy/ldm/krea2 (set COMFYUI_PATH)"
    deps = os.path.join(HERE, ".hostdeps")
    if os.path.isdir(deps) and deps not in sys.path:
        sys.path.append(deps)
    try:
        from _models import Native
        return Native(host, cpu=device_is_cpu), None
    except Exception as e:
        return None, f"{host}: cannot import comfy.ldm.krea2.model ({type(e).__name__}: {e})"


class Timer:
    def __init__(self, device):
        self.cuda = device.type == "cuda"

    def __call__(self, fn):
        if self.cuda:
            torch.cuda.synchronize()
            a, b = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            a.record()
            fn()
            b.record()
            torch.cuda.synchronize()
            return a.elapsed_time(b) / 1000.0
        t0 = time.perf_counter()
        fn()
        return time.perf_counter() - t0


def peak_bytes(device, fn):
    if device.type != "cuda":
        return None
    torch.cuda.synchronize()
    base = torch.cuda.memory_allocated()
    torch.cuda.reset_peak_memory_stats()
    fn()
    torch.cuda.synchronize()
    return torch.cuda.max_memory_allocated() - base


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--tiny", action="store_true", help="small config on the CPU (checks the code path)")
    ap.add_argument("--tokens", type=int, default=4096)
    ap.add_argument("--text-len", type=int, default=40)
    ap.add_argument("--reps", type=int, default=5)
    ap.add_argument("--results", default=_common.RESULTS)
    ap.add_argument("--no-native", action="store_true")
    a = ap.parse_args(argv)

    from _models import Floor

    if a.tiny:
        device, cfg, tokens = torch.device("cpu"), TINY, min(a.tokens, 256)
    else:
        if not torch.cuda.is_available():
            sys.exit("gpu_step.py: no CUDA device (use --tiny to check the script on the CPU)")
        device, cfg, tokens = torch.device("cuda"), Krea2Config(), a.tokens
        torch.backends.cuda.matmul.allow_tf32 = True
    dtype = torch.bfloat16
    t_start = time.perf_counter()
    sd = random_weights(cfg, dtype, device)
    print(f"weights ready ({sum(v.numel() for v in sd.values()) / 1e9:.2f}B params) "
          f"in {time.perf_counter() - t_start:.1f}s", flush=True)

    def build_ours():
        with torch.device("meta"):
            m = Krea2Transformer(cfg, dtype=dtype)
        m.load_state_dict(sd, assign=True)  # assign: every model shares the one copy of the weights
        return m.eval()
    ours, ours_nc = build_ours(), build_ours()
    ours_nc.cache_text = False

    native, why = (None, "skipped (--no-native)") if a.no_native else load_native(device.type == "cpu")
    nm = None
    if native is not None:
        try:
            nm = native.build(cfg, sd, dtype, device=None)  # assign=True: shares our tensors
        except Exception as e:
            nm, why = None, f"cannot build native model ({type(e).__name__}: {e})"
    if why:
        print("native ComfyUI:", why)

    side = int(round(tokens ** 0.5))
    g = torch.Generator(device=device).manual_seed(1)
    x = torch.randn(1, cfg.channels, side * cfg.patch, side * cfg.patch, generator=g, device=device, dtype=dtype)
    ctx = torch.randn(1, a.text_len, cfg.text_taps * cfg.text_dim, generator=g, device=device, dtype=dtype)
    sigma = torch.full((1,), 0.7, device=device)

    cases = {"ours": lambda: ours_nc(x, sigma, ctx), "ours, cached text": lambda: ours(x, sigma, ctx.clone())}
    checks = {}
    gguf = build_gguf_q8(cfg, sd, dtype)
    gguf.cache_text = False
    cases["ours, GGUF Q8_0 weights (dequantized per layer)"] = lambda: gguf(x, sigma, ctx)
    with torch.inference_mode():
        ref = ours_nc(x, sigma, ctx).float()
        out_q8 = gguf(x, sigma, ctx).float()
        checks["GGUF Q8_0"] = ((out_q8 - ref).norm() / ref.norm()).item()
        if nm is not None:
            nat = native.cases(lambda: nm(x, sigma, ctx))
            cases.update(nat)
            out = nat[f"native ComfyUI, default ({native.default_name})"]().float()
            checks["native ComfyUI"] = ((out - ref).norm() / ref.norm()).item()
        floor = Floor(ours_nc, (x, sigma, ctx))
        cases["floor (bf16 GEMM + attention kernels)"] = floor
        cases["floor, GEMMs only"] = floor.gemm_only

        timer = Timer(device)
        for fn in cases.values():  # warm-up (kernel selection, caches)
            fn()
            fn()
        peaks = {name: peak_bytes(device, fn) for name, fn in cases.items()}
        times = {name: [] for name in cases}
        for _ in range(a.reps):
            for name, fn in cases.items():
                times[name].append(timer(fn))

    med = {k: statistics.median(v) for k, v in times.items()}
    t_ours = med["ours"]
    rows = []
    for name in cases:
        pk = peaks[name]
        rows.append([name, med[name] * 1000, med[name] / t_ours, "" if pk is None else f"{pk / 2**30:.2f}",
                     " ".join(f"{t * 1000:.1f}" for t in times[name])])
    txt = _common.fmt_table(["case", "median ms", "time / ours", "peak GiB above weights", "runs ms"], rows)
    txt += f"\n\nours / floor = {t_ours / med['floor (bf16 GEMM + attention kernels)']:.3f}"
    if "native ComfyUI" in checks:
        txt += f"; native vs ours rel. diff {checks['native ComfyUI']:.1e}"
    txt += f"; GGUF Q8_0 vs bf16 weights rel. diff {checks['GGUF Q8_0']:.1e}"
    if device.type == "cuda":
        name = torch.cuda.get_device_name(device)
        weights = sum(v.numel() * v.element_size() for v in sd.values())
        txt += f"\n\nweights {weights / 2**30:.1f} GiB (one copy, shared by both models)"
    else:
        name = f"CPU ({_common.cpu_name()}), --tiny code-path check, not a GPU measurement"
    print(txt)
    cfg_s = f"hidden {cfg.hidden}, {cfg.layers} blocks, {cfg.heads}/{cfg.kv_heads} heads"
    extra = {"device": name, "model": f"{cfg_s}, bf16, {tokens} image tokens, {a.text_len}-token prompt",
             "native ComfyUI": (f"{native.version} ({native.host})" if nm is not None else why),
             "wall of this script": f"{time.perf_counter() - t_start:.0f}s"}
    _common.RESULTS = a.results
    _common.append_results("gpu_step" + (" (--tiny)" if a.tiny else ""),
                           "python " + " ".join(["benchmarks/gpu_step.py"] + sys.argv[1:]), txt, extra)


if __name__ == "__main__":
    main()
