"""LoRA parsing and application (krea2_model.formats.lora) against hand-merged weights, in every key style."""

import pytest
import torch

from krea2_model import LoraError, Krea2FileError, load_transformer
from krea2_model.formats import lora as L
from krea2_model.formats.transformer_file import canonical_to_diffusers, diffusers_to_canonical
from krea2_model.tiny.transformer import CONFIGS, random_state_dict
from krea2_model.tiny.lora import STYLES, TinyLora, lora_targets, make_lora

CFG = CONFIGS["gqa"]  # 2:1 GQA in the blocks, 3:1 in the text fusion: q and k/v row counts differ


@pytest.fixture(scope="module")
def base():
    return random_state_dict(CFG, seed=0)


@pytest.fixture(scope="module")
def inputs():
    g = torch.Generator().manual_seed(7)
    x = torch.randn(2, CFG.channels, 8, 6, generator=g)
    sigma = torch.tensor([0.8, 0.3])
    ctx = torch.randn(2, 5, CFG.text_taps * CFG.text_dim, generator=g)
    return x, sigma, ctx


def velocity(sd, inputs):
    with torch.no_grad():
        return load_transformer(sd)(*inputs)


def rel(a, b):
    return ((a - b).norm() / b.norm()).item()


def parse(tl: TinyLora, tmp_path=None, name="lora"):
    """Parse through a real file when ``tmp_path`` is given (metadata read from the file)."""
    if tmp_path is None:
        return L.parse_lora(tl.state_dict, CFG, metadata=tl.metadata)
    return L.parse_lora(tl.save(str(tmp_path / f"{name}.safetensors")), CFG)


def accounted(patches, unmapped):
    return {s for p in patches for s in p.sources} | set(unmapped)


# -- every style: parsed + applied == merged by hand -------------------------------------------------------

@pytest.mark.parametrize("style", list(STYLES))
def test_style_matches_hand_merge(style, base, inputs, tmp_path):
    tl = make_lora(CFG, style, seed=1)
    patches, unmapped = parse(tl, tmp_path, style)
    assert unmapped == []
    assert accounted(patches, unmapped) == set(tl.state_dict)
    assert {p.key for p in patches} == set(tl.updates)
    ours = velocity(L.merge_into(base, patches), inputs)
    truth = velocity(tl.merge(base), inputs)
    plain = velocity(base, inputs)
    assert rel(ours, truth) <= 1e-6
    assert rel(truth, plain) > 1e-3  # the LoRA does something


@pytest.mark.parametrize("style", ["krea", "kohya", "diffusers", "lokr", "loha", "dora", "diff"])
def test_weights_match_hand_merge_other_sizes(style):
    for name in ("tiny", "mha"):
        cfg = CONFIGS[name]
        sd = random_state_dict(cfg, seed=2)
        tl = make_lora(cfg, style, seed=3, rank=3)
        patches, unmapped = L.parse_lora(tl.state_dict, cfg, metadata=tl.metadata)
        assert unmapped == []
        ours, truth = L.merge_into(sd, patches), tl.merge(sd)
        for k in sd:
            assert torch.allclose(ours[k], truth[k], rtol=1e-5, atol=1e-6), (name, style, k)


def test_krea_metadata_drives_the_scale(base):
    tl = make_lora(CFG, "krea", seed=1)
    p_meta, _ = L.parse_lora(tl.state_dict, CFG, metadata=tl.metadata)
    p_none, _ = L.parse_lora(tl.state_dict, CFG, metadata={})
    k = "blocks.0.attn.wq.weight"
    d_meta = L.delta(next(p for p in p_meta if p.key == k))
    d_none = L.delta(next(p for p in p_none if p.key == k))
    rank = tl.state_dict["blocks.0.attn.wq.lora_A"].shape[0]
    factor = float(tl.metadata["scale"]) * float(tl.metadata["lora_alpha"]) / rank
    assert torch.allclose(d_meta, factor * d_none)  # no metadata: alpha = rank, scale 1


def test_rank_only_metadata_means_scale_one():
    tl = make_lora(CFG, "krea", seed=1)
    a, _ = L.parse_lora(tl.state_dict, CFG, metadata={"lora_rank": "4"})
    b, _ = L.parse_lora(tl.state_dict, CFG, metadata={})
    for p, q in zip(a, b):
        assert torch.equal(L.delta(p), L.delta(q))


def test_diffusers_adapter_metadata_alpha_and_alpha_pattern():
    tl = make_lora(CFG, "diffusers", seed=1)
    import json
    meta = {"lora_adapter_metadata": json.dumps({"transformer.r": 4, "transformer.lora_alpha": 8,
                                                 "transformer.alpha_pattern": {"transformer_blocks.0.attn.to_k": 2}})}
    ours, _ = L.parse_lora(tl.state_dict, CFG, metadata=meta)
    plain, _ = L.parse_lora(tl.state_dict, CFG, metadata={})
    for p, q in zip(ours, plain):
        f = 0.5 if p.key == "blocks.0.attn.wk.weight" else 2.0
        assert torch.allclose(L.delta(p), f * L.delta(q)), p.key


@pytest.mark.parametrize("meta,key", [
    ({"lora_adapter_metadata": "{not json"}, "lora_adapter_metadata"),
    ({"lora_adapter_metadata": "[4, 8]"}, "lora_adapter_metadata"),
    ({"lora_alpha": "eight"}, "lora_alpha"),
    ({"ss_network_alpha": "None?"}, "ss_network_alpha"),
    ({"lora_adapter_metadata": '{"transformer.lora_alpha": "x"}'}, "transformer.lora_alpha"),
])
def test_malformed_metadata_is_warned_by_name(meta, key, caplog):
    """Malformed metadata used to become "no metadata" without a word (strength off by alpha / rank)."""
    tl = make_lora(CFG, "diffusers", seed=1)
    with caplog.at_level("WARNING", logger="krea2"):
        got, _ = L.parse_lora(tl.state_dict, CFG, metadata=meta)
    assert key in caplog.text and "LoRA metadata" in caplog.text
    plain, _ = L.parse_lora(tl.state_dict, CFG, metadata={})
    assert all(torch.equal(L.delta(p), L.delta(q)) for p, q in zip(got, plain))  # applied as without it


def test_wellformed_metadata_gives_no_warning(caplog):
    tl = make_lora(CFG, "krea", seed=1)
    with caplog.at_level("WARNING", logger="krea2"):
        L.parse_lora(tl.state_dict, CFG, metadata=tl.metadata)
    assert "LoRA metadata" not in caplog.text


@pytest.mark.parametrize("down,up,target", [
    ("blocks.0.attn.wo.lora_A.default.weight", "blocks.0.attn.wo.lora_B.default.weight", "blocks.0.attn.wo.weight"),
    ("transformer_blocks.0.attn.to_out.lora.down.weight", "transformer_blocks.0.attn.to_out.lora.up.weight",
     "blocks.0.attn.wo.weight"),
    ("transformer_blocks.0.attn.to_out.0_lora.down.weight", "transformer_blocks.0.attn.to_out.0_lora.up.weight",
     "blocks.0.attn.wo.weight"),
    ("unet.transformer_blocks.0.attn.to_gate.lora_linear_layer.down.weight",
     "unet.transformer_blocks.0.attn.to_gate.lora_linear_layer.up.weight", "blocks.0.attn.gate.weight"),
    ("model.diffusion_model.blocks.1.mlp.up.lora_down.weight", "model.diffusion_model.blocks.1.mlp.up.lora_up.weight",
     "blocks.1.mlp.up.weight"),
    ("lora_transformer_transformer_blocks_1_ff_down.lora_down.weight",
     "lora_transformer_transformer_blocks_1_ff_down.lora_up.weight", "blocks.1.mlp.down.weight"),
    ("lora_unet_txtfusion_refiner_blocks_1_attn_wv.lora_down.weight",
     "lora_unet_txtfusion_refiner_blocks_1_attn_wv.lora_up.weight", "txtfusion.refiner_blocks.1.attn.wv.weight"),
    ("lora_unet_text_fusion_layerwise_blocks_0_ff_gate.lora_down.weight",
     "lora_unet_text_fusion_layerwise_blocks_0_ff_gate.lora_up.weight", "txtfusion.layerwise_blocks.0.mlp.gate.weight"),
    ("lycoris_time_embed_linear_1.lora_down.weight", "lycoris_time_embed_linear_1.lora_up.weight", "tmlp.0.weight"),
    ("transformer.time_mod_proj.lora_A.weight", "transformer.time_mod_proj.lora_B.weight", "tproj.1.weight"),
    ("final_layer.linear.lora_A.weight", "final_layer.linear.lora_B.weight", "last.linear.weight"),
    ("base_model.model.transformer.txt_in.linear_2.lora_A.weight",
     "base_model.model.transformer.txt_in.linear_2.lora_B.weight", "txtmlp.3.weight"),
])
def test_name_variants(down, up, target):
    shape = L.names_for(CFG).shapes[target]
    patches, unmapped = L.parse_lora({down: torch.ones(2, shape[1]), up: torch.ones(shape[0], 2)}, CFG)
    assert unmapped == [] and [p.key for p in patches] == [target]


# -- equivalences ---------------------------------------------------------------------------------------

def _separate_from_fused(tl: TinyLora) -> dict:
    """The fused-qkv file rewritten with one LoRA per wq / wk / wv (same down, up split by rows)."""
    out = {}
    for k, v in tl.state_dict.items():
        for fused, sep in (("lycoris_transformer_blocks_0_attn_to_qkv", "diffusion_model.blocks.0.attn.{}"),
                           (f"diffusion_model.blocks.{CFG.layers - 1}.attn.qkv",
                            f"diffusion_model.blocks.{CFG.layers - 1}.attn.{{}}"),
                           ("diffusion_model.txtfusion.layerwise_blocks.0.attn.wqkv",
                            "diffusion_model.txtfusion.layerwise_blocks.0.attn.{}")):
            if k.startswith(fused + "."):
                suffix = k[len(fused):]
                text = fused.startswith("diffusion_model.txtfusion")
                q = (CFG.text_heads if text else CFG.heads) * 16
                kv = (CFG.text_kv_heads if text else CFG.kv_heads) * 16
                parts = v.split((q, kv, kv)) if suffix == ".lora_up.weight" else (v, v, v)
                for n, part in zip(("wq", "wk", "wv"), parts):
                    out[sep.format(n) + suffix] = part
                break
        else:
            out[k] = v
    return out


def test_fused_qkv_equals_separate_loras(base, inputs):
    tl = make_lora(CFG, "lycoris-fused", seed=4)
    fused, un1 = L.parse_lora(tl.state_dict, CFG)
    separate, un2 = L.parse_lora(_separate_from_fused(tl), CFG)
    assert un1 == un2 == []
    assert sum(any("qkv" in s for s in p.sources) for p in fused) == 9  # 3 fused modules x q, k, v
    a, b = L.merge_into(base, fused), L.merge_into(base, separate)
    for k in base:
        assert torch.equal(a[k], b[k]), k
    assert rel(velocity(a, inputs), velocity(b, inputs)) == 0.0


def test_fused_qkv_loha_splits_exactly():
    q, kv = CFG.text_heads * CFG.text_head_dim, CFG.text_kv_heads * CFG.text_head_dim
    g = torch.Generator().manual_seed(8)
    t = {"hada_w1_a": torch.randn(q + 2 * kv, 3, generator=g), "hada_w1_b": torch.randn(3, CFG.text_dim, generator=g),
         "hada_w2_a": torch.randn(q + 2 * kv, 3, generator=g), "hada_w2_b": torch.randn(3, CFG.text_dim, generator=g)}
    name = "lycoris_text_fusion_layerwise_blocks_1_attn_to_qkv"
    sd = {f"{name}.{k}": v for k, v in t.items()}
    sd[name + ".alpha"] = torch.tensor(6.0)
    patches, unmapped = L.parse_lora(sd, CFG)
    assert unmapped == [] and {p.kind for p in patches} == {"loha"}
    fused = 6.0 / 3 * (t["hada_w1_a"] @ t["hada_w1_b"]) * (t["hada_w2_a"] @ t["hada_w2_b"])
    got = torch.cat([L.delta(next(p for p in patches if p.key == f"txtfusion.layerwise_blocks.1.attn.{n}.weight"))
                     for n in ("wq", "wk", "wv")])
    assert torch.allclose(got, fused, rtol=1e-6, atol=1e-6)


def test_fused_lokr_becomes_exact_diffs():
    q, kv = CFG.heads * CFG.head_dim, CFG.kv_heads * CFG.head_dim
    g = torch.Generator().manual_seed(9)
    w1 = torch.randn(2, 2, generator=g)
    w2 = torch.randn((q + 2 * kv) // 2, CFG.hidden // 2, generator=g)
    sd = {"lycoris_transformer_blocks_1_attn_to_qkv.lokr_w1": w1,
          "lycoris_transformer_blocks_1_attn_to_qkv.lokr_w2": w2}
    patches, unmapped = L.parse_lora(sd, CFG)
    assert unmapped == [] and [p.kind for p in patches] == ["diff"] * 3
    full = torch.kron(w1, w2)
    got = torch.cat([next(p for p in patches if p.key == f"blocks.1.attn.{n}.weight").tensors["diff"]
                     for n in ("wq", "wk", "wv")])
    assert torch.equal(got, full)


@pytest.mark.parametrize("a,b", [("diffusers", "comfy"), ("peft", "aitoolkit"), ("kohya-diffusers", "kohya"),
                                 ("diffusers", "krea")])
def test_diffusers_and_native_names_give_identical_outputs(a, b, base, inputs):
    pa, _ = L.parse_lora(make_lora(CFG, a, seed=6).state_dict, CFG, metadata=make_lora(CFG, a, seed=6).metadata)
    tb = make_lora(CFG, b, seed=6)
    meta = {} if b == "krea" else tb.metadata  # krea's metadata scale differs on purpose; drop it here
    pb, _ = L.parse_lora(tb.state_dict, CFG, metadata=meta)
    sa, sb = L.merge_into(base, pa), L.merge_into(base, pb)
    for k in base:
        assert torch.equal(sa[k], sb[k]), k
    assert torch.equal(velocity(sa, inputs), velocity(sb, inputs))


def test_two_loras_stack_as_sum_of_deltas(base, inputs):
    t1, t2 = make_lora(CFG, "comfy", seed=1), make_lora(CFG, "loha", seed=2)
    p1, _ = parse(t1)
    p2, _ = parse(t2)
    stacked = L.merge_into(L.merge_into(base, p1, 0.8), p2, 0.6)
    d = {}
    for tl, s in ((t1, 0.8), (t2, 0.6)):
        m = tl.merge(base)
        for k in tl.updates:
            d[k] = d.get(k, 0) + s * (m[k] - base[k])
    by_hand = {k: base[k] + d.get(k, 0) for k in base}
    assert rel(velocity(stacked, inputs), velocity(by_hand, inputs)) <= 1e-6
    swapped = L.merge_into(L.merge_into(base, p2, 0.6), p1, 0.8)
    assert rel(velocity(swapped, inputs), velocity(stacked, inputs)) <= 1e-6


@pytest.mark.parametrize("style", ["comfy", "lokr", "loha", "dora", "diff"])
def test_strength_zero_is_no_lora_and_strength_is_linear(style, base, inputs):
    patches, _ = parse(make_lora(CFG, style, seed=1))
    zero = L.merge_into(base, patches, 0.0)
    for k in base:
        assert torch.equal(zero[k], base[k]), k
    assert torch.equal(velocity(zero, inputs), velocity(base, inputs))
    half, full = L.merge_into(base, patches, 0.5), L.merge_into(base, patches, 1.0)
    for p in patches:
        assert torch.allclose(half[p.key], (base[p.key] + full[p.key]) / 2, atol=1e-6), p.key


def test_merge_into_does_not_touch_its_inputs(base):
    before = {k: v.clone() for k, v in base.items()}
    patches, _ = parse(make_lora(CFG, "dora", seed=1))
    L.merge_into(base, patches)
    for k in base:
        assert torch.equal(base[k], before[k])


def test_bf16_weights_keep_their_dtype():
    sd = {k: v.to(torch.bfloat16) if not k.endswith(".scale") else v for k, v in random_state_dict(CFG, 0).items()}
    patches, _ = parse(make_lora(CFG, "comfy", seed=1))
    out = L.merge_into(sd, patches)
    assert all(out[k].dtype == sd[k].dtype for k in sd)


# -- diffusers' converter as the reference name map -------------------------------------------------------

def _diffusers_converter():
    # diffusers is pinned (0.42.1) for the tests: a missing converter is a failure, never a skip
    from diffusers.loaders.lora_conversion_utils import _convert_non_diffusers_krea2_lora_to_diffusers
    return _convert_non_diffusers_krea2_lora_to_diffusers


@pytest.mark.parametrize("style", ["comfy", "aitoolkit"])
def test_names_agree_with_diffusers_converter(style):
    convert = _diffusers_converter()
    tl = make_lora(CFG, style, seed=1)
    converted = convert(dict(tl.state_dict))
    ours, un1 = L.parse_lora(tl.state_dict, CFG)
    theirs, un2 = L.parse_lora(converted, CFG)
    assert un1 == un2 == []
    assert {p.key: p.sources for p in ours}.keys() == {p.key: p.sources for p in theirs}.keys()
    for p in theirs:
        q = next(x for x in ours if x.key == p.key)
        assert torch.equal(p.tensors["up"], q.tensors["up"]) and torch.equal(p.tensors["down"], q.tensors["down"])
        # and diffusers' module name is what our canonical<->diffusers map says
        dmod = p.sources[0].removeprefix("transformer.").rsplit(".lora_", 1)[0]
        assert diffusers_to_canonical(dmod + ".weight") == p.key


def test_converter_names_are_weights_of_diffusers_model():
    """diffusers' converter output, merged by name into diffusers' own Krea2Transformer2DModel state dict,
    equals our merge seen through the checkpoint name map: names and shapes agree end to end."""
    convert = _diffusers_converter()
    from diffusers import Krea2Transformer2DModel
    from krea2_model.tiny.transformer import diffusers_config, to_layout
    sd = random_state_dict(CFG, seed=0)
    ref_sd = Krea2Transformer2DModel(**diffusers_config(CFG)).state_dict()
    tl = make_lora(CFG, "comfy", seed=2)
    merged = dict(to_layout(sd, "diffusers"))
    for k, v in convert(dict(tl.state_dict)).items():
        if ".lora_A." in k:
            mod = k.removeprefix("transformer.").split(".lora_A.")[0]
            up = convert(dict(tl.state_dict))[k.replace(".lora_A.", ".lora_B.")]
            assert mod + ".weight" in ref_sd and ref_sd[mod + ".weight"].shape == (up @ v).shape, mod
            merged[mod + ".weight"] = merged[mod + ".weight"] + up @ v
    ours = to_layout(L.merge_into(sd, parse(tl)[0]), "diffusers")
    assert set(ours) == set(merged) == set(ref_sd)
    for k in ours:
        assert torch.equal(ours[k], merged[k]), k


def test_every_target_module_has_the_diffusers_converter_name_our_map_gives():
    """Every module our LoRA parser targets is converted by diffusers, to the diffusers name our own
    canonical -> diffusers map gives it (not only the same number of keys)."""
    convert = _diffusers_converter()
    sd = {}
    for i, mod in enumerate(lora_targets(CFG)):
        sd[f"diffusion_model.{mod}.lora_A.weight"] = torch.full((1,), float(i))
        sd[f"diffusion_model.{mod}.lora_B.weight"] = torch.full((1,), float(i))
    out = convert(sd)
    assert len(out) == len(sd)
    for i, mod in enumerate(lora_targets(CFG)):
        want = "transformer." + canonical_to_diffusers(mod + ".weight").removesuffix(".weight")
        for ab in ("lora_A", "lora_B"):
            assert f"{want}.{ab}.weight" in out, (mod, want)
            assert out[f"{want}.{ab}.weight"].item() == float(i), mod  # the tensor that came with that module


# -- host patches ----------------------------------------------------------------------------------------

def _apply_comfy_entry(w, v, strength):
    """ComfyUI's documented semantics of each entry, written out independently (alpha / rows of down...)."""
    w = w.float()
    if v[0] == "diff":
        return w + strength * v[1][0].float().reshape(w.shape)
    kind, t = v
    if kind == "lora":
        up, down, alpha = t[0].float(), t[1].float(), t[2]
        f = 1.0 if alpha is None else alpha / down.shape[0]
        return w + strength * f * (up @ down).reshape(w.shape)
    if kind == "loha":
        f = 1.0 if t[2] is None else t[2] / t[1].shape[0]
        return w + strength * f * ((t[0] @ t[1]) * (t[3] @ t[4])).reshape(w.shape)
    w1 = t[0] if t[0] is not None else t[3] @ t[4]
    w2 = t[1] if t[1] is not None else t[5] @ t[6]
    dim = t[6].shape[0] if t[1] is None else (t[4].shape[0] if t[0] is None else None)
    f = t[2] / dim if (t[2] is not None and dim) else 1.0
    return w + strength * f * torch.kron(w1, w2).reshape(w.shape)


@pytest.mark.parametrize("style", [s for s in STYLES if "dora" not in s])
def test_comfy_patches_reproduce_merge(style, base):
    patches, _ = parse(make_lora(CFG, style, seed=1))
    cp = L.to_comfy_patches(patches)
    assert set(cp) == {"diffusion_model." + p.key for p in patches}
    ref = L.merge_into(base, patches, 0.7)
    for k, v in cp.items():
        ck = k.removeprefix("diffusion_model.")
        assert torch.allclose(_apply_comfy_entry(base[ck], v, 0.7), ref[ck], rtol=1e-5, atol=1e-6), k


def test_comfy_patches_dora_needs_base_weights(base):
    patches, _ = parse(make_lora(CFG, "peft-dora", seed=1))
    with pytest.raises(LoraError, match="base_weights"):
        L.to_comfy_patches(patches)
    cp = L.to_comfy_patches(patches, key_prefix="", base_weights=base)
    ref = L.merge_into(base, patches, 0.3)
    for k, v in cp.items():
        assert v[0] == "diff"
        assert torch.allclose(base[k] + 0.3 * v[1][0], ref[k], atol=1e-6)


def test_comfy_patches_build_adapters_with_the_documented_tuple_order():
    """Adapters get ComfyUI's positional tuples: lora (up, down, alpha, mid, dora, reshape), lokr (w1, w2, alpha,
    w1_a, w1_b, w2_a, w2_b, t2, dora), loha (w1_a, w1_b, alpha, w2_a, w2_b, t1, t2, dora); each position holds
    the patch's own tensor. (That ComfyUI's real adapters read them so is checked in the host tier by
    scripts/check_lora_comfy_adapters.py.)"""
    made = {}

    class Fake:
        def __init__(self, keys, weights):
            self.weights = weights

    for style, kind in (("comfy", "lora"), ("lokr", "lokr"), ("loha", "loha")):
        patches, _ = parse(make_lora(CFG, style, seed=1))
        cp = L.to_comfy_patches(patches, adapters={"lora": Fake, "lokr": Fake, "loha": Fake})
        lowrank = [p for p in patches if p.kind == kind]
        assert lowrank, style
        for p in lowrank:
            w, t = cp["diffusion_model." + p.key].weights, p.tensors
            s = p.scale
            if kind == "lora":
                assert len(w) == 6 and w[3] is None and w[5] is None
                assert torch.equal(w[0], t["up"] * s if s != 1.0 else t["up"]) and torch.equal(w[1], t["down"])
                assert w[2] == p.alpha and w[4] is p.dora_scale
            elif kind == "lokr":
                assert len(w) == 9 and w[7] is None and w[2] == p.alpha and w[8] is p.dora_scale
                for i, n in ((1, "w2"), (4, "w1_b"), (5, "w2_a"), (6, "w2_b")):
                    assert (w[i] is None) == (n not in t) and (w[i] is None or torch.equal(w[i], t[n])), n
            else:
                assert len(w) == 8 and w[5] is None and w[6] is None and w[2] == p.alpha and w[7] is p.dora_scale
                assert torch.equal(w[1], t["w1_b"]) and torch.equal(w[3], t["w2_a"]) and torch.equal(w[4], t["w2_b"])
            made[kind] = True
    assert set(made) == {"lora", "lokr", "loha"}


# -- nothing silently dropped -------------------------------------------------------------------------------

def test_unknown_keys_are_reported_not_dropped():
    tl = make_lora(CFG, "comfy", seed=1)
    sd = dict(tl.state_dict)
    extra = {"diffusion_model.blocks.0.attn.wq.some_new_thing": torch.zeros(2),
             "diffusion_model.blocks.0.attn.wq.alpha_x": torch.zeros(1),
             "lora_te_text_model_encoder_layers_0_mlp_fc1.lora_down.weight": torch.zeros(4, 8),
             "diffusion_model.blocks.0.attn.wk.alpha": torch.tensor(4.0),  # alpha of a LoRA given as lora_A/B: used
             "diffusion_model.nonexistent.lora_A.weight": torch.zeros(4, 8),
             "diffusion_model.blocks.0.prenorm.scale.lora_A.weight": torch.zeros(4, 8),
             "diffusion_model.blocks.0.attn.wq.set_weight": torch.zeros(2)}
    sd.update(extra)
    patches, unmapped = L.parse_lora(sd, CFG)
    assert accounted(patches, unmapped) == set(sd)
    assert set(unmapped) == set(extra) - {"diffusion_model.blocks.0.attn.wk.alpha"}


def test_orphan_alpha_is_reported():
    sd = {"lora_unet_blocks_0_attn_wq.alpha": torch.tensor(4.0),
          "lora_unet_blocks_0_attn_wk.lora_down.weight": torch.zeros(2, CFG.hidden),
          "lora_unet_blocks_0_attn_wk.lora_up.weight": torch.zeros(CFG.kv_heads * CFG.head_dim, 2)}
    patches, unmapped = L.parse_lora(sd, CFG)
    assert unmapped == ["lora_unet_blocks_0_attn_wq.alpha"] and len(patches) == 1


# -- refusals ---------------------------------------------------------------------------------------------

def _lr(name, o=8, i=8, kohya=False):
    if kohya:
        return {f"{name}.lora_down.weight": torch.zeros(2, i), f"{name}.lora_up.weight": torch.zeros(o, 2)}
    return {f"{name}.lora_A.weight": torch.zeros(2, i), f"{name}.lora_B.weight": torch.zeros(o, 2)}


@pytest.mark.parametrize("sd,what", [
    ({**_lr("diffusion_model.double_blocks.0.img_attn.qkv"), **_lr("diffusion_model.single_blocks.0.linear1")},
     "Flux"),
    ({**_lr("transformer.transformer_blocks.0.attn.to_q", 64, 64), **_lr("transformer.transformer_blocks.0.img_mod.1")},
     "Qwen-Image"),
    ({**_lr("transformer.transformer_blocks.0.attn.to_q", 96, 96), **_lr("transformer.transformer_blocks.0.attn.add_q_proj")},
     "two-stream MMDiT"),
    ({**_lr("transformer.single_transformer_blocks.0.attn.to_q"), **_lr("transformer.transformer_blocks.0.ff_context.net.0.proj")},
     "Flux"),
    ({**_lr("transformer.transformer_blocks.0.attn.to_q", 96, 96), **_lr("transformer.transformer_blocks.0.attn.add_q_proj"),
      **_lr("transformer.transformer_blocks.0.txt_mlp.net.0.proj")}, "Qwen-Image"),
    (_lr("lora_unet_input_blocks_4_1_transformer_blocks_0_attn1_to_q", kohya=True), "Stable Diffusion"),
    (_lr("unet.down_blocks.1.attentions.0.transformer_blocks.0.attn1.to_q"), "Stable Diffusion"),
    (_lr("diffusion_model.blocks.0.self_attn.q"), "Wan"),
    (_lr("lora_unet_joint_blocks_0_x_block_attn_qkv", kohya=True), "SD3"),
    (_lr("diffusion_model.layers.0.attention.qkv"), "Lumina 2 / Z-Image"),
])
def test_other_architectures_are_refused_by_name(sd, what):
    with pytest.raises(LoraError, match="not for Krea 2|no key") as e:
        L.parse_lora(sd, CFG)
    assert what in str(e.value)


def test_text_encoder_only_lora_is_refused():
    sd = _lr("lora_te_text_model_encoder_layers_0_self_attn_q_proj", kohya=True)
    with pytest.raises(LoraError, match="only patches a text encoder"):
        L.parse_lora(sd, CFG)


def test_text_encoder_part_beside_krea_keys_is_reported():
    sd = {**make_lora(CFG, "comfy", seed=1).state_dict,
          **_lr("lora_te1_text_model_encoder_layers_0_self_attn_q_proj", kohya=True)}
    patches, unmapped = L.parse_lora(sd, CFG)
    assert len(unmapped) == 2 and all(k.startswith("lora_te1_") for k in unmapped)


def test_unrecognisable_file_is_refused_with_examples():
    with pytest.raises(LoraError, match=r"no key of this LoRA targets a Krea 2 module.*foo\.bar"):
        L.parse_lora({"foo.bar": torch.zeros(1)}, CFG)


def test_wrong_shape_names_key_seen_and_expected():
    sd = _lr("diffusion_model.blocks.0.attn.wq", o=CFG.heads * CFG.head_dim, i=CFG.hidden + 1)
    with pytest.raises(LoraError) as e:
        L.parse_lora(sd, CFG)
    msg = str(e.value)
    assert "diffusion_model.blocks.0.attn.wq.lora_" in msg and f"[{CFG.heads * CFG.head_dim}, {CFG.hidden + 1}]" in msg
    assert f"expected [{CFG.heads * CFG.head_dim}, {CFG.hidden}]" in msg


def test_lora_for_another_krea_size_is_refused():
    tl = make_lora(CONFIGS["tiny"], "kohya", seed=1)
    with pytest.raises(LoraError, match="another model"):
        L.parse_lora(tl.state_dict, CFG)


def test_wrong_diff_shape_is_refused():
    with pytest.raises(LoraError, match=r"'diffusion_model\.blocks\.0\.prenorm\.scale\.diff'.*expected \[96\]"):
        L.parse_lora({"diffusion_model.blocks.0.prenorm.scale.diff": torch.zeros(95)}, CFG)


def test_missing_partner_is_refused():
    sd = {"lora_unet_blocks_0_attn_wq.lora_down.weight": torch.zeros(2, CFG.hidden)}
    with pytest.raises(LoraError, match=r"'lora_unet_blocks_0_attn_wq' is incomplete.*up"):
        L.parse_lora(sd, CFG)
    with pytest.raises(LoraError, match="incomplete.*w2_b"):
        L.parse_lora({"lycoris_blocks_0_attn_wq.lokr_w1": torch.ones(2, 2),
                      "lycoris_blocks_0_attn_wq.lokr_w2_a": torch.ones(48, 2)}, CFG)


def test_two_entries_for_one_weight_are_refused():
    q = CFG.heads * CFG.head_dim
    sd = {**_lr("diffusion_model.blocks.0.attn.wq", o=q, i=CFG.hidden),
          **_lr("lora_unet_blocks_0_attn_wq", o=q, i=CFG.hidden, kohya=True)}
    with pytest.raises(LoraError, match="two entries of this LoRA patch 'blocks.0.attn.wq.weight'"):
        L.parse_lora(sd, CFG)


def test_bias_delta_on_a_bias_free_module_is_refused():
    with pytest.raises(LoraError, match="no bias"):
        L.parse_lora({"diffusion_model.blocks.0.attn.wq.diff_b": torch.zeros(CFG.heads * CFG.head_dim)}, CFG)


def test_fused_qkv_with_wrong_rows_is_refused():
    with pytest.raises(LoraError, match=r"fused qkv LoRA .* expected 192 \(q 96 \+ k 48 \+ v 48\)"):
        L.parse_lora(_lr("diffusion_model.blocks.0.attn.qkv", o=3 * 96, i=CFG.hidden), CFG)


def test_fused_column_dora_is_refused():
    sd = {**_lr("diffusion_model.blocks.0.attn.qkv", o=192, i=CFG.hidden),
          "diffusion_model.blocks.0.attn.qkv.dora_scale": torch.ones(1, CFG.hidden)}
    with pytest.raises(LoraError, match="cannot be split"):
        L.parse_lora(sd, CFG)


def test_conv_and_tucker_factors_are_refused():
    sd = {**_lr("diffusion_model.blocks.0.attn.wq", o=96, i=96, kohya=True),
          "diffusion_model.blocks.0.attn.wq.lora_mid.weight": torch.zeros(2, 2, 3, 3)}
    with pytest.raises(LoraError, match="Tucker"):
        L.parse_lora(sd, CFG)
    sd = {f"x.blocks.0.attn.wq.{n}": torch.ones(2, 2) for n in ("hada_w1_a", "hada_w1_b", "hada_w2_a", "hada_w2_b")}
    sd = {k.replace("x.", "diffusion_model."): v for k, v in sd.items()}
    sd["diffusion_model.blocks.0.attn.wq.hada_t1"] = torch.ones(2, 2, 3, 3)
    with pytest.raises(LoraError, match="Tucker"):
        L.parse_lora(sd, CFG)


def test_low_rank_on_a_norm_is_refused():
    with pytest.raises(LoraError, match="no weight matrix"):
        L.parse_lora(_lr("diffusion_model.blocks.0.prenorm", o=96, i=1), CFG)


def test_bad_dora_magnitude_shape_is_refused():
    sd = {**_lr("diffusion_model.blocks.0.attn.wo", o=96, i=96),
          "diffusion_model.blocks.0.attn.wo.dora_scale": torch.ones(5)}
    with pytest.raises(LoraError, match=r"DoRA magnitude .* \[5\]"):
        L.parse_lora(sd, CFG)


@pytest.mark.parametrize("layout", ["original", "comfy", "diffusers"])
def test_full_checkpoint_is_refused_as_a_lora(layout, base):
    from krea2_model.tiny.transformer import to_layout
    with pytest.raises(LoraError, match="full Krea 2 checkpoint.*Krea2ModelLoader"):
        L.parse_lora(to_layout(base, layout), CFG)


def test_pickle_files_are_refused(tmp_path):
    p = tmp_path / "lora.pt"
    p.write_bytes(b"\x80\x04junk")
    with pytest.raises(Krea2FileError, match="pickle|Pickle"):
        L.parse_lora(str(p), CFG)


# -- the generator ----------------------------------------------------------------------------------------

def test_generator_is_reproducible_and_writes_every_style(tmp_path):
    from krea2_model.tiny import lora as tiny_lora
    tiny_lora.main(["--out", str(tmp_path), "--config", "tiny", "--style", "all", "--seed", "3"])
    files = sorted(p.name for p in tmp_path.iterdir())
    assert len(files) == len(STYLES)
    a = make_lora(CONFIGS["tiny"], "kohya", seed=3)
    b = make_lora(CONFIGS["tiny"], "kohya", seed=3)
    assert all(torch.equal(a.state_dict[k], b.state_dict[k]) for k in a.state_dict)
    patches, unmapped = L.parse_lora(str(tmp_path / "krea2_tiny_lora_krea.safetensors"), CONFIGS["tiny"])
    assert unmapped == [] and patches[0].scale == 0.5


def test_generator_help_lists_styles(capsys):
    from krea2_model.tiny import lora as tiny_lora
    with pytest.raises(SystemExit):
        tiny_lora.main(["--help"])
    out = capsys.readouterr().out
    assert all(s in out for s in STYLES)
