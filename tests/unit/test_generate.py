"""Prompt generation (TextGenerate's path, issue 20) on every text-encoder file we load, against transformers.

The reference is transformers' own ``Qwen3VLForConditionalGeneration.generate(do_sample=False)`` on the same
weights (for quantized files: the weights the file dequantizes to, by the ``gguf`` package for GGUF files),
with its own tokenizer and, for image prompts, its own Qwen2-VL image processor. Our side loads the file
itself through ``load_text_encoder``.
"""

import json

import pytest
import torch
from transformers import Qwen2Tokenizer, Qwen3VLConfig, Qwen3VLForConditionalGeneration

import gguf  # noqa: F401  (the GGUF reference; a test dependency)

from krea2_model import load_text_encoder
from krea2_model.formats.gguf import llama_cpp_to_canonical
from krea2_model.text import generate as G
from krea2_model.text.qwen3 import KVCache
from krea2_model.text.tokenizer import IMAGE_PAD, VISION_END, VISION_START
from krea2_model.tiny import gguf as tiny_gguf
from tests.unit.test_vision import reference_generate  # the same transformers reference as the vision tests
from krea2_model.tiny import text as tiny_text

CFG = tiny_text.CONFIGS["tiny"]
PROMPT = "describe a cat"
NEW = 12


def hf_vision_config(v, out_hidden):
    return dict(depth=v.depth, hidden_size=v.hidden, intermediate_size=v.mlp_hidden, num_heads=v.heads,
                patch_size=v.patch, temporal_patch_size=v.temporal_patch, spatial_merge_size=v.merge,
                num_position_embeddings=v.positions, deepstack_visual_indexes=list(v.deepstack),
                in_channels=v.in_channels, out_hidden_size=out_hidden)


def hf_model(text_sd: dict, cfg, hf_tok, vision_sd: dict | None = None):
    """transformers' Qwen3-VL with our canonical text weights ``text_sd`` (and vision weights), head tied."""
    ids = {t: hf_tok.convert_tokens_to_ids(t) for t in (VISION_START, IMAGE_PAD, VISION_END)}
    vcfg = tiny_text.tiny_vision_config(cfg)
    conf = Qwen3VLConfig(text_config=tiny_text.hf_text_config(cfg), vision_config=hf_vision_config(vcfg, cfg.hidden),
                         image_token_id=ids[IMAGE_PAD], vision_start_token_id=ids[VISION_START],
                         vision_end_token_id=ids[VISION_END], video_token_id=ids[IMAGE_PAD] + 1000,
                         tie_word_embeddings=True)
    full = Qwen3VLForConditionalGeneration(conf).eval()
    sd = {"model.language_model." + k: v.float() for k, v in text_sd.items()}
    sd["lm_head.weight"] = text_sd["embed_tokens.weight"].float()
    if vision_sd is not None:
        sd.update({"model.visual." + k: v.float() for k, v in vision_sd.items()})
    missing, unexpected = full.load_state_dict(sd, strict=False)
    assert not unexpected, unexpected[:3]
    assert (not missing) if vision_sd is not None else all(k.startswith("model.visual.") for k in missing), missing[:3]
    return full




def image(h, w, seed):
    return torch.rand(1, h, w, 3, generator=torch.Generator().manual_seed(seed))


@pytest.fixture(scope="module")
def tok_dir(tmp_path_factory):
    d = str(tmp_path_factory.mktemp("gtok") / "tokenizer")
    tiny_text.build_tokenizer(d)
    return d


@pytest.fixture(scope="module")
def hf_tok(tok_dir):
    return Qwen2Tokenizer.from_pretrained(tok_dir)


@pytest.fixture(scope="module")
def weights():
    sd = tiny_text.random_state_dict(CFG, seed=4)
    vision = tiny_text.random_vision_state_dict(tiny_text.tiny_vision_config(CFG), seed=5)
    return sd, vision


def _save(tensors, path):
    from safetensors.torch import save_file
    save_file({k: v.contiguous() for k, v in tensors.items()}, str(path))
    return str(path)


def _int8_tensorwise(sd):
    """``sd``'s text tower with every Linear stored as ComfyUI's ``int8_tensorwise`` (per-tensor scale), and the
    canonical float weights those bytes stand for."""
    out, real = {}, {}
    conf = torch.tensor(list(json.dumps({"format": "int8_tensorwise"}).encode()), dtype=torch.uint8)
    for k, v in sd.items():
        key = "model." + k
        if tiny_text._is_linear(k):
            s = v.abs().max() / 127.0
            q = torch.round(v / s).clamp(-127, 127).to(torch.int8)
            base = key[:-len(".weight")]
            out[key], out[base + ".weight_scale"], out[base + ".comfy_quant"] = q, s.float(), conf.clone()
            real[k] = q.float() * s.float()
        else:
            out[key] = v.to(torch.bfloat16)
            real[k] = v.to(torch.bfloat16).float()
    return out, real


@pytest.fixture(scope="module")
def files(tmp_path_factory, weights, tok_dir):
    """Every safetensors kind, with the canonical text weights each dequantizes to and its vision weights."""
    sd, vision = weights
    d = tmp_path_factory.mktemp("gfiles")
    out = {}
    bf16 = {k: v.to(torch.bfloat16) for k, v in tiny_text.to_layout(sd, "full-vl", CFG).items()}
    out["bf16-full-vl"] = (_save(bf16, d / "bf16.safetensors"), sd, vision)
    fp8 = {k: v for k, v in tiny_text.to_layout(sd, "full-fp8", CFG).items() if not k.startswith("model.visual.")}
    fp8.update({"model.visual." + k: v.to(torch.bfloat16) for k, v in vision.items()})
    out["fp8-scaled-full-vl"] = (_save(fp8, d / "fp8.safetensors"), sd, vision)
    int8, real = _int8_tensorwise(sd)
    out["int8-text-only"] = (_save(int8, d / "int8.safetensors"), real, None)
    return out


@pytest.mark.parametrize("kind,with_image", [("bf16-full-vl", False), ("bf16-full-vl", True),
                                             ("fp8-scaled-full-vl", False), ("fp8-scaled-full-vl", True),
                                             ("int8-text-only", False)])
def test_greedy_equals_transformers_on_every_safetensors_kind(files, tok_dir, hf_tok, kind, with_image):
    path, real, vision = files[kind]
    ours = load_text_encoder(path, tokenizer=tok_dir, dtype=torch.float32)
    full = hf_model(real, CFG, hf_tok, vision)
    imgs = [image(64, 96, 5)] if with_image else []
    want = reference_generate(full, hf_tok, PROMPT, imgs, NEW)
    got = ours.generate_ids(PROMPT, imgs, max_new=NEW)
    assert len(want) >= 2 and got == want, (kind, got, want)


def _gguf_reference_sd(path):
    from tests.unit.test_gguf import _reference_state_dict
    return _reference_state_dict(path, llama_cpp_to_canonical)


@pytest.mark.parametrize("qtype", ["Q8_0", "Q4_0", "Q4_K", "Q6_K", "IQ4_XS"])
def test_greedy_equals_transformers_on_gguf(tmp_path, qtype):
    """Before issue 20 this crashed: the head multiplied by the table's raw GGUF bytes."""
    path = str(tmp_path / f"qwen3vl_{qtype}.gguf")
    used = tiny_gguf.write_text(path, "gguf", qtype, seed=6)
    assert used["token_embd.weight"] not in ("F32", "F16", "BF16")  # the table is kept as blocks
    cfg = tiny_gguf.TEXT_CONFIGS["gguf"]
    tok_dir = str(tmp_path / "tokenizer")
    hf_tok = Qwen2Tokenizer.from_pretrained(tok_dir)
    ours = load_text_encoder(path)
    assert ours.model.embed_tokens.weight.dtype == torch.uint8
    full = hf_model(_gguf_reference_sd(path), cfg, hf_tok)
    want = reference_generate(full, hf_tok, PROMPT, [], NEW)
    got = ours.generate_ids(PROMPT, max_new=NEW)
    assert len(want) >= 2 and got == want, (qtype, got, want)


def test_gguf_head_is_dequantized_once_per_call_and_the_prompt_prefilled_once(tmp_path, monkeypatch):
    path = str(tmp_path / "q.gguf")
    tiny_gguf.write_text(path, "gguf", "Q8_0", seed=6)
    ours = load_text_encoder(path)
    from krea2_model.formats import gguf_ops
    calls = []
    real = gguf_ops.gguf_weight

    def counting(mod, device, dtype):
        if mod is ours.model.embed_tokens:
            calls.append(dtype)
        return real(mod, device, dtype)

    monkeypatch.setattr(gguf_ops, "gguf_weight", counting)
    lengths = []
    hook = ours.model.layers[0].register_forward_pre_hook(lambda m, args: lengths.append(args[0].shape[1]))
    try:
        got = ours.generate_ids(PROMPT, max_new=NEW)
    finally:
        hook.remove()
    assert calls == [torch.float32]
    prompt_len = len(ours.tokenizer.encode("<|im_start|>user\n" + PROMPT + "<|im_end|>\n<|im_start|>assistant\n"
                                           "<think>\n\n</think>\n\n"))
    assert lengths == [prompt_len] + [1] * (len(got) - 1)


def test_gguf_layers_dequantized_once_per_call_within_the_budget(tmp_path, monkeypatch):
    """Each GGUF layer is dequantized once per generation (not once per token) while the budget holds it; layers
    past the budget dequantize per use; the copies are gone after the call; the tokens are the same either way."""
    path = str(tmp_path / "q.gguf")
    tiny_gguf.write_text(path, "gguf", "Q8_0", seed=6)
    ours = load_text_encoder(path)
    from krea2_model.formats import gguf_ops
    packed = [m for m in ours.model.layers.modules() if getattr(m, "gguf_qtype", None) is not None]
    assert len(packed) >= 7
    calls = []
    real = gguf_ops.gguf_weight

    def counting(mod, device, dtype):
        calls.append(mod)
        return real(mod, device, dtype)

    monkeypatch.setattr(gguf_ops, "gguf_weight", counting)
    during = []
    want = ours.generate_ids(PROMPT, max_new=NEW, copy_budget=0)
    per_use = [m for m in calls if m is not ours.model.embed_tokens]
    assert len(want) == NEW and len(per_use) == len(packed)  # no copies: the prefill's whole weights only
    calls.clear()
    got = ours.generate_ids(PROMPT, max_new=NEW, progress=lambda n: during.append(
        sum("krea2_call_weight" in m.__dict__ for m in packed)))
    assert got == want
    assert [m for m in calls if m is not ours.model.embed_tokens] == packed  # each once, in module order
    assert during == [len(packed)] * NEW
    assert not any("krea2_call_weight" in m.__dict__ for m in packed)
    size = [m.gguf_shape[0] * m.gguf_shape[1] * 4 for m in packed]  # float32 compute on the CPU
    with gguf_ops.call_copies([ours.model.layers], "cpu", torch.float32, sum(size[:3])) as c:
        assert (c.layers, c.bytes, c.skipped) == (3, sum(size[:3]), len(packed) - 3)
        assert all(("krea2_call_weight" in m.__dict__) == (i < 3) for i, m in enumerate(packed))
    assert not any("krea2_call_weight" in m.__dict__ for m in packed)


def test_vision_tower_runs_once_per_generation(files, tok_dir):
    path, _, _ = files["bf16-full-vl"]
    ours = load_text_encoder(path, tokenizer=tok_dir, dtype=torch.float32)
    runs = []
    hook = ours.vision.register_forward_hook(lambda *a: runs.append(1))
    try:
        got = ours.generate_ids(PROMPT, [image(64, 64, 1)], max_new=6)
    finally:
        hook.remove()
    assert len(got) >= 2 and runs == [1]


def test_cache_growth_keeps_the_output(files, tok_dir, monkeypatch):
    path, _, _ = files["bf16-full-vl"]
    ours = load_text_encoder(path, tokenizer=tok_dir, dtype=torch.float32)
    want = ours.generate_ids(PROMPT, max_new=NEW)
    grown = []
    real = KVCache.reserve

    def reserve(self, extra):
        before = self.capacity
        real(self, extra)
        if self.capacity != before:
            grown.append(self.capacity)

    monkeypatch.setattr(G, "FIRST_CAPACITY", 1)
    monkeypatch.setattr(KVCache, "reserve", reserve)
    assert ours.generate_ids(PROMPT, max_new=NEW) == want
    # doubling: a handful of growths for a dozen tokens, each at least twice the one before
    assert 0 < len(grown) <= 4 and all(b >= 2 * a for a, b in zip(grown, grown[1:]))


def test_kv_cache_reserve_doubles_and_keeps_contents():
    c = KVCache(CFG, 3, torch.float32, "cpu", layers=2)
    k = torch.randn(1, CFG.kv_heads, 3, CFG.head_dim)
    c.slot(1).put(k, -k)
    c.length = 3
    c.reserve(1)
    assert c.capacity == 6
    assert torch.equal(c.k[1][:, :, :3], k) and torch.equal(c.v[1][:, :, :3], -k)
    c.reserve(10)
    assert c.capacity == 13


def test_bf16_storage_computes_in_bf16_with_the_stored_table_as_head(files, tok_dir):
    path, _, _ = files["bf16-full-vl"]
    ours = load_text_encoder(path, tokenizer=tok_dir)  # bf16 as stored
    m = ours.model
    assert G.default_dtype(m) == torch.bfloat16
    assert G.output_head(m, torch.bfloat16, "cpu") is m.embed_tokens.weight  # no copy, no cast per token
    assert G.head_copy_bytes(m, torch.bfloat16, "cpu") == 0
    assert G.head_copy_bytes(m, torch.float32, "cpu") == CFG.vocab * CFG.hidden * 4
    assert len(ours.generate_ids(PROMPT, max_new=4)) >= 1


# ---- sampling options, stopping, seeds ----------------------------------------------------------------

P3 = torch.log(torch.tensor([0.5, 0.3, 0.2]))


def _draws(n=300, **kw):
    """The tokens drawn from probabilities (0.5, 0.3, 0.2) over ``n`` seeds with sampling options ``kw``."""
    return {G.sample_next(P3.clone(), [], True, generator=torch.Generator().manual_seed(s), **kw) for s in range(n)}


def test_greedy_without_sampling_or_at_temperature_zero():
    logits = torch.tensor([0.1, 3.0, 2.0, -1.0])
    assert G.sample_next(logits, [], do_sample=False) == 1
    assert G.sample_next(logits, [], do_sample=True, temperature=0.0) == 1


def test_top_k():
    assert _draws(top_k=1) == {0}
    assert _draws(top_k=2) == {0, 1}
    assert _draws(top_k=0) == {0, 1, 2}  # 0 = off


def test_top_p_keeps_tokens_within_the_cumulative_probability():
    assert _draws(top_p=0.79) == {0}          # 0.5 + 0.3 = 0.8 goes past 0.79
    assert _draws(top_p=0.81) == {0, 1}
    assert _draws(top_p=0.0) == {0}           # the best token always stays
    assert _draws(top_p=1.0) == {0, 1, 2}


def test_min_p_drops_tokens_below_a_fraction_of_the_best():
    assert _draws(min_p=0.5) == {0, 1}        # threshold 0.25
    assert _draws(min_p=0.7) == {0}           # threshold 0.35
    assert _draws(min_p=0.3) == {0, 1, 2}


def test_penalties_look_at_generated_tokens_only():
    logits = torch.tensor([2.0, 1.9, -1.0])
    greedy = dict(do_sample=True, top_k=1)
    assert G.sample_next(logits, [], repetition_penalty=2.0, **greedy) == 0
    assert G.sample_next(logits, [0], repetition_penalty=2.0, **greedy) == 1   # 2.0 / 2 < 1.9
    assert G.sample_next(logits, [0], presence_penalty=0.2, **greedy) == 1     # 2.0 - 0.2 < 1.9
    # a negative logit is multiplied: token 2 goes further down, the others are untouched
    neg = torch.tensor([-1.0, -1.5, -3.0])
    assert G.sample_next(neg, [0], repetition_penalty=2.0, **greedy) == 1      # -1 * 2 < -1.5
    assert G.sample_next(logits, [], presence_penalty=5.0, **greedy) == 0      # nothing generated yet


def test_temperature_sharpens_and_flattens():
    hot, cold = set(), set()
    for s in range(300):
        hot.add(G.sample_next(P3.clone(), [], True, temperature=2.0, generator=torch.Generator().manual_seed(s)))
        cold.add(G.sample_next(P3.clone(), [], True, temperature=0.01, generator=torch.Generator().manual_seed(s)))
    assert hot == {0, 1, 2} and cold == {0}


def test_stop_token_ends_generation_and_max_new_caps_it(files, tok_dir):
    path, _, _ = files["bf16-full-vl"]
    ours = load_text_encoder(path, tokenizer=tok_dir, dtype=torch.float32)
    free = ours.generate_ids(PROMPT, max_new=NEW)
    assert len(free) == NEW or free[-1] == ours.tokenizer.token_id("<|im_end|>")
    assert ours.generate_ids(PROMPT, max_new=3) == free[:3]
    # declare the third greedy token a stop token: generation ends right after it, stop token included
    from krea2_model.text.generate import generate
    ids = ours.tokenizer.encode("<|im_start|>user\n" + PROMPT + "<|im_end|>\n<|im_start|>assistant\n"
                                "<think>\n\n</think>\n\n")
    stop = free[2]
    got = generate(ours.model, ids, max_new=NEW, stop_ids=[stop])
    assert got == free[:free.index(stop) + 1]


def test_seeds_reproduce_and_differ(files, tok_dir):
    path, _, _ = files["bf16-full-vl"]
    ours = load_text_encoder(path, tokenizer=tok_dir, dtype=torch.float32)
    kw = dict(max_new=10, do_sample=True, temperature=2.0, top_k=0, top_p=1.0, min_p=0.0,
              repetition_penalty=5.0)  # the tiny model's first pick is near-certain; the penalty opens the rest
    a = ours.generate_ids(PROMPT, seed=3, **kw)
    assert a == ours.generate_ids(PROMPT, seed=3, **kw)
    assert len({tuple(ours.generate_ids(PROMPT, seed=s, **kw)) for s in range(1, 6)} | {tuple(a)}) > 1


# ---- a GGUF's vocabulary against the tokenizer, at load ----------------------------------------------------

def _tiny_vocab(tok_dir):
    from tokenizers import Tokenizer
    got = Tokenizer.from_file(tok_dir + "/tokenizer.json").get_vocab(with_added_tokens=True)
    names = [None] * (max(got.values()) + 1)
    for t, i in got.items():
        names[i] = t
    return names


def test_gguf_vocabulary_is_checked_against_the_tokenizer_at_load(tmp_path):
    from krea2_model import TokenizerMismatchError
    good = tmp_path / "good"
    tiny_gguf.write_text(str(good / "q.gguf"), "gguf", "Q8_0")
    names = _tiny_vocab(str(good / "tokenizer"))
    load_text_encoder(str(good / "q.gguf"))  # the file records the tiny tokenizer's vocabulary: fine

    swapped = list(names)
    a, b = swapped.index("<|im_start|>"), swapped.index("<|im_end|>")
    swapped[a], swapped[b] = swapped[b], swapped[a]
    path = str(tmp_path / "swapped" / "q.gguf")
    tiny_gguf.write_text(path, "gguf", "Q8_0", vocab=swapped)
    with pytest.raises(TokenizerMismatchError, match=r"special token <\|im_start\|> is id %d .* but %d" % (b, a)) as e:
        load_text_encoder(path)
    assert path in str(e.value) and "beside the GGUF" in str(e.value)

    other = list(names)
    other[100] = "zzz"
    path = str(tmp_path / "other" / "q.gguf")
    tiny_gguf.write_text(path, "gguf", "Q8_0", vocab=other)
    with pytest.raises(TokenizerMismatchError, match="1 of .* id 100: 'zzz' in the file"):
        load_text_encoder(path)

    path = str(tmp_path / "none" / "q.gguf")  # no vocabulary recorded: only the embedding size is checked
    tiny_gguf.write_text(path, "gguf", "Q8_0", vocab=False)
    assert load_text_encoder(path).generate_ids("a cat", max_new=2)
