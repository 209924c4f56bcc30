"""Qwen3-VL text tower, prompt layout and text-encoder files (issue 3).

References are computed here by running ``transformers`` (``Qwen3VLTextModel``, ``Qwen3VLModel``,
``Qwen2Tokenizer``) and diffusers' ``Krea2Pipeline.get_text_hidden_states`` on the same random weights
and the same tiny tokenizer (built with ``tokenizers``; no Qwen vocabulary files in this tier).
"""

import json
import logging
import os
import sys

import pytest
import torch

from krea2_model import (Krea2FileError, MissingTensorsError, NotKrea2Error, PickleRefusedError, ShapeMismatchError,
                         TokenizerNotFoundError, load_text_encoder)
from krea2_model.model.attention import attention
from krea2_model.errors import QuantFormatError, WrongTextEncoderError
from krea2_model.text.prompt import PREFIX, SUFFIX, build_prompt_ids, prefix_length
from krea2_model.text.tokenizer import find_tokenizer, load_tokenizer
from krea2_model.text.qwen3 import DEFAULT_TAPS, Qwen3TextModel
from krea2_model.formats.text_file import TextCheckpoint, load_text_model
from krea2_model.tiny.text import (CONFIGS, LAYOUTS, build_tokenizer, file_name, hf_text_config, random_state_dict,
                                   to_layout, write, write_all)

# transformers and diffusers are pinned test dependencies: imported, so a missing one fails the run
from transformers import Qwen2Tokenizer, Qwen3VLConfig, Qwen3VLModel, Qwen3VLTextConfig, Qwen3VLTextModel  # noqa: E402
from diffusers.pipelines.krea2.pipeline_krea2 import Krea2Pipeline  # noqa: E402


def rel(a, b):
    return ((a.float() - b.float()).norm() / b.float().norm()).item()


def hf_text_model(cfg, sd):
    ref = Qwen3VLTextModel(Qwen3VLTextConfig(**hf_text_config(cfg))).eval()
    ref.load_state_dict(sd, strict=True)
    return ref


def split_taps(x, n):
    """(B, L, n*C) layer-major -> list of n (B, L, C)."""
    return list(x.unflatten(-1, (n, -1)).unbind(-2))


# ----------------------------------------------------------------------------------------------- the tower

@pytest.mark.parametrize("name,taps", [("tiny", (0, 1, 3, 5)), ("tiny-mha", (0, 1, 2))])
def test_taps_equal_transformers_hidden_states(name, taps):
    cfg = CONFIGS[name]
    sd = random_state_dict(cfg, seed=7)
    ref = hf_text_model(cfg, sd)
    ours = load_text_model(sd, dtype=torch.float32)
    ids = torch.randint(0, cfg.vocab, (2, 23), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        want = ref(input_ids=ids, output_hidden_states=True).hidden_states
        got = split_taps(ours(ids, taps), len(taps))
    assert len(want) == cfg.layers + 1
    for t, g in zip(taps, got):
        assert rel(g, want[t]) <= 1e-5, t


def test_bf16_close_to_transformers_bf16():
    cfg = CONFIGS["tiny"]
    sd = random_state_dict(cfg, seed=11)
    ref = hf_text_model(cfg, sd).to(torch.bfloat16)
    ours = load_text_model({k: v.to(torch.bfloat16) for k, v in sd.items()})
    assert ours.layers[0].mlp.up_proj.weight.dtype == torch.bfloat16
    ids = torch.randint(0, cfg.vocab, (1, 30), generator=torch.Generator().manual_seed(4))
    with torch.no_grad():
        want = ref(input_ids=ids, output_hidden_states=True).hidden_states
        got = split_taps(ours(ids, (2, 5)), 2)
    assert got[0].dtype == torch.bfloat16
    for t, g in zip((2, 5), got):
        assert rel(g, want[t]) <= 2e-2


def test_positions_equal_transformers_position_ids():
    """Arbitrary positions (here with a gap): our 1-D RoPE equals HF's mRoPE with equal T/H/W axes."""
    cfg = CONFIGS["tiny"]
    sd = random_state_dict(cfg, seed=8)
    ref, ours = hf_text_model(cfg, sd), load_text_model(sd, dtype=torch.float32)
    ids = torch.randint(0, cfg.vocab, (1, 17), generator=torch.Generator().manual_seed(1))
    pos = torch.arange(17)
    pos[10:] += 300  # RoPE is relative: a gap (not a uniform offset) changes the result
    with torch.no_grad():
        want = ref(input_ids=ids, position_ids=pos.view(1, 1, -1).expand(3, 1, -1),
                   output_hidden_states=True).hidden_states
        got = ours(ids, (2, 4), positions=pos)
        plain = ours(ids, (2, 4))
    for t, g in zip((2, 4), split_taps(got, 2)):
        assert rel(g, want[t]) <= 1e-5
    assert rel(plain, got) > 1e-3  # positions matter: the check above can fail


def test_rope_theta_matters():
    """A wrong rope theta would be caught by the parity tests (they are sensitive to it)."""
    cfg = CONFIGS["tiny"]
    sd = random_state_dict(cfg, seed=9)
    ours = load_text_model(sd, dtype=torch.float32)
    other = Qwen3TextModel(type(cfg)(**{**cfg.__dict__, "rope_theta": 1e6})).eval()
    other.load_state_dict(sd)
    ids = torch.randint(0, cfg.vocab, (1, 40), generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        assert rel(other(ids, (5,)), ours(ids, (5,))) > 1e-4


def test_last_tap_is_before_final_norm_and_later_layers_are_skipped():
    cfg = CONFIGS["tiny"]
    sd = random_state_dict(cfg, seed=10)
    ref, ours = hf_text_model(cfg, sd), load_text_model(sd, dtype=torch.float32)
    ids = torch.randint(0, cfg.vocab, (1, 9), generator=torch.Generator().manual_seed(3))
    pre_norm = {}
    ref.layers[-1].register_forward_hook(lambda m, a, o: pre_norm.setdefault("x", o[0] if isinstance(o, tuple) else o))
    calls = []
    for i, layer in enumerate(ours.layers):
        layer.register_forward_hook(lambda m, a, o, i=i: calls.append(i))
    with torch.no_grad():
        want = ref(input_ids=ids, output_hidden_states=True).hidden_states
        last = ours(ids, (cfg.layers,))
        assert calls == list(range(cfg.layers))
        calls.clear()
        ours(ids, (1, 3))
    assert calls == [0, 1, 2]  # stops after the deepest tap
    assert rel(last, pre_norm["x"]) <= 1e-5
    assert rel(ours.norm(last), want[-1]) <= 1e-5  # HF's last entry is the normed state
    with pytest.raises(ValueError, match="outside 0..6"):
        ours(ids, (7,))


def test_operations_seam_builds_every_linear_and_embedding():
    class Ops:
        class Linear(torch.nn.Linear):
            pass

        class Embedding(torch.nn.Embedding):
            pass

    cfg = CONFIGS["tiny"]
    m = load_text_model(random_state_dict(cfg), dtype=torch.float32, operations=Ops)
    lin = [n for n, x in m.named_modules() if isinstance(x, torch.nn.Linear)]
    assert lin and all(isinstance(m.get_submodule(n), Ops.Linear) for n in lin)
    assert isinstance(m.embed_tokens, Ops.Embedding)
    assert len(lin) == 7 * cfg.layers
    names = set(dict(m.named_parameters()))
    assert {"embed_tokens.weight", "norm.weight", "layers.0.self_attn.q_proj.weight", "layers.0.self_attn.q_norm.weight",
            "layers.0.mlp.gate_proj.weight", "layers.0.input_layernorm.weight",
            "layers.0.post_attention_layernorm.weight"} <= names


# ------------------------------------------------------------------------------------- causal attention

def naive_attention(q, k, v, mask=None, causal=False):
    rep = q.shape[1] // k.shape[1]
    k, v = k.repeat_interleave(rep, 1), v.repeat_interleave(rep, 1)
    s = q @ k.transpose(-1, -2) / q.shape[-1] ** 0.5
    L = q.shape[2]
    allow = torch.ones(L, L, dtype=torch.bool)
    if causal:
        allow = allow.tril()
    allow = allow.view(1, 1, L, L)
    if mask is not None:
        allow = allow & mask
    s = s.masked_fill(~allow, float("-inf"))
    out = s.softmax(-1) @ v
    return out.transpose(1, 2).flatten(2)


@pytest.mark.parametrize("h,hkv", [(4, 4), (4, 2), (6, 1)])
@pytest.mark.parametrize("with_mask", [False, True])
@pytest.mark.parametrize("causal", [False, True])
def test_attention_causal_and_key_mask(h, hkv, with_mask, causal):
    g = torch.Generator().manual_seed(h * 10 + hkv)
    B, L, D = 2, 11, 16
    q, k, v = (torch.randn(B, n, L, D, generator=g) for n in (h, hkv, hkv))
    mask = None
    if with_mask:
        mask = torch.ones(B, 1, 1, L, dtype=torch.bool)
        mask[1, ..., 8:] = False
    want = naive_attention(q, k, v, mask, causal)
    got = attention(q, k, v, mask, is_causal=causal) if causal else attention(q, k, v, mask)
    assert rel(got, want) <= 1e-5


def test_causal_gqa_without_sdpa_enable_gqa(monkeypatch):
    """Older torch (no ``enable_gqa``): the explicit-mask path gives the same result."""
    att = sys.modules["krea2_model.model.attention"]  # the package re-exports a function of the same name
    g = torch.Generator().manual_seed(5)
    q, k, v = (torch.randn(1, n, 13, 16, generator=g) for n in (8, 2, 2))
    want = naive_attention(q, k, v, None, True)
    monkeypatch.setattr(att, "SDPA_HAS_GQA", False)
    assert rel(attention(q, k, v, is_causal=True), want) <= 1e-5


def test_type_error_inside_attention_is_raised_and_switches_nothing_off(monkeypatch):
    """The GQA fast path is chosen from torch's version, once: a TypeError raised inside the kernel call is
    the caller's error (raised), never a reason to switch the fast path off for the rest of the process."""
    att = sys.modules["krea2_model.model.attention"]
    g = torch.Generator().manual_seed(6)
    q, k, v = (torch.randn(1, n, 7, 16, generator=g) for n in (8, 2, 2))
    real = att.F.scaled_dot_product_attention
    try:  # what this torch's kernel really takes, asked of the kernel (not of its version number)
        real(q, k, v, is_causal=True, enable_gqa=True)
        takes_gqa = True
    except TypeError:
        takes_gqa = False
    assert att.SDPA_HAS_GQA == takes_gqa
    calls = []

    def failing(*a, **kw):
        calls.append(kw.get("enable_gqa"))
        raise TypeError("boom inside the kernel")

    monkeypatch.setattr(att.F, "scaled_dot_product_attention", failing)
    with pytest.raises(TypeError, match="boom"):
        attention(q, k, v, is_causal=True)
    monkeypatch.setattr(att.F, "scaled_dot_product_attention", real)
    assert calls == [True]
    seen = []
    monkeypatch.setattr(att.F, "scaled_dot_product_attention", lambda *a, **kw: seen.append(kw) or real(*a, **kw))
    attention(q, k, v, is_causal=True)
    assert seen[0].get("enable_gqa") is True  # the fast path is still the one taken


# ------------------------------------------------------------------------------------ tokenizer + layout

@pytest.fixture(scope="module")
def tok_dir(tmp_path_factory):
    d = str(tmp_path_factory.mktemp("tok") / "tokenizer")
    build_tokenizer(d)
    return d


@pytest.fixture(scope="module")
def vocab_only_dir(tok_dir, tmp_path_factory):
    """The host layout: vocab.json + merges.txt + tokenizer_config.json, no tokenizer.json."""
    d = tmp_path_factory.mktemp("vocab_only")
    for fn in ("vocab.json", "merges.txt", "tokenizer_config.json"):
        (d / fn).write_bytes(open(os.path.join(tok_dir, fn), "rb").read())
    return str(d)


TEXTS = [PREFIX + "a cat on a mat", PREFIX + "\n\n  leading whitespace", PREFIX + " Ünïcödé e\u0301 123 4567!?",
         SUFFIX, "x<|im_end|>y<|endoftext|>", PREFIX + "a" + " a" * 40]


def test_tiny_tokenizer_has_qwen_template_sizes(tok_dir):
    tok = load_tokenizer(tok_dir)
    assert len(tok.encode(PREFIX)) == 34
    assert len(tok.encode(SUFFIX)) == 5
    assert prefix_length(tok, tok.encode(PREFIX + "a cat")) == 34
    assert tok.is_qwen_chat()


def test_tokenizer_files_agree_with_transformers(tok_dir, vocab_only_dir):
    hf = Qwen2Tokenizer.from_pretrained(vocab_only_dir)
    ours_json = load_tokenizer(os.path.join(tok_dir, "tokenizer.json"))
    ours_vocab = load_tokenizer(vocab_only_dir)
    ours_hf = load_tokenizer(hf)
    for t in TEXTS:
        want = hf(t)["input_ids"]
        assert ours_json.encode(t) == want, t
        assert ours_vocab.encode(t) == want, t
        assert ours_hf.encode(t) == want, t


# ---------------------------------------------------------------- unpadded vs the reference padded layout

TAPS = (1, 3, 4)


@pytest.fixture(scope="module")
def reference(tok_dir):
    """diffusers' pipeline with a tiny Qwen3VLModel, and our encoder on the same weights and tokenizer."""
    cfg = CONFIGS["tiny"]
    sd = random_state_dict(cfg, seed=3)
    vision = dict(depth=1, hidden_size=32, intermediate_size=64, num_heads=2, out_hidden_size=cfg.hidden,
                  deepstack_visual_indexes=[0], patch_size=4, num_position_embeddings=16)
    te = Qwen3VLModel(Qwen3VLConfig(text_config=hf_text_config(cfg), vision_config=vision)).eval()
    te.language_model.load_state_dict(sd, strict=True)
    pipe = Krea2Pipeline(scheduler=None, vae=None, text_encoder=te, tokenizer=Qwen2Tokenizer.from_pretrained(tok_dir),
                         transformer=None, text_encoder_select_layers=TAPS)
    ours = load_text_encoder(sd, tokenizer=tok_dir, dtype=torch.float32)
    return cfg, pipe, ours


def reference_rows(pipe, text, cfg):
    with torch.no_grad():
        hs, mask = pipe.get_text_hidden_states([text], 512, torch.device("cpu"))
    assert hs.shape[1] == 512
    return hs[mask].reshape(1, -1, len(TAPS) * cfg.hidden), mask


@pytest.mark.parametrize("case,text,prompt_tokens", [
    ("short", "a cat sits on a red mat under the blue sky", None),
    ("empty", "", 0),
    ("leading-newline", "\n\ntwo dogs near a small house", None),
    ("exactly-507", "a" + " a" * 506, 507),
    ("over-long", "a" + " a" * 599, 600),
])
def test_unpadded_equals_reference_padded(reference, case, text, prompt_tokens, caplog):
    cfg, pipe, ours = reference
    want, mask = reference_rows(pipe, text, cfg)
    with caplog.at_level(logging.WARNING, logger="krea2"):
        got = ours.encode_prompt(text, taps=TAPS)
    if prompt_tokens is not None:
        assert got.prompt_tokens_total == prompt_tokens
    assert got.tokens == min(got.prompt_tokens_total, 507) + 5 == int(mask.sum())
    assert got.cond.shape == (1, got.tokens, len(TAPS) * cfg.hidden)
    assert rel(got.cond, want) <= 1e-5
    warned = [r.getMessage() for r in caplog.records if r.name == "krea2" and r.levelno == logging.WARNING]
    if case == "over-long":
        assert len(warned) == 1 and "600 tokens" in warned[0] and "507" in warned[0] and "93" in warned[0]
    else:
        assert not warned
    assert torch.equal(ours.encode(text, taps=TAPS), got.cond)  # the public contract: the tensor itself


def test_reference_positions_matter(reference):
    """The reference's cumulative positions are what we match: giving the suffix the padded raw index
    (the mistake diffusers warns about) would change the suffix rows, so the parity test can fail."""
    cfg, pipe, ours = reference
    p = ours.prompt_ids("a cat")
    ids = torch.tensor([p.ids])
    pos = torch.arange(len(p.ids))
    pos[-5:] += 541 - (len(p.ids) - 5)  # suffix placed after the padding
    with torch.no_grad():
        shifted = ours.model(ids, TAPS, positions=pos)[:, p.prefix_len:]
    good = ours.encode("a cat", taps=TAPS)
    assert rel(shifted[:, -5:], good[:, -5:]) > 1e-3
    assert rel(shifted[:, :-5], good[:, :-5]) <= 1e-6  # prompt rows: untouched by where the suffix sits


def test_max_tokens_and_prompt_ids(tok_dir):
    tok = load_tokenizer(tok_dir)
    p = build_prompt_ids(tok, "a" + " a" * 20, max_tokens=16, warn=False)
    assert p.prompt_tokens == 11 and p.prompt_tokens_total == 21 and p.real_tokens == 16
    assert p.ids[-5:] == tok.encode(SUFFIX) and p.ids[:34] == tok.encode(PREFIX)
    with pytest.raises(ValueError, match="suffix"):
        build_prompt_ids(tok, "a", max_tokens=4)


def test_default_taps_are_the_reference_pipelines():
    """Our default taps are the layers diffusers' Krea2Pipeline selects when given none (read from a pipeline
    object, not restated here), and the ones our CLIP and nodes use by default."""
    ref = Krea2Pipeline(scheduler=None, vae=None, text_encoder=None, tokenizer=None, transformer=None)
    assert DEFAULT_TAPS == ref.text_encoder_select_layers
    import inspect
    from krea2_model.text.encoder import Krea2TextEncoder
    assert inspect.signature(Krea2TextEncoder.encode).parameters["taps"].default == ref.text_encoder_select_layers


# ----------------------------------------------------------------------------------------------- layouts

@pytest.fixture(scope="module")
def tiny_files(tmp_path_factory):
    out = str(tmp_path_factory.mktemp("tiny_text"))
    return out, write_all(out, "tiny", seed=5)


def test_every_layout_gives_identical_tensors(tiny_files):
    out, paths = tiny_files
    assert set(paths) == set(LAYOUTS)
    base_sd = random_state_dict(CONFIGS["tiny"], seed=5)
    results = {}
    for layout, path in paths.items():
        enc = load_text_encoder(path, dtype=torch.float32)  # tokenizer found beside / inside
        sd = enc.model.state_dict()
        assert sd.keys() == base_sd.keys()
        for k, v in base_sd.items():
            assert torch.equal(sd[k], v), (layout, k)
        assert enc.config == CONFIGS["tiny"]
        results[layout] = enc.encode("a cat on a mat", taps=(1, 3, 4))
    first = results["full"]
    for layout, c in results.items():
        assert torch.equal(c, first), layout


def test_legacy_scaled_fp8_format(tok_dir):
    """ComfyUI's older scaled-fp8 files: a ``scaled_fp8`` marker and ``.scale_weight``/``.scale_input``."""
    cfg = CONFIGS["tiny"]
    base = random_state_dict(cfg, seed=6)
    sd = {}
    for k, v in to_layout(base, "full-fp8", cfg).items():
        if k.endswith(".comfy_quant"):
            continue
        sd[k.replace(".weight_scale", ".scale_weight").replace(".input_scale", ".scale_input")] = v
    sd["scaled_fp8"] = torch.zeros(2, dtype=torch.float8_e4m3fn)
    m = load_text_model(sd, dtype=torch.float32)
    for k, v in base.items():
        assert torch.equal(m.state_dict()[k], v), k


def test_default_dtype_keeps_stored_dtype(tiny_files):
    out, paths = tiny_files
    fp8 = load_text_model(paths["full-fp8"])
    assert fp8.layers[0].self_attn.q_proj.weight.dtype == torch.bfloat16
    assert fp8.embed_tokens.weight.dtype == torch.bfloat16
    bf = load_text_model(paths["full"], dtype=torch.bfloat16)
    for k, v in bf.state_dict().items():
        assert torch.equal(v, fp8.state_dict()[k]), k
    assert load_text_model(paths["full"]).norm.weight.dtype == torch.float32


def test_layout_detection(tiny_files):
    out, paths = tiny_files
    got = {lay: (TextCheckpoint(p).layout, TextCheckpoint(p).prefix) for lay, p in paths.items()}
    assert got["full"] == ("full", "model.language_model.")
    assert got["full-fp8"] == ("full", "model.language_model.")
    assert got["full-legacy"] == ("full", "model.")
    assert got["text"] == ("text", "model.")
    assert got["bare"] == ("text", "")
    assert got["hf-folder"] == ("hf-folder", "model.language_model.")


def test_hf_config_sets_eps_and_theta(tmp_path, tok_dir):
    cfg = CONFIGS["tiny"]
    sd = random_state_dict(cfg, seed=2)
    folder = write(sd, str(tmp_path / "hf"), "hf-folder", cfg, tokenizer_dir=tok_dir)
    conf_path = os.path.join(folder, "config.json")
    conf = json.load(open(conf_path))
    conf["text_config"]["rms_norm_eps"] = 1e-5
    conf["text_config"]["rope_parameters"]["rope_theta"] = 1e6
    json.dump(conf, open(conf_path, "w"))
    ck = TextCheckpoint(folder)
    assert ck.config.eps == 1e-5 and ck.config.rope_theta == 1e6


# ------------------------------------------------------------------------------------------ refusals

def save(tmp_path, name, tensors):
    from safetensors.torch import save_file
    p = str(tmp_path / name)
    save_file(tensors, p)
    return p


def small(*shape):
    return torch.zeros(*shape)


def test_refuses_qwen25(tmp_path):
    p = save(tmp_path, "qwen_2.5_vl_7b.safetensors", {
        "model.embed_tokens.weight": small(10, 8), "model.layers.0.self_attn.q_proj.weight": small(8, 8),
        "model.layers.0.self_attn.k_proj.weight": small(4, 8), "model.layers.0.self_attn.k_proj.bias": small(4),
        "visual.blocks.0.attn.qkv.weight": small(6, 2)})
    with pytest.raises(WrongTextEncoderError, match=r"another Qwen: Qwen2 / Qwen2\.5"):
        load_text_encoder(p)


def test_refuses_qwen35(tmp_path):
    p = save(tmp_path, "qwen35.safetensors", {
        "model.language_model.layers.0.linear_attn.A_log": small(2),
        "model.language_model.layers.0.input_layernorm.weight": small(8)})
    with pytest.raises(WrongTextEncoderError, match="another Qwen: Qwen3.5"):
        load_text_encoder(p)


def test_refuses_vision_only(tmp_path):
    sd = {"model.visual.patch_embed.proj.weight": small(4, 3, 2, 4, 4),
          "model.visual.deepstack_merger_list.0.norm.weight": small(8)}
    p = save(tmp_path, "vision.safetensors", sd)
    with pytest.raises(WrongTextEncoderError, match="vision tower only"):
        load_text_encoder(p)


def test_refuses_krea2_transformer(tmp_path):
    from krea2_model.tiny.transformer import CONFIGS as TCONFIGS, random_state_dict as t_sd
    p = save(tmp_path, "krea2_raw.safetensors", t_sd(TCONFIGS["tiny"]))
    with pytest.raises(WrongTextEncoderError, match="not a Qwen text model.*Krea 2 transformer.*Krea2ModelLoader"):
        load_text_encoder(p)


@pytest.mark.parametrize("keys,what", [
    (["text_model.encoder.layers.0.mlp.fc1.weight"], "a CLIP text encoder"),
    (["encoder.block.0.layer.0.SelfAttention.k.weight"], "a T5 text encoder"),
    (["encoder.down.0.block.0.conv1.weight", "decoder.conv_in.weight"], "a VAE"),
])
def test_refuses_not_a_text_model(tmp_path, keys, what):
    p = save(tmp_path, "x.safetensors", {k: small(2, 2) for k in keys})
    with pytest.raises(WrongTextEncoderError, match=f"not a Qwen text model.*It looks like {what}"):
        load_text_encoder(p)


def test_refuses_gemma_llama_and_moe(tmp_path):
    base = {"model.embed_tokens.weight": small(10, 8), "model.layers.0.self_attn.q_proj.weight": small(8, 8)}
    p = save(tmp_path, "gemma.safetensors", {**base, "model.layers.0.post_feedforward_layernorm.weight": small(8),
                                             "model.layers.0.self_attn.q_norm.weight": small(4)})
    with pytest.raises(WrongTextEncoderError, match="Gemma"):
        load_text_encoder(p)
    p = save(tmp_path, "llama.safetensors", base)
    with pytest.raises(WrongTextEncoderError, match="no q/k norm"):
        load_text_encoder(p)
    p = save(tmp_path, "moe.safetensors", {**base, "model.layers.0.self_attn.q_norm.weight": small(4),
                                           "model.layers.0.mlp.experts.0.gate_proj.weight": small(4, 8)})
    with pytest.raises(WrongTextEncoderError, match="mixture-of-experts"):
        load_text_encoder(p)


def test_refuses_plain_qwen3_folder(tmp_path, tok_dir):
    folder = write(random_state_dict(CONFIGS["tiny"]), str(tmp_path / "Qwen3-4B"), "hf-folder", CONFIGS["tiny"])
    conf = json.load(open(os.path.join(folder, "config.json")))
    conf["model_type"] = "qwen3"
    json.dump(conf, open(os.path.join(folder, "config.json"), "w"))
    with pytest.raises(WrongTextEncoderError, match="model_type 'qwen3', not Qwen3-VL"):
        load_text_encoder(folder, tokenizer=tok_dir)


def test_refuses_pickle_and_truncated(tmp_path, tiny_files):
    pt = tmp_path / "qwen3vl.pt"
    torch.save({"a": torch.zeros(1)}, str(pt))
    with pytest.raises(PickleRefusedError, match="never unpickle"):
        load_text_encoder(str(pt))
    src = tiny_files[1]["text"]
    data = open(src, "rb").read()
    cut = tmp_path / "cut.safetensors"
    cut.write_bytes(data[: len(data) // 2])
    with pytest.raises(Krea2FileError, match="truncated"):
        load_text_encoder(str(cut))


def test_missing_and_misshapen_tensors(tmp_path, tok_dir):
    cfg = CONFIGS["tiny"]
    sd = to_layout(random_state_dict(cfg), "text", cfg)
    miss = dict(sd)
    del miss["model.layers.2.mlp.up_proj.weight"]
    with pytest.raises(MissingTensorsError, match=r"1 of the .* missing.*model\.layers\.2\.mlp\.up_proj\.weight"):
        load_text_encoder(miss, tokenizer=tok_dir)
    bad = dict(sd)
    bad["model.layers.1.self_attn.k_proj.weight"] = torch.zeros(48, 64)
    with pytest.raises(ShapeMismatchError, match=r"'model\.layers\.1\.self_attn\.k_proj\.weight' has shape \[48, 64\], "
                                                 r"expected \[32, 64\]"):
        load_text_encoder(bad, tokenizer=tok_dir)


def test_refuses_unsupported_quantization(tmp_path, tok_dir):
    cfg = CONFIGS["tiny"]
    sd = to_layout(random_state_dict(cfg), "full-fp8", cfg)
    k = "model.language_model.layers.0.mlp.up_proj.comfy_quant"
    sd[k] = torch.tensor(list(json.dumps({"format": "nvfp4"}).encode()), dtype=torch.uint8)
    with pytest.raises(QuantFormatError, match="'nvfp4' quantization") as e:
        load_text_encoder(sd, tokenizer=tok_dir)
    assert "layers.0.mlp.up_proj.weight" in str(e.value)


def test_all_refusals_are_not_krea2_errors():
    assert issubclass(WrongTextEncoderError, NotKrea2Error)


# ------------------------------------------------------------------------------------------ tokenizer search

def isolate_host(monkeypatch, tmp_path):
    monkeypatch.delenv("COMFYUI_PATH", raising=False)
    monkeypatch.setattr(sys, "path", [p for p in sys.path if p and not os.path.isdir(
        os.path.join(p, "comfy", "text_encoders", "qwen25_tokenizer"))])
    monkeypatch.delitem(sys.modules, "comfy", raising=False)
    monkeypatch.chdir(tmp_path)


def test_tokenizer_not_found_is_a_clear_error(tmp_path, monkeypatch):
    isolate_host(monkeypatch, tmp_path)
    d = tmp_path / "models"
    d.mkdir()
    p = write(random_state_dict(CONFIGS["tiny"]), str(d / "qwen3vl_tiny.safetensors"), "text")
    with pytest.raises(TokenizerNotFoundError, match="no Qwen tokenizer found.*qwen25_tokenizer.*Looked in: " +
                       str(d).replace("\\", "\\\\")):
        load_text_encoder(p)


def test_non_qwen_tokenizer_beside_is_skipped(tmp_path, monkeypatch):
    isolate_host(monkeypatch, tmp_path)
    from tokenizers import Tokenizer
    from tokenizers.models import WordLevel
    d = tmp_path / "models"
    d.mkdir()
    Tokenizer(WordLevel({"a": 0, "[UNK]": 1}, unk_token="[UNK]")).save(str(d / "tokenizer.json"))
    p = write(random_state_dict(CONFIGS["tiny"]), str(d / "te.safetensors"), "text")
    with pytest.raises(TokenizerNotFoundError, match="Skipped: .*not a Qwen chat tokenizer"):
        load_text_encoder(p)


def test_vocab_without_config(tmp_path, vocab_only_dir):
    """vocab.json + merges.txt alone: Qwen's chat tokens follow the vocabulary; a CLIP-style vocabulary is refused."""
    d = tmp_path / "qwen"
    d.mkdir()
    for fn in ("vocab.json", "merges.txt"):
        (d / fn).write_bytes(open(os.path.join(vocab_only_dir, fn), "rb").read())
    assert load_tokenizer(str(d)).encode(PREFIX + "a cat") == load_tokenizer(vocab_only_dir).encode(PREFIX + "a cat")
    c = tmp_path / "clip"
    c.mkdir()
    (c / "vocab.json").write_text(json.dumps({"t": 0, "h": 1, "e": 2, "the</w>": 3}))
    (c / "merges.txt").write_text("#version: 0.2\nt h\nth e</w>\n")
    with pytest.raises(TokenizerNotFoundError, match="not a byte-level BPE vocabulary"):
        load_tokenizer(str(c))


def test_host_tokenizer_fallback(tmp_path, monkeypatch, vocab_only_dir):
    isolate_host(monkeypatch, tmp_path)
    root = tmp_path / "ComfyUI"
    host_tok = root / "comfy" / "text_encoders" / "qwen25_tokenizer"
    host_tok.mkdir(parents=True)
    for fn in os.listdir(vocab_only_dir):
        (host_tok / fn).write_bytes(open(os.path.join(vocab_only_dir, fn), "rb").read())
    d = tmp_path / "models"
    d.mkdir()
    p = write(random_state_dict(CONFIGS["tiny"]), str(d / "te.safetensors"), "text")
    monkeypatch.setattr(sys, "path", sys.path + [str(root)])
    enc = load_text_encoder(p)
    assert enc.tokenizer.where == str(host_tok)
    assert enc.encode_prompt("a cat", taps=(1,)).tokens == enc.encode("a cat", taps=(1,)).shape[1] == 7
    monkeypatch.setenv("COMFYUI_PATH", str(root))
    assert find_tokenizer(p).where == str(host_tok)


def test_tokenizer_model_mismatch(tmp_path, tok_dir):
    cfg = type(CONFIGS["tiny"])(**{**CONFIGS["tiny"].__dict__, "vocab": 100})
    enc = load_text_encoder(random_state_dict(cfg), tokenizer=tok_dir)
    with pytest.raises(ShapeMismatchError, match="do not belong together"):
        enc.encode("a cat", taps=(1,))


def test_tiny_text_cli(tmp_path):
    from krea2_model.tiny.text import main
    main(["--out", str(tmp_path), "--layout", "text", "--config", "tiny-mha"])
    p = tmp_path / file_name("tiny-mha", "text")
    assert p.is_file() and (tmp_path / "tokenizer" / "vocab.json").is_file()
    assert load_text_encoder(str(p)).config == CONFIGS["tiny-mha"]


def test_prefix_reuse_is_exact_and_invalidated_by_weight_changes(reference):
    """The template prefix's keys/values are computed once; results equal a full run, for a second prompt
    too, and a weight change (a LoRA patch) is never served stale prefix states."""
    cfg, pipe, ours = reference
    full = []
    ours.reuse_prefix = False
    try:
        for t in ("a red fox", "a blue bird on a branch"):
            full.append(ours.encode(t, taps=TAPS))
    finally:
        ours.reuse_prefix = True
    ours.model._prefix_cache = None
    for t, want in zip(("a red fox", "a blue bird on a branch"), full):
        got = ours.encode(t, taps=TAPS)
        assert got.shape == want.shape and rel(got, want) <= 1e-6
    cached_key = ours.model._prefix_cache[0]
    w = ours.model.layers[0].self_attn.v_proj.weight  # (k_proj would be undone by the k norm)
    with torch.no_grad():
        w.mul_(1.5)  # in place, as a host's weight patch may do
    try:
        changed = ours.encode("a red fox", taps=TAPS)
        assert ours.model._prefix_cache[0] != cached_key
        ours.reuse_prefix = False
        assert rel(changed, ours.encode("a red fox", taps=TAPS)) <= 1e-6
        assert rel(changed, full[0]) > 1e-3
    finally:
        ours.reuse_prefix = True
        with torch.no_grad():
            w.div_(1.5)


def test_templated_prompt_span_finds_the_prompt_in_another_tokenizers_ids():
    """What Krea2TextEncode uses to cut core's Krea 2 tokens to the reference limit."""
    from krea2_model.text.prompt import IM_END_ID, IM_START_ID, NEWLINE_ID, USER_ID, templated_prompt_span
    system = [IM_START_ID, 8948, NEWLINE_ID, 11, 12, 13, IM_END_ID, NEWLINE_ID]
    suffix = [IM_END_ID, NEWLINE_ID, IM_START_ID, 77091, NEWLINE_ID]
    prompt = [101, 102, 103, 104]
    ids = system + [IM_START_ID, USER_ID, NEWLINE_ID] + prompt + suffix
    s = templated_prompt_span(ids)
    assert s is not None and ids[s[0]:s[1]] == prompt
    merged = system + [IM_START_ID, USER_ID, 999] + prompt + suffix  # newline merged into the prompt's 1st token
    s = templated_prompt_span(merged)
    assert merged[s[0]:s[1]] == [999] + prompt
    empty = system + [IM_START_ID, USER_ID, NEWLINE_ID] + suffix
    assert templated_prompt_span(empty) == (len(empty) - 5, len(empty) - 5)
    assert templated_prompt_span(prompt + suffix) is None           # no template around it
    assert templated_prompt_span(ids[:-1]) is None                  # no assistant suffix
    assert templated_prompt_span([t if t != USER_ID else 1 for t in ids]) is None  # second turn is not the user's


def test_attention_has_no_process_wide_switch():
    """``set_attention_backend`` was exported and documented but never used: a process-wide switch would route every
    model's attention (a host's and another pack's alike). A host's attention is per model (``attention_backend``)."""
    import krea2_model
    att = sys.modules["krea2_model.model.attention"]
    assert not hasattr(krea2_model, "set_attention_backend") and not hasattr(att, "set_attention_backend")
    assert not hasattr(att, "_backend")
