"""Prompt encoding with one 384 x 384 image: ours vs transformers' Qwen3VLModel, one run, one machine.

    python benchmarks/bench_vision.py [--reps N] [--max-reps M] [--no-record]

Both run the same random weights on the same tokens (Krea 2's template, ``Picture 1:`` + 144 image tokens +
a short prompt), the same pixel values and the same taps, and give the same rows (checked before timing):

* ours: ``Krea2TextEncoder.encode(text, images=[image])`` (vision tower, M-RoPE, DeepStack; image
  preparation included);
* transformers: ``Qwen3VLModel(input_ids, pixel_values, image_grid_thw, mm_token_type_ids,
  output_hidden_states=True)`` with the pixel values prepared once outside the timing (its processor's
  cost is not counted, which favours it).

On CPU both towers are reduced ("tiny-to-medium": the text tower is ``tiny_text.CONFIGS['bench']``, hidden
1024 x 12 layers with Qwen3-VL-4B's 128-wide heads; the vision tower hidden 512 x 8 blocks, 8 heads, MLP 2048,
patch 16, merge 2, DeepStack after blocks 1, 3, 5). fp32. Runs under CPU/wall 1.85 are dropped (see
``_common``); the median ratio is appended to ``benchmarks/RESULTS.md``.
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import tempfile

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import _common  # noqa: E402

_common.pin()

import torch  # noqa: E402

from krea2_model import load_text_encoder  # noqa: E402
from krea2_model.text import images as I  # noqa: E402
from krea2_model.text.encoder import image_token_counts  # noqa: E402
from krea2_model.text.prompt import PREFIX, SUFFIX, image_labels  # noqa: E402
from krea2_model.tiny.text import CONFIGS, build_tokenizer, hf_text_config  # noqa: E402

TAPS = (2, 5, 8, 11)
VISION = dict(depth=8, hidden_size=512, intermediate_size=2048, num_heads=8, patch_size=16, temporal_patch_size=2,
              spatial_merge_size=2, num_position_embeddings=2304, deepstack_visual_indexes=[1, 3, 5], in_channels=3)
TEXT = "turn it into a watercolour painting of a lighthouse at dusk"


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--reps", type=int, default=5)
    ap.add_argument("--max-reps", type=int, default=30)
    ap.add_argument("--no-record", action="store_true")
    a = ap.parse_args()
    torch.set_num_threads(_common.THREADS)
    import json
    import numpy as np
    from safetensors.torch import save_file
    from transformers import Qwen2Tokenizer, Qwen3VLConfig, Qwen3VLModel
    from transformers.models.qwen2_vl.image_processing_pil_qwen2_vl import Qwen2VLImageProcessorPil

    cfg = CONFIGS["bench"]
    work = tempfile.mkdtemp(prefix="krea2_bench_vision_")
    tok_dir = os.path.join(work, "tokenizer")
    build_tokenizer(tok_dir)
    hf_tok = Qwen2Tokenizer.from_pretrained(tok_dir)
    ids = {t: hf_tok.convert_tokens_to_ids(t) for t in ("<|vision_start|>", "<|image_pad|>", "<|vision_end|>")}
    torch.manual_seed(0)
    conf = Qwen3VLConfig(text_config=hf_text_config(cfg), vision_config=dict(VISION, out_hidden_size=cfg.hidden),
                         image_token_id=ids["<|image_pad|>"], vision_start_token_id=ids["<|vision_start|>"],
                         vision_end_token_id=ids["<|vision_end|>"], video_token_id=ids["<|image_pad|>"] + 1000)
    ref = Qwen3VLModel(conf).eval()
    folder = os.path.join(work, "qwen3vl_bench")
    os.makedirs(folder)
    save_file({"model." + k: v.contiguous() for k, v in ref.state_dict().items()},
              os.path.join(folder, "model.safetensors"))
    with open(os.path.join(folder, "config.json"), "w") as f:
        json.dump({"model_type": "qwen3_vl", "text_config": hf_text_config(cfg),
                   "vision_config": dict(VISION, out_hidden_size=cfg.hidden)}, f)
    ours = load_text_encoder(folder, tokenizer=tok_dir, dtype=torch.float32)
    image = torch.rand(1, 384, 384, 3, generator=torch.Generator().manual_seed(1))

    proc = Qwen2VLImageProcessorPil(patch_size=16, merge_size=2, temporal_patch_size=2, image_mean=[0.5] * 3,
                                    image_std=[0.5] * 3, do_resize=False, do_rescale=False)
    px = proc(images=[image[0].numpy().astype(np.float32)], return_tensors="pt", input_data_format="channels_last")
    counts = image_token_counts([I.prepare(image)])
    tokens = hf_tok(PREFIX + image_labels(1) + TEXT + SUFFIX)["input_ids"]
    pad = ids["<|image_pad|>"]
    expanded = [x for t in tokens for x in ([t] * counts[0] if t == pad else [t])]
    input_ids = torch.tensor([expanded])
    mm = (input_ids == pad).int()

    def run_ours():
        return ours.encode(TEXT, images=[image], taps=TAPS)

    def run_hf():
        with torch.no_grad():
            out = ref(input_ids=input_ids, pixel_values=px["pixel_values"], image_grid_thw=px["image_grid_thw"],
                      mm_token_type_ids=mm, output_hidden_states=True)
        return torch.cat([out.hidden_states[t] for t in TAPS], dim=-1)[:, 34:]

    got, want = run_ours(), run_hf()
    err = ((got - want).norm() / want.norm()).item()
    print(f"rows {got.shape[1]} ({counts[0]} image tokens); rel. error vs transformers {err:.2e}")
    assert err <= 1e-5
    cases = {"ours": run_ours, "transformers Qwen3VLModel": run_hf}
    runs = _common.Runs()
    _common.interleave(cases, a.reps, runs, warmup=1, min_kept=5, max_reps=a.max_reps)

    def cpu_median(name):
        return statistics.median(c for _, c in runs.all[name])

    rows = [[n, runs.median(n), runs.median(n) / runs.median("ours"), f"{len(runs.kept(n))}/{len(runs.all[n])}",
             cpu_median(n), cpu_median(n) / cpu_median("ours")] for n in cases]
    table = _common.fmt_table(["case", "median wall s (kept runs)", "wall x ours", "runs kept",
                               "median CPU s (all runs)", "CPU x ours"], rows)
    wall_ok = all(len(runs.kept(n)) >= 5 for n in cases)
    r = {row[0]: row for row in rows}
    head = (f"**transformers / ours = {r['transformers Qwen3VLModel'][2]:.2f}x wall** (CPU time "
            f"{r['transformers Qwen3VLModel'][5]:.2f}x)" if wall_ok else
            f"**transformers / ours = {r['transformers Qwen3VLModel'][5]:.2f}x in CPU time** (too few runs reached "
            f"CPU/wall {_common.MIN_CPU_RATIO} on this shared machine, so no wall ratio)")
    trace = "\n".join(f"- {n}: {runs.trace(n)}" for n in cases)
    body = (f"One 384x384 image ({counts[0]} vision tokens) + a {len(hf_tok(TEXT)['input_ids'])}-token prompt; text "
            f"tower `bench` (hidden {cfg.hidden}, {cfg.layers} layers), vision tower hidden {VISION['hidden_size']} x "
            f"{VISION['depth']} blocks; fp32; taps {TAPS}; same rows (rel. error {err:.1e}).\n\n{table}\n\n{head}.\n\n"
            f"Every run, wall s (CPU/wall; x = dropped):\n{trace}")
    print(table)
    if not a.no_record:
        import transformers
        _common.append_results("Text encoder with one image: ours vs transformers Qwen3VLModel (CPU)",
                               "python benchmarks/bench_vision.py", body, {"transformers": transformers.__version__})


if __name__ == "__main__":
    main()
