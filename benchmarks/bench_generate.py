"""Prompt generation (TextGenerate's path): ours vs transformers' ``generate``, and GGUF Q8_0 vs bf16, one run.

    python benchmarks/bench_generate.py [--layers 2] [--new 128] [--reps 3] [--no-record]

The tower has Qwen3-VL-4B's real width and vocabulary (hidden 2560, 32 query / 8 key-value heads of 128, MLP
9728, vocabulary 151936: the tied output head is the biggest single matrix) and fewer layers (``--layers``,
default 2: two 4B towers do not fit this VM). Random bf16 weights, a 40-token prompt, ``--new`` new tokens,
greedy, no stop token (every case makes exactly ``--new`` tokens).

Cases, interleaved (``_common.interleave``), each run's CPU time / wall time recorded and runs under 1.85 dropped:

* ours: :func:`krea2_model.text.generate.generate` on the bf16 tower, computing in bf16;
* transformers: ``Qwen3VLForConditionalGeneration.generate(do_sample=False)`` on the very same tensors (ours is
  built from its state dict without copies), bf16;
* ours GGUF Q8_0: the same weights written as a Q8_0 GGUF (llama.cpp names) and loaded by ``load_text_encoder``,
  computing in bf16: the head and, as the free memory allows (here: all), the layers dequantized once per call;
* ours GGUF Q8_0, no copies (``copy_budget=0``): what a machine without room for the copies gets, the layers
  dequantized per use (by cache-sized bands of rows for one-token steps).

The bound: one decode step must read every weight once (memory bound at batch 1). ``bare products`` times just
those matrix products (head and every layer weight, one bf16 row each) in the same run: no implementation of the
same weights in the same dtype decodes faster than that, so the ratio ours / bound shows what is left to gain.

Time to first token is timed as a separate one-token generation. Peak memory during generation is measured in a
fresh process per case: the high-water RSS (VmHWM, reset through ``/proc/self/clear_refs`` after loading) minus
the RSS after loading, against the bytes of the weights. The output head's per-token cost on the GGUF table is
also timed three ways (the per-call dequantized copy we use; dequantizing 8192-row chunks every token; the whole
table dequantized every token, which the host's cast path amounts to).
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import _common  # noqa: E402

_common.pin()

import torch  # noqa: E402

from krea2_model.text.generate import generate  # noqa: E402
from krea2_model.text.qwen3 import Qwen3TextConfig  # noqa: E402

PROMPT = 40


def config(layers: int) -> Qwen3TextConfig:
    return Qwen3TextConfig(layers=layers)


def bf16_state_dict(cfg: Qwen3TextConfig, seed: int = 0) -> dict:
    """Canonical random bf16 weights (fan-in scaled, norms near 1), made tensor by tensor in bf16."""
    from krea2_model.formats.text_file import expected_text_shapes
    g = torch.Generator().manual_seed(seed)
    out = {}
    for k, shape in expected_text_shapes(cfg).items():
        t = torch.empty(shape, dtype=torch.bfloat16)
        if k.endswith("norm.weight"):
            t.normal_(1.0, 0.2, generator=g)
        elif k == "embed_tokens.weight":
            t.normal_(0.0, 1.0, generator=g)
        else:
            t.normal_(0.0, shape[-1] ** -0.5, generator=g)
        out[k] = t
    return out


def prompt_ids(cfg) -> list:
    g = torch.Generator().manual_seed(1)
    return torch.randint(0, 4000, (PROMPT,), generator=g).tolist()


def hf_model(cfg, sd):
    from transformers import Qwen3VLConfig, Qwen3VLForConditionalGeneration
    from krea2_model.tiny.text import hf_text_config
    vision = dict(depth=1, hidden_size=32, intermediate_size=32, num_heads=2, out_hidden_size=cfg.hidden,
                  num_position_embeddings=16, deepstack_visual_indexes=[])
    conf = Qwen3VLConfig(text_config=dict(hf_text_config(cfg), dtype="bfloat16"), vision_config=vision,
                         tie_word_embeddings=True, image_token_id=cfg.vocab - 1, video_token_id=cfg.vocab - 2,
                         vision_start_token_id=cfg.vocab - 3, vision_end_token_id=cfg.vocab - 4)
    with torch.device("meta"):
        m = Qwen3VLForConditionalGeneration(conf)
    full = {"model.language_model." + k: v for k, v in sd.items()}
    full["lm_head.weight"] = sd["embed_tokens.weight"]
    for n, p in m.named_parameters():
        if n.startswith("model.visual."):
            full[n] = torch.zeros(p.shape, dtype=torch.bfloat16)
    m.load_state_dict(full, strict=True, assign=True)
    m.tie_weights()
    for mod in m.modules():  # buffers (the rotary tables) are not in the state dict: make them off the meta device
        for name, b in list(mod._buffers.items()):
            if b is not None and b.device.type == "meta":
                if name in ("inv_freq", "original_inv_freq") and hasattr(mod, "rope_init_fn"):
                    mod._buffers[name] = mod.rope_init_fn(mod.config, torch.device("cpu"))[0]
                else:  # the vision tower's (unused here)
                    mod._buffers[name] = torch.zeros(b.shape, dtype=b.dtype)
    return m.eval()


def ours_model(sd):
    from krea2_model.formats.text_file import load_text_model
    return load_text_model(sd)  # bf16 as given: the same tensors, no copy


def hf_generate(m, ids, new):
    x = torch.tensor([ids])
    with torch.no_grad():
        out = m.generate(input_ids=x, attention_mask=torch.ones_like(x), do_sample=False, max_new_tokens=new,
                         min_new_tokens=new, eos_token_id=None, pad_token_id=0,
                         mm_token_type_ids=torch.zeros_like(x, dtype=torch.int))
    return out[0, len(ids):].tolist()


def write_gguf(cfg, sd, path):
    from krea2_model.formats.gguf import canonical_to_llama_cpp
    from krea2_model.tiny.gguf import write_gguf as write
    meta = {"qwen3vl.attention.layer_norm_rms_epsilon": float(cfg.eps), "qwen3vl.rope.freq_base": float(cfg.rope_theta)}
    write({canonical_to_llama_cpp(k): v.float() if v.ndim == 1 else v for k, v in sd.items()}, path, "qwen3vl",
          lambda n: "F32" if n.endswith("norm.weight") else "Q8_0", metadata=meta)


def bare_products(weights, steps):
    """``steps`` decode steps' worth of matrix products alone: each 2-D weight times one bf16 row."""
    xs = {w.shape[1]: torch.randn(1, w.shape[1], dtype=w.dtype) for w in weights}
    with torch.no_grad():
        for _ in range(steps):
            for w in weights:
                torch.nn.functional.linear(xs[w.shape[1]], w)


def head_costs(model, reps=3) -> dict:
    """ms per token of the GGUF output head three ways (see the module docstring), and the one-off copy."""
    from krea2_model.formats.gguf_dequant import dequantize
    from krea2_model.text.generate import output_head
    emb = model.embed_tokens
    x = torch.randn(1, model.config.hidden, dtype=torch.bfloat16)
    w, copy_s = None, []
    for _ in range(reps):
        wall, _ = _common.timed(lambda: output_head(model, torch.bfloat16, "cpu"))
        copy_s.append(wall)
    w = output_head(model, torch.bfloat16, "cpu")
    rows = 8192

    def chunked():
        out = torch.empty(model.config.vocab, dtype=torch.bfloat16)
        for i in range(0, model.config.vocab, rows):
            j = min(i + rows, model.config.vocab)
            blk = dequantize(emb.weight[i:j], emb.gguf_qtype, (j - i, model.config.hidden), torch.bfloat16)
            out[i:j] = torch.nn.functional.linear(x, blk)[0]
        return out

    cases = {"per-call copy, matmul": lambda: torch.nn.functional.linear(x, w),
             "8192-row chunks dequantized per token": chunked,
             "whole table dequantized per token": lambda: torch.nn.functional.linear(
                 x, dequantize(emb.weight, emb.gguf_qtype, emb.gguf_shape, torch.bfloat16))}
    runs = _common.Runs(min_ratio=0.0)
    _common.interleave(cases, reps, runs, verbose=False)
    out = {k: runs.median(k) * 1000 for k in cases}
    out["one-off copy per call"] = sorted(copy_s)[len(copy_s) // 2] * 1000
    return out


MEMORY_CHILD = r"""
import json, sys, torch
sys.path.insert(0, {root!r})
sys.path.insert(0, {bench!r})
import bench_generate as B
from krea2_model.text.generate import generate
cfg = B.config({layers})
def rss(field):
    for line in open('/proc/self/status'):
        if line.startswith(field):
            return int(line.split()[1]) * 1024
kind = {kind!r}
ids = B.prompt_ids(cfg)
if kind == 'gguf':
    from krea2_model import load_text_encoder
    model = load_text_encoder({gguf!r}, tokenizer={tok!r}).model
    weights = sum(p.numel() * p.element_size() for p in model.parameters())
    run = lambda: generate(model, ids, max_new={new}, dtype=torch.bfloat16)
else:
    sd = B.bf16_state_dict(cfg)
    weights = sum(t.numel() * t.element_size() for t in sd.values())
    if kind == 'ours':
        model = B.ours_model(sd)
        run = lambda: generate(model, ids, max_new={new})
    else:
        model = B.hf_model(cfg, sd)
        run = lambda: B.hf_generate(model, ids, {new})
    del sd
import gc; gc.collect()
after_load = rss('VmRSS')
open('/proc/self/clear_refs', 'w').write('5')
out = run()
peak = rss('VmHWM')
print(json.dumps(dict(weights=weights, after_load=after_load, peak=peak, tokens=len(out))))
"""


def memory(kind, layers, new, gguf=None, tok=None) -> dict:
    code = MEMORY_CHILD.format(root=_common.ROOT, bench=os.path.dirname(os.path.abspath(__file__)), layers=layers,
                               kind=kind, new=new, gguf=gguf, tok=tok)
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=3600)
    if r.returncode:
        raise RuntimeError(r.stderr[-3000:])
    return json.loads(r.stdout.strip().splitlines()[-1])


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--layers", type=int, default=2)
    ap.add_argument("--new", type=int, default=128)
    ap.add_argument("--reps", type=int, default=3)
    ap.add_argument("--max-reps", type=int, default=6)
    ap.add_argument("--min-cpu-ratio", type=float, default=_common.MIN_CPU_RATIO,
                    help="keep runs whose CPU time / wall time reaches this (default: the house rule, "
                         f"{_common.MIN_CPU_RATIO}); lower it on a machine other work keeps busy, and say so")
    ap.add_argument("--memory-new", type=int, default=0, help="new tokens in the memory processes (default --new)")
    ap.add_argument("--no-record", action="store_true")
    a = ap.parse_args()
    cfg = config(a.layers)
    ids = prompt_ids(cfg)
    sd = bf16_state_dict(cfg)
    weights = sum(t.numel() * t.element_size() for t in sd.values())
    ours, hf = ours_model(sd), hf_model(cfg, sd)
    assert ours.embed_tokens.weight.data_ptr() == hf.model.language_model.embed_tokens.weight.data_ptr()
    tmp = tempfile.mkdtemp(prefix="k2gen")
    gpath = os.path.join(tmp, "qwen3vl_bench_Q8_0.gguf")
    write_gguf(cfg, sd, gpath)
    from krea2_model.tiny.text import build_tokenizer
    tok = os.path.join(tmp, "tokenizer")
    build_tokenizer(tok)
    from krea2_model import load_text_encoder
    gg = load_text_encoder(gpath, tokenizer=tok).model

    # same tokens first (bf16 both sides: the check is that both ran the same computation)
    a_ids, b_ids = generate(ours, ids, max_new=16), hf_generate(hf, ids, 16)
    agree = sum(x == y for x, y in zip(a_ids, b_ids))
    print(f"greedy agreement ours vs transformers, first 16 tokens (bf16): {agree}/16", flush=True)

    new = a.new
    cases = {
        "ours bf16": lambda: generate(ours, ids, max_new=new),
        "transformers bf16": lambda: hf_generate(hf, ids, new),
        "ours GGUF Q8_0 (bf16 compute)": lambda: generate(gg, ids, max_new=new, dtype=torch.bfloat16),
        "ours GGUF Q8_0, no copies": lambda: generate(gg, ids, max_new=new, dtype=torch.bfloat16, copy_budget=0),
        "bare products": lambda: bare_products(ours_weights, new - 1),
        "ttft ours bf16": lambda: generate(ours, ids, max_new=1),
        "ttft transformers bf16": lambda: hf_generate(hf, ids, 1),
        "ttft ours GGUF Q8_0": lambda: generate(gg, ids, max_new=1, dtype=torch.bfloat16),
    }
    ours_weights = [t for t in sd.values() if t.ndim == 2]
    for fn in (lambda: generate(ours, ids, max_new=2), lambda: hf_generate(hf, ids, 2),
               lambda: generate(gg, ids, max_new=2, dtype=torch.bfloat16)):
        fn()  # warm-up: short calls of each path
    runs = _common.Runs(a.min_cpu_ratio)
    _common.interleave(cases, a.reps, runs, warmup=0, min_kept=2, max_reps=a.max_reps)
    heads = head_costs(gg)
    names = list(cases)
    cases.clear()  # the closures hold the towers
    ours = hf = gg = sd = ours_weights = None  # free the towers before the memory processes
    mem_new = a.memory_new or new
    mem = {k: memory(k, a.layers, mem_new, gpath, tok) for k in ("ours", "hf", "gguf")}

    med = {k: runs.median(k) for k in names}

    def cpu_median(name):  # CPU seconds of the kept runs: fairer than wall time when other work shares the cores
        kept = sorted(c for w, c in runs.all.get(name, []) if w > 0 and c / w >= runs.min_ratio)
        return kept[len(kept) // 2] if kept else float("nan")

    cpu = {k: cpu_median(k) for k in names}
    rows = []
    for name, ttft in (("ours bf16", "ttft ours bf16"), ("transformers bf16", "ttft transformers bf16"),
                       ("ours GGUF Q8_0 (bf16 compute)", "ttft ours GGUF Q8_0"),
                       ("ours GGUF Q8_0, no copies", "ttft ours GGUF Q8_0")):
        total, first = med[name], med[ttft]
        rows.append([name, total, first, (new - 1) / (total - first), runs.trace(name)])
    bound = med["bare products"]
    rows.append([f"bound: bare products of {new - 1} steps", bound, "", (new - 1) / bound, runs.trace("bare products")])
    body = _common.fmt_table(["case", f"{new} tokens s", "time to first token s", "decode tokens/s",
                              "runs: wall s (CPU/wall)"], rows)
    r_hf = med["transformers bf16"] / med["ours bf16"]
    r_ttft = med["ttft transformers bf16"] / med["ttft ours bf16"]
    r_gguf = med["ours GGUF Q8_0 (bf16 compute)"] / med["ours bf16"]
    r_gguf0 = med["ours GGUF Q8_0, no copies"] / med["ours bf16"]
    decode = {k: (med[k] - med[t]) / bound for k, t in (("ours bf16", "ttft ours bf16"),
                                                         ("transformers bf16", "ttft transformers bf16"))}
    body += (f"\n\n**transformers / ours: {r_hf:.2f}x** the time for {new} tokens (target >= 1.2x); time to first "
             f"token {r_ttft:.2f}x. **GGUF Q8_0 / our bf16: {r_gguf:.2f}x** the time (target <= 1.3x). Greedy tokens "
             f"ours vs transformers (bf16, first 16): {agree}/16 equal. By CPU time: transformers / ours "
             f"{cpu['transformers bf16'] / cpu['ours bf16']:.2f}x, time to first token "
             f"{cpu['ttft transformers bf16'] / cpu['ttft ours bf16']:.2f}x, GGUF Q8_0 / bf16 "
             f"{cpu['ours GGUF Q8_0 (bf16 compute)'] / cpu['ours bf16']:.2f}x. Without room for the per-call copies "
             f"GGUF Q8_0 / bf16 is {r_gguf0:.2f}x. Decode time / the bound (the bare products of the same steps): "
             f"ours {decode['ours bf16']:.2f}x, transformers {decode['transformers bf16']:.2f}x.\n\n")
    mrows = []
    for k, label in (("ours", "ours bf16"), ("hf", "transformers bf16"), ("gguf", "ours GGUF Q8_0")):
        m = mem[k]
        extra = m["peak"] - m["after_load"]
        mrows.append([label, m["weights"] / 2 ** 30, extra / 2 ** 30, (m["weights"] + extra) / m["weights"]])
    if a.min_cpu_ratio < _common.MIN_CPU_RATIO:
        body += (f"Runs kept from CPU time / wall time {a.min_cpu_ratio} on (the house rule is "
                 f"{_common.MIN_CPU_RATIO}): other work kept this machine busy (load average above the core count), so "
                 "single runs get part of the cores: wall-time ratios are noisy, compare the CPU-time ratios.\n\n")
    body += f"Peak memory, {mem_new} new tokens:\n\n"
    body += _common.fmt_table(["peak memory, fresh process", "weights GiB", "generation adds GiB (peak RSS - RSS "
                               "after load)", "(weights + added) / weights"], mrows)
    body += "\n\nGGUF Q8_0 output head, per token (bf16, ms):\n\n" + _common.fmt_table(
        ["head", "ms"], [[k, v] for k, v in heads.items()])
    body += (f"\n\nTower: hidden {cfg.hidden}, {cfg.heads}/{cfg.kv_heads} heads of {cfg.head_dim}, MLP "
             f"{cfg.mlp_hidden}, vocabulary {cfg.vocab}, {cfg.layers} layers; {weights / 2 ** 30:.2f} GiB of bf16 "
             f"weights; {PROMPT}-token prompt; greedy, no stop token.")
    print(body)
    if not a.no_record:
        import transformers
        _common.append_results("Prompt generation: ours vs transformers generate, GGUF Q8_0 vs bf16 (CPU)",
                               "python benchmarks/bench_generate.py" + (f" --layers {a.layers}" if a.layers != 2 else "")
                               + (f" --new {a.new}" if a.new != 128 else "") + (f" --reps {a.reps} --max-reps {a.max_reps}")
                               + (f" --min-cpu-ratio {a.min_cpu_ratio}" if a.min_cpu_ratio != _common.MIN_CPU_RATIO else "")
                               + (f" --memory-new {a.memory_new}" if a.memory_new else ""), body,
                               {"transformers": transformers.__version__})


if __name__ == "__main__":
    main()
