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


def test_ids_equal_the_reference_layout(tok):
    transformers = pytest.importorskip("transformers")
    hf = transformers.Qwen2Tokenizer.from_pretrained(TOK_DIR)
    for text in PROMPTS:
        assert tok.encode(PREFIX + text) == hf(PREFIX + text)["input_ids"], text
        # diffusers' Krea2Pipeline: pad to 512 + 34 - 5, suffix after the padding; keep the unmasked ids
        t = hf([PREFIX + text], truncation=True, padding="max_length", max_length=541)
        s = hf([SUFFIX])
        ref = [i for i, m in zip(t["input_ids"][0] + s["input_ids"][0], t["attention_mask"][0] + s["attention_mask"][0])
               if m]
        p = build_prompt_ids(tok, text, warn=False)
        assert p.ids == ref, text
        assert p.prefix_len == 34 and p.real_tokens == len(ref) - 34 <= 512
    assert build_prompt_ids(tok, PROMPTS[-1], warn=False).prompt_tokens == 507
