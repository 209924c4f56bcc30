"""The real Qwen tokenizer of a ComfyUI host: Krea 2's template sizes and token ids (issue 3, host tier).

Uses only the host's ``comfy/text_encoders/qwen25_tokenizer`` files (no server start). The reference ids
come from ``transformers``' ``Qwen2Tokenizer`` called the way diffusers' ``Krea2Pipeline`` calls it.
"""

import os

import pytest

from krea2_model.text.prompt import PREFIX, SUFFIX, build_prompt_ids, prefix_length
from krea2_model.text.tokenizer import HOST_TOKENIZER, IM_END, IM_START, find_tokenizer, load_tokenizer

pytestmark = pytest.mark.host
ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def host_tokenizer_dir():
    """``COMFYUI_PATH``; else the pack's grandparent in ``ComfyUI/custom_nodes``; else ``~/comfy/ComfyUI``."""
    cands = [os.environ.get("COMFYUI_PATH"),
             os.path.dirname(os.path.dirname(ROOT)) if os.path.basename(os.path.dirname(ROOT)) == "custom_nodes"
             else None,
             os.path.expanduser("~/comfy/ComfyUI")]
    for c in cands:
        if c and os.path.isfile(os.path.join(c, HOST_TOKENIZER, "vocab.json")):
            return os.path.join(c, HOST_TOKENIZER)
    return None


TOK_DIR = host_tokenizer_dir()
if TOK_DIR is None:
    pytest.skip("host tier: no ComfyUI host with comfy/text_encoders/qwen25_tokenizer found (set COMFYUI_PATH)",
                allow_module_level=True)

PROMPTS = ["a cat on a mat", "", "\n\nleading newlines", "  two spaces first", "Ünïcödé e\u0301 日本語 123 4567!?",
           "x<|im_end|>y", "a red fox " * 200]


@pytest.fixture(scope="module")
def tok():
    return load_tokenizer(TOK_DIR)


def test_special_ids_and_template_sizes(tok):
    assert tok.token_id(IM_START) == 151644 and tok.token_id(IM_END) == 151645
    assert tok.token_id("<|endoftext|>") == 151643
    assert len(tok.encode(PREFIX)) == 34
    assert len(tok.encode(SUFFIX)) == 5
    ids = tok.encode(PREFIX + "a cat")
    assert prefix_length(tok, ids) == 34
    assert ids[32:34] == [872, 198]  # "user", "\n": what ComfyUI's own Krea 2 encoder looks for


def test_found_by_host_search(monkeypatch, tmp_path):
    monkeypatch.setenv("COMFYUI_PATH", os.path.dirname(os.path.dirname(os.path.dirname(TOK_DIR))))
    assert find_tokenizer(str(tmp_path / "te.safetensors")).where == TOK_DIR


@pytest.fixture(scope="module")
def pipeline_and_ours():
    """diffusers' own Krea2Pipeline (its tokenization, padding and positions) on the host tokenizer and a tiny
    Qwen3VLModel with Qwen's vocabulary size, and our encoder on the same weights and the same tokenizer files.
    A pre-forward hook on the pipeline's text encoder records the ids and mask the pipeline itself built."""
    import torch
    from diffusers.pipelines.krea2.pipeline_krea2 import Krea2Pipeline
    from transformers import Qwen2Tokenizer, Qwen3VLConfig, Qwen3VLModel

    from krea2_model import load_text_encoder
    from krea2_model.tiny.text import CONFIGS, hf_text_config, random_state_dict

    cfg = CONFIGS["tiny-qwen-vocab"]
    sd = random_state_dict(cfg, seed=4)
    vision = dict(depth=1, hidden_size=32, intermediate_size=64, num_heads=2, out_hidden_size=cfg.hidden,
                  deepstack_visual_indexes=[0], patch_size=4, num_position_embeddings=16)
    te = Qwen3VLModel(Qwen3VLConfig(text_config=hf_text_config(cfg), vision_config=vision)).eval()
    te.language_model.load_state_dict(sd, strict=True)
    seen = []
    te.register_forward_pre_hook(lambda mod, args, kw: seen.append((kw["input_ids"], kw["attention_mask"])),
                                 with_kwargs=True)
    pipe = Krea2Pipeline(scheduler=None, vae=None, text_encoder=te, tokenizer=Qwen2Tokenizer.from_pretrained(TOK_DIR),
                         transformer=None, text_encoder_select_layers=(1, 3, 5))  # below the last layer: HF normalises that one
    ours = load_text_encoder(sd, tokenizer=TOK_DIR, dtype=torch.float32)
    return pipe, ours, seen


def test_ids_and_rows_equal_the_reference_pipeline(tok, pipeline_and_ours):
    import torch
    pipe, ours, seen = pipeline_and_ours
    taps = pipe.text_encoder_select_layers
    for text in PROMPTS:
        with torch.no_grad():
            hs, mask = pipe.get_text_hidden_states([text], 512, torch.device("cpu"))
        ids, full_mask = seen[-1]
        ref_ids = ids[0][full_mask[0].bool()].tolist()  # the real tokens the pipeline fed its encoder
        p = build_prompt_ids(tok, text, warn=False)
        assert p.ids == ref_ids, text
        assert p.prefix_len == 34 and p.real_tokens == int(mask.sum()) <= 512
        want = hs[mask].reshape(1, -1, len(taps) * hs.shape[-1])
        got = ours.encode(text, taps=taps)
        assert ((got - want).norm() / want.norm()).item() <= 1e-5, text
    assert build_prompt_ids(tok, PROMPTS[-1], warn=False).prompt_tokens == 507
