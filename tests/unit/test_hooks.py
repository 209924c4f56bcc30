"""Host hooks on our transformer without a host (issue 13): reference latents, attention patches, block
replacement, post_input, and the odd-size latent check of issue 12.

Reference numbers come from diffusers 0.42.1 ``Krea2Transformer2DModel`` (explicit position ids give it the
reference grids; its own blocks, fed a per-token modulation, give ``index_timestep_zero``) or from a hand
edit of our own model (a block removed, value projections zeroed), never from pasted constants.
"""

import copy

import pytest
import torch
import torch.nn.functional as F

from krea2_model import ConditioningError, load_transformer
from krea2_model.model.transformer import position_ids
from krea2_model.tiny.transformer import CONFIGS, diffusers_config, random_state_dict, to_layout

# diffusers is a pinned test dependency: imported, so a missing one fails the run
from diffusers import Krea2Transformer2DModel  # noqa: E402


def rel(a, b):
    return ((a.float() - b.float()).norm() / b.float().norm()).item()


@pytest.fixture(scope="module")
def pair():
    cfg = CONFIGS["gqa"]
    sd = random_state_dict(cfg, 5)
    ref = Krea2Transformer2DModel(**diffusers_config(cfg)).eval()
    ref.load_state_dict(to_layout(sd, "diffusers"), strict=True)
    ours = load_transformer(sd, dtype=torch.float32)
    return cfg, sd, ours, ref


def inputs(cfg, B=2, H=6, W=8, text=5, seed=0):
    g = torch.Generator().manual_seed(seed)
    return (torch.randn(B, 16, H, W, generator=g), torch.tensor([0.7, 0.35][:B]),
            torch.randn(B, text, cfg.text_taps * cfg.text_dim, generator=g))


def pack(lat, p=2):
    """Circular pad to the patch (as ComfyUI pads), then diffusers' packed token layout."""
    B, C, H, W = lat.shape
    lat = F.pad(lat, (0, (-W) % p, 0, (-H) % p), mode="circular")
    gh, gw = lat.shape[2] // p, lat.shape[3] // p
    return lat.reshape(B, C, gh, p, gw, p).permute(0, 2, 4, 1, 3, 5).reshape(B, gh * gw, C * p * p), gh, gw


def unpack(tok, gh, gw, p=2, C=16):
    B = tok.shape[0]
    return tok.view(B, gh, gw, C, p, p).permute(0, 3, 1, 4, 2, 5).reshape(B, C, gh * p, gw * p)


def diffusers_with_refs(ref, cfg, x, sigma, ctx, refs, t0=False):
    """diffusers' modules on ``[text | target | refs]`` with the reference positions (i, row, col); with
    ``t0`` its blocks get a per-token modulation: the real t for text and target, t = 0 for references."""
    B = x.shape[0]
    tgt, gh, gw = pack(x)
    toks, grids = [tgt], [(0, gh, gw)]
    for i, r in enumerate(refs, 1):
        rt, rh, rw = pack(r.expand(B, -1, -1, -1) if r.shape[0] == 1 else r)
        toks.append(rt)
        grids.append((i, rh, rw))
    img = torch.cat(toks, dim=1)
    ctx4 = ctx.view(B, ctx.shape[1], cfg.text_taps, cfg.text_dim)
    pos = position_ids(ctx.shape[1], grids).float()
    with torch.no_grad():
        if not t0:
            v = ref(img, ctx4, sigma, pos, return_dict=False)[0]
            return unpack(v[:, :tgt.shape[1]], gh, gw)[:, :, :x.shape[2], :x.shape[3]]
        temb = ref.time_embed(sigma, dtype=torch.float32)
        mod = ref.time_mod_proj(F.gelu(temb, approximate="tanh"))
        mod0 = ref.time_mod_proj(F.gelu(ref.time_embed(torch.zeros_like(sigma), dtype=torch.float32),
                                        approximate="tanh"))
        txt = ref.txt_in(ref.text_fusion(ctx4, attention_mask=None))
        h = torch.cat([txt, ref.img_in(img)], dim=1)
        split = txt.shape[1] + tgt.shape[1]
        per_token = torch.cat([mod.expand(B, split, -1), mod0.expand(B, h.shape[1] - split, -1)], dim=1)
        rot = ref.rotary_emb(pos)
        for blk in ref.transformer_blocks:
            h = blk(h, per_token, rot, None)
        v = ref.final_layer(h[:, txt.shape[1]:split], temb)
        return unpack(v, gh, gw)[:, :, :x.shape[2], :x.shape[3]]


# -- reference latents ------------------------------------------------------------------------------------


@pytest.mark.parametrize("method", ["index", "offset", "uxo"])
def test_references_equal_diffusers_with_reference_positions(pair, method):
    cfg, _, ours, ref = pair
    x, s, c = inputs(cfg)
    g = torch.Generator().manual_seed(7)
    refs = [torch.randn(1, 16, 5, 7, generator=g), torch.randn(2, 16, 4, 10, generator=g)]  # odd sides, batch 1
    want = diffusers_with_refs(ref, cfg, x, s, c, refs)
    with torch.no_grad():
        got = ours(x, s, c, ref_latents=refs, ref_latents_method=method)
        plain = ours(x, s, c)
    assert got.shape == x.shape
    assert rel(got, want) <= 1e-5
    assert rel(plain, got) > 1e-2  # the references act


def test_index_timestep_zero_modulates_only_references_with_t0(pair):
    cfg, _, ours, ref = pair
    x, s, c = inputs(cfg)
    g = torch.Generator().manual_seed(8)
    refs = [torch.randn(2, 16, 4, 4, generator=g), torch.randn(1, 16, 6, 2, generator=g)]
    want = diffusers_with_refs(ref, cfg, x, s, c, refs, t0=True)
    with torch.no_grad():
        got = ours(x, s, c, ref_latents=refs, ref_latents_method="index_timestep_zero")
        index = ours(x, s, c, ref_latents=refs, ref_latents_method="index")
        with torch.enable_grad():  # the out-of-place path (autograd / compile) computes the same
            slow = ours(x, s, c, ref_latents=refs, ref_latents_method="index_timestep_zero").detach()
        at_zero = ours(x, torch.zeros(2), c, ref_latents=refs, ref_latents_method="index_timestep_zero")
        index_zero = ours(x, torch.zeros(2), c, ref_latents=refs, ref_latents_method="index")
    assert rel(got, want) <= 1e-5
    assert rel(slow, want) <= 1e-5
    assert rel(got, index) > 1e-3          # t = 0 on references is not the real t
    assert rel(at_zero, index_zero) <= 1e-6  # ... except when the real t is 0


def test_reference_shapes_five_d_and_batch(pair):
    cfg, _, ours, _ = pair
    x, s, c = inputs(cfg, H=7, W=9)
    g = torch.Generator().manual_seed(9)
    r4 = torch.randn(1, 16, 3, 5, generator=g)
    with torch.no_grad():
        a = ours(x, s, c, ref_latents=[r4], ref_latents_method="index")
        b = ours(x.unsqueeze(2), s, c, ref_latents=[r4.unsqueeze(2)], ref_latents_method="index")
        c2 = ours(x, s, c, ref_latents=[r4.expand(2, -1, -1, -1)], ref_latents_method="index")
    assert a.shape == x.shape and b.shape == (2, 16, 1, 7, 9)
    assert torch.equal(b[:, :, 0], a)
    assert torch.equal(a, c2)  # a batch-1 reference is repeated to the batch


def test_reference_errors_name_the_input(pair):
    cfg, _, ours, _ = pair
    x, s, c = inputs(cfg)
    good, bad = torch.randn(1, 16, 4, 4), torch.randn(1, 4, 4, 4)
    with pytest.raises(ConditioningError, match=r"reference latent 2 of 2 must have 16 channels.*\(1, 4, 4, 4\)"):
        ours(x, s, c, ref_latents=[good, bad], ref_latents_method="index")
    with pytest.raises(ConditioningError, match="without ref_latents_method.*FluxKontextMultiReferenceLatentMethod"):
        ours(x, s, c, ref_latents=[good])
    with pytest.raises(ConditioningError, match="latent must have 16 channels"):
        ours(torch.randn(2, 8, 4, 4), s, c)


# -- attention patches ------------------------------------------------------------------------------------


def test_identity_attn1_patch_is_bit_identical_and_sees_native_shapes(pair):
    cfg, _, ours, _ = pair
    x, s, c = inputs(cfg)
    refs = [torch.randn(1, 16, 4, 6)]
    seen = []

    def identity(q, k, v, pe, attn_mask, extra_options):
        seen.append((q.shape, k.shape, v.shape, pe.shape, extra_options["block_index"],
                     extra_options["img_slice"], extra_options["total_blocks"], extra_options["block_type"],
                     extra_options.get("cond_or_uncond")))
        return {"q": q, "k": k, "v": v}

    opts = {"patches": {"attn1_patch": [identity]}, "cond_or_uncond": [0, 1]}
    with torch.no_grad():
        for kw in ({}, {"ref_latents": refs, "ref_latents_method": "index_timestep_zero"}):
            seen.clear()
            plain = ours(x, s, c, **kw)
            patched = ours(x, s, c, transformer_options=opts, **kw)
            assert torch.equal(plain, patched)
            L = 5 + 12 + (6 if kw else 0)
            assert seen == [((2, cfg.heads, L, cfg.head_dim), (2, cfg.kv_heads, L, cfg.head_dim),
                             (2, cfg.kv_heads, L, cfg.head_dim), (2, 1, L, cfg.head_dim // 2, 2, 2), i, [5, L],
                             cfg.layers, "single", [0, 1]) for i in range(cfg.layers)]
    assert "block_index" not in opts  # the caller's dict is not written to


def test_zero_v_patch_equals_zeroed_value_weights(pair):
    cfg, sd, ours, _ = pair
    x, s, c = inputs(cfg)
    zeroed = {k: (torch.zeros_like(v) if k.startswith("blocks.") and k.endswith("attn.wv.weight") else v)
              for k, v in sd.items()}
    hand = load_transformer(zeroed, dtype=torch.float32)
    opts = {"patches": {"attn1_patch": [lambda q, k, v, pe, attn_mask, extra_options: {"v": torch.zeros_like(v)}]}}
    with torch.no_grad():
        got = ours(x, s, c, transformer_options=opts)
        want = hand(x, s, c)
        plain = ours(x, s, c)
    assert rel(got, want) <= 1e-6
    assert rel(got, plain) > 1e-2


def test_pe_returned_by_a_patch_is_used(pair):
    cfg, _, ours, _ = pair
    x, s, c = inputs(cfg)
    with torch.no_grad():
        plain = ours(x, s, c)
        same = ours(x, s, c, transformer_options={"patches": {"attn1_patch": [
            lambda q, k, v, pe, attn_mask, extra_options: {"pe": pe.clone()}]}})
        none = ours(x, s, c, transformer_options={"patches": {"attn1_patch": [
            lambda q, k, v, pe, attn_mask, extra_options: {"pe": None}]}})
    assert rel(same, plain) <= 1e-6  # a copy of the host-layout table rotates exactly as ours
    assert rel(none, plain) > 1e-3    # no positions at all is a different model


def test_attn1_output_patch_sees_target_and_references(pair):
    cfg, _, ours, _ = pair
    x, s, c = inputs(cfg)
    refs = [torch.randn(1, 16, 4, 4), torch.randn(1, 16, 2, 6)]
    seen = []

    def halve_image(out, extra_options):
        a, b = extra_options["img_slice"]
        seen.append((out.shape, a, b))
        out[:, a:b] *= 0.5
        return out

    with torch.no_grad():
        plain = ours(x, s, c, ref_latents=refs, ref_latents_method="index")
        got = ours(x, s, c, ref_latents=refs, ref_latents_method="index",
                   transformer_options={"patches": {"attn1_output_patch": [halve_image]}})
    L = 5 + 12 + 4 + 3
    assert seen == [((2, L, cfg.heads * cfg.head_dim), 5, L)] * cfg.layers
    assert rel(got, plain) > 1e-3


# -- block replacement and post_input ---------------------------------------------------------------------


def test_block_replace_skip_equals_block_removed(pair):
    cfg, _, ours, _ = pair
    x, s, c = inputs(cfg)
    hand = copy.deepcopy(ours)
    hand.blocks = torch.nn.ModuleList([b for i, b in enumerate(hand.blocks) if i != 1])
    calls = []

    def skip(args, extra):
        calls.append(args["transformer_options"]["block_index"])
        return args

    def through(args, extra):
        before = args["img"].clone()
        out = extra["original_block"](args)
        assert torch.equal(args["img"], before)  # the original block did not write over its input
        return out

    with torch.no_grad():
        skipped = ours(x, s, c, transformer_options={"patches_replace": {"dit": {("single_block", 1): skip}}})
        want = hand(x, s, c)
        plain = ours(x, s, c)
        passed = ours(x, s, c, transformer_options={"patches_replace": {"dit": {
            ("single_block", i): through for i in range(cfg.layers)}}})
        refs = [torch.randn(1, 16, 4, 4)]
        t0 = ours(x, s, c, ref_latents=refs, ref_latents_method="index_timestep_zero")
        t0_passed = ours(x, s, c, ref_latents=refs, ref_latents_method="index_timestep_zero",
                         transformer_options={"patches_replace": {"dit": {("single_block", 0): through}}})
    assert calls == [1]
    assert torch.equal(skipped, want)
    assert rel(skipped, plain) > 1e-2
    assert rel(passed, plain) <= 1e-6 and rel(t0_passed, t0) <= 1e-6


def test_post_input_patch_and_text_cache_stay_exact(pair):
    cfg, _, ours, _ = pair
    x, s, c = inputs(cfg)
    got = []

    def scribble(d):  # writes into the text tokens it is given: the cached text stage must not change
        got.append((d["img"].shape, d["txt"].shape, d["img_ids"].shape, d["txt_ids"].shape, d["img_ids"].dtype))
        d["txt"].mul_(0.0)
        return d

    def shift_rows(d):  # moves the image one row down: positions rebuilt from the returned ids
        ids = d["img_ids"].clone()
        ids[..., 1] += 1
        return {**d, "img_ids": ids}

    with torch.inference_mode():
        ours.clear_text_cache()
        plain = ours(x, s, c)
        scribbled = ours(x, s, c, transformer_options={"patches": {"post_input": [scribble]}})
        again = ours(x, s, c)                                    # a cache hit after the scribble
        shifted = ours(x, s, c, transformer_options={"patches": {"post_input": [shift_rows]}})
    assert got == [((2, 12, cfg.hidden), (2, 5, cfg.hidden), (2, 12, 3), (2, 5, 3), torch.float32)]
    assert rel(scribbled, plain) > 1e-3
    assert torch.equal(again, plain)
    assert rel(shifted, plain) > 1e-4


def test_no_options_and_empty_options_are_the_same_path(pair):
    cfg, _, ours, _ = pair
    x, s, c = inputs(cfg)
    with torch.no_grad():
        a = ours(x, s, c)
        b = ours(x, s, c, transformer_options={"patches": {}, "patches_replace": {}, "sigmas": s})
    assert torch.equal(a, b)


# -- issue 12: odd latent sizes against diffusers on the padded input -------------------------------------


@pytest.mark.parametrize("hw", [(7, 9), (5, 6), (8, 3)])
def test_odd_latent_sizes_equal_diffusers_on_the_padded_input(pair, hw):
    cfg, _, ours, ref = pair
    H, W = hw
    x, s, c = inputs(cfg, H=H, W=W)
    want = diffusers_with_refs(ref, cfg, x, s, c, [])   # circularly padded, run, cropped back
    with torch.no_grad():
        got = ours(x, s, c)
        got5 = ours(x.unsqueeze(2), s, c)
    assert got.shape == x.shape and rel(got, want) <= 1e-5
    assert torch.equal(got5[:, :, 0], got)


def test_reference_kv_cache_pattern_default_method_and_fewer_queries_than_positions(pair):
    """ComfyUI's FluxKVCache, in plain torch: default_ref_method set on the model, the first call caches the
    reference tokens' k/v per block (attn1_patch, before RoPE), later calls drop the reference tokens
    (post_input) and append the cached k/v. Same input twice: the second call must give the first's result."""
    cfg, _, ours, _ = pair
    x, s, c = inputs(cfg)
    refs = [torch.randn(1, 16, 4, 6)]
    cache = {}

    def kv(q, k, v, pe, attn_mask, extra_options):
        n = sum(extra_options["reference_image_num_tokens"])
        key = extra_options["block_index"]
        if key in cache:
            kk, vv = cache[key]
            return {"k": torch.cat([k, kk], dim=2), "v": torch.cat([v, vv], dim=2)}
        cache[key] = (k[:, :, -n:].clone(), v[:, :, -n:].clone())
        return {}

    def drop(d):
        if cache:
            d["img"] = d["img"][:, :-sum(d["transformer_options"]["reference_image_num_tokens"])]
        return d

    opts = {"patches": {"attn1_patch": [kv], "post_input": [drop]}}
    model = copy.deepcopy(ours)
    model.default_ref_method = "index_timestep_zero"
    with torch.no_grad():
        want = ours(x, s, c, ref_latents=refs, ref_latents_method="index_timestep_zero")
        first = model(x, s, c, ref_latents=refs, transformer_options=opts)
        second = model(x, s, c, ref_latents=refs, transformer_options=opts)
    assert len(cache) == cfg.layers
    assert torch.equal(first, want)
    assert rel(second, want) <= 1e-5


# -- a host's attention and RoPE (Krea2Transformer.attention_backend / rope_backend) --------------------------


def rotate_with_pe(x, pe):
    """``x (B, H, L, D)`` rotated by ComfyUI-layout matrices ``pe (B, 1, L, D/2, 2, 2)``: the test's own rotation."""
    xp = x.float().unflatten(-1, (-1, 2))                                   # (B, H, L, D/2, 2)
    out = (pe[..., 0] * xp[..., 0:1] + pe[..., 1] * xp[..., 1:2])            # rows of [[c, -s], [s, c]] . (a, b)
    return out.flatten(-2).to(x.dtype)


def test_attention_and_rope_backends_run_every_layer_with_the_options(pair):
    """With a backend set, every attention of the text stage and the blocks goes through it with the forward's
    options (block_index in the blocks only, as native passes them), and RoPE through the rope backend with the
    host's matrices; the output equals the default path. A backend that changes attention changes the output,
    text stage included: the text cache does not hand back tokens computed under another backend."""
    from krea2_model.model.attention import attention
    cfg, _, _, _ = pair
    ours = load_transformer(random_state_dict(cfg, 5), dtype=torch.float32)
    x, s, c = inputs(cfg)
    calls, rotations = [], []

    def attend(q, k, v, mask, options, scale=1.0):
        calls.append((tuple(q.shape), tuple(k.shape), options.get("block_index"), options.get("cond_or_uncond")))
        return attention(q, k, v, mask) * scale

    def rope(q, k, pe):
        rotations.append((tuple(q.shape), tuple(k.shape), tuple(pe.shape)))
        return rotate_with_pe(q, pe), rotate_with_pe(k, pe)

    with torch.no_grad():
        plain = ours(x, s, c)
        ours.attention_backend, ours.rope_backend = attend, rope
        via = ours(x, s, c, transformer_options={"cond_or_uncond": [0, 1]})
        L = 5 + 12
        th, tkv, td = cfg.text_heads, cfg.text_kv_heads, cfg.text_head_dim
        text = [((2 * 5, th, cfg.text_taps, td), (2 * 5, tkv, cfg.text_taps, td), None, [0, 1])] * \
            cfg.text_layerwise_blocks + [((2, th, 5, td), (2, tkv, 5, td), None, [0, 1])] * cfg.text_refiner_blocks
        blocks = [((2, cfg.heads, L, cfg.head_dim), (2, cfg.kv_heads, L, cfg.head_dim), i, [0, 1])
                  for i in range(cfg.layers)]
        assert calls == text + blocks
        assert rotations == [((2, cfg.heads, L, cfg.head_dim), (2, cfg.kv_heads, L, cfg.head_dim),
                              (2, 1, L, cfg.head_dim // 2, 2, 2))] * cfg.layers
        assert rel(via, plain) <= 1e-6
        ours.attention_backend = lambda q, k, v, mask, options: attend(q, k, v, mask, options, 0.5)
        calls.clear()
        halved = ours(x, s, c)
        assert len(calls) == len(text) + len(blocks)  # the text stage ran again under the new backend
        assert rel(halved, plain) > 1e-3


def test_grouped_query_attention_equals_repeated_heads_bit_for_bit():
    """The host adapter keeps K/V heads unrepeated under the host's PyTorch attention: exact only if stacking the
    query heads that share a K/V head gives SDPA's bits for repeated heads (checked here on this CPU)."""
    from krea2_model.model.attention import sdpa_attention
    g = torch.Generator().manual_seed(0)
    for L, mask in ((17, False), (300, False), (300, True)):
        q, k, v = (torch.randn(2, h, L, 64, generator=g) for h in (8, 2, 2))
        m = None
        if mask:
            m = torch.ones(2, 1, 1, L, dtype=torch.bool)
            m[1, ..., :5] = False
        want = F.scaled_dot_product_attention(q, k.repeat_interleave(4, 1), v.repeat_interleave(4, 1), attn_mask=m)
        assert torch.equal(sdpa_attention(q, k, v, m), want.transpose(1, 2).reshape(2, L, 8 * 64)), (L, mask)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_rms_norm_gives_f_rms_norm_bits(dtype):
    """Our eager CPU RMSNorm is F.rms_norm (what native Krea 2 calls) bit for bit, at the widths Krea 2 uses."""
    from krea2_model.model.layers import RMSNorm
    g = torch.Generator().manual_seed(1)
    for shape in ((3, 7, 6144), (2, 40, 12, 2560), (1, 300, 48, 128), (5, 160)):
        norm = RMSNorm(shape[-1], 1e-5)
        norm.scale.data.normal_(0, 0.1, generator=g)
        x = (torch.randn(shape, generator=g) * 3).to(dtype)
        want = F.rms_norm(x.float(), (shape[-1],), weight=norm.scale + 1, eps=1e-5).to(dtype)
        with torch.no_grad():
            assert torch.equal(norm(x), want), shape
