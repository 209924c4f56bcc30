"""Regional prompts in one forward (issue 23): the attention rule, its effect inside the model, and no change
without regions."""

import os
import subprocess
import sys
import tarfile
import io

import pytest
import torch

from krea2_model import ConditioningError, load_transformer
from krea2_model.model.regions import MAX_REGIONS, RegionalPrompts, make_region, regional_attention_mask
from krea2_model.tiny.transformer import CONFIGS, random_state_dict

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
CFG = CONFIGS["gqa"]
WIDTH = CFG.text_taps * CFG.text_dim


def _rule(kind_q, kind_k):
    """The rule as stated in words (DESIGN / README), one pair of tokens at a time. A kind is ("base",),
    ("text", r) or ("img", set of regions the token is in)."""
    if kind_q[0] in ("base", "img"):
        if kind_k[0] in ("base", "img"):
            return True
        return kind_q[0] == "img" and kind_k[1] in kind_q[1]    # region r's text, for tokens inside r
    r = kind_q[1]                                                # region r's text
    return (kind_k[0] == "text" and kind_k[1] == r) or (kind_k[0] == "img" and r in kind_k[1])


def test_mask_equals_the_rule_token_by_token():
    inside = torch.tensor([[1, 0, 0, 1, 1, 0], [0, 1, 0, 1, 0, 0]], dtype=torch.bool)  # token 3 in both regions
    base, lens, refs = 2, (1, 3), 2
    got = regional_attention_mask(base, lens, inside, refs)[0, 0]
    kinds = [("base",)] * base + [("text", 0)] * lens[0] + [("text", 1)] * lens[1]
    kinds += [("img", {r for r in range(2) if inside[r, j]}) for j in range(inside.shape[1])]
    kinds += [("img", set())] * refs                              # references belong to no region
    want = torch.tensor([[_rule(q, k) for k in kinds] for q in kinds])
    assert got.shape == want.shape == (len(kinds), len(kinds))
    assert torch.equal(got, want), (got.int(), want.int())


def _model():
    return load_transformer(random_state_dict(CFG, 5))


def _inputs(seed=1):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(1, CFG.channels, 8, 12, generator=g)   # a 4 x 6 token grid
    ctx = torch.randn(1, 7, WIDTH, generator=g)
    return x, torch.tensor([0.7]), ctx


def _left_half():
    m = torch.zeros(64, 96)
    m[:, :48] = 1.0
    return m


def test_a_region_prompt_reaches_only_its_tokens_at_block_0():
    """Block 0's output for image tokens outside the region (and for the base text) does not move when the
    region's prompt changes; inside the region it does."""
    model = _model()
    x, s, ctx = _inputs()
    g = torch.Generator().manual_seed(9)
    seen = {}
    model.blocks[0].register_forward_hook(lambda m, a, out: seen.__setitem__("h", out.clone()))
    outs = []
    for prompt in (torch.randn(1, 5, WIDTH, generator=g), torch.randn(1, 5, WIDTH, generator=g)):
        regions = RegionalPrompts([make_region(prompt, _left_half(), "region_1", WIDTH)])
        model(x, s, ctx, krea2_regions=regions)
        outs.append(seen["h"])
    n_text = 7 + 5
    img_a, img_b = outs[0][0, n_text:].view(4, 6, -1), outs[1][0, n_text:].view(4, 6, -1)
    inside, outside = (img_a - img_b)[:, :3], (img_a - img_b)[:, 3:]
    assert outside.abs().max().item() <= 1e-6, outside.abs().max()
    assert inside.abs().amin(dim=-1).min().item() > 0  # every inside token moved
    assert inside.abs().max().item() > 1e-3
    assert (outs[0][0, :7] - outs[1][0, :7]).abs().max().item() <= 1e-6  # the base text never sees region text


def test_no_regions_is_bit_identical_to_the_forward_before_regions(tmp_path):
    """The forward of the commit before regional prompts landed (git archive of it, run in a subprocess) and
    today's, on the same weights and inputs: equal bit for bit."""
    base = subprocess.run(["git", "log", "--format=%H", "-1", "--", "krea2_model/model/regions.py"],
                          capture_output=True, text=True, cwd=ROOT).stdout.strip()
    rev = (base + "~1") if base else "HEAD"
    data = subprocess.run(["git", "archive", rev, "krea2_model"], capture_output=True, cwd=ROOT)
    if data.returncode != 0:
        pytest.skip(f"no git history here to take the earlier forward from: {data.stderr[-200:]!r}")
    tarfile.open(fileobj=io.BytesIO(data.stdout)).extractall(tmp_path / "old")
    x, s, ctx = _inputs()
    torch.save({"sd": random_state_dict(CFG, 5), "x": x, "s": s, "ctx": ctx}, tmp_path / "in.pt")
    code = ("import sys, torch; sys.path.insert(0, sys.argv[1]); from krea2_model import load_transformer; "
            "d = torch.load(sys.argv[2]); m = load_transformer(d['sd']); "
            "torch.save(m(d['x'], d['s'], d['ctx']), sys.argv[3])")
    r = subprocess.run([sys.executable, "-c", code, str(tmp_path / "old"), str(tmp_path / "in.pt"),
                        str(tmp_path / "old.pt")], capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr[-2000:]
    old = torch.load(tmp_path / "old.pt")
    new = _model()(x, s, ctx)
    assert torch.equal(new, old)
    assert torch.equal(_model()(x, s, ctx, krea2_regions=None), old)


def test_a_region_with_the_base_prompt_everywhere_stays_close_to_the_plain_prompt():
    """One region over the whole image with the base prompt itself: every image token sees the prompt twice
    (two copies of its keys), so the result is close to the plain prompt but not equal."""
    model = _model()
    x, s, ctx = _inputs()
    plain = model(x, s, ctx)
    regions = RegionalPrompts([make_region(ctx, torch.ones(64, 96), "region_1", WIDTH)])
    both = model(x, s, ctx, krea2_regions=regions)
    rel = ((both - plain).norm() / plain.norm()).item()
    assert 0 < rel < 0.2, rel


def test_regions_with_references_batches_and_padding_masks_run():
    model = _model()
    x, s, ctx = _inputs()
    x2, ctx2 = torch.cat([x, x.flip(-1)]), torch.cat([ctx, ctx.flip(1)])
    regions = RegionalPrompts([make_region(ctx[:, :3], _left_half(), "region_1", WIDTH),
                               make_region(ctx[:, 3:], 1 - _left_half(), "region_2", WIDTH)])
    ref = [torch.randn(1, CFG.channels, 6, 6, generator=torch.Generator().manual_seed(3))]
    out = model(x2, s.repeat(2), ctx2, krea2_regions=regions, ref_latents=ref, ref_latents_method="index")
    assert out.shape == x2.shape and torch.isfinite(out).all()
    # a batch of two equals each sample alone (regions expand to the batch)
    one = model(x2[1:], s, ctx2[1:], krea2_regions=regions, ref_latents=ref, ref_latents_method="index")
    assert (out[1:] - one).abs().max().item() <= 1e-5
    am = torch.ones(2, 7, dtype=torch.bool)
    am[1, -2:] = False
    padded = model(x2, s.repeat(2), ctx2, attention_mask=am, krea2_regions=regions)
    assert torch.isfinite(padded).all()


def test_bad_regions_are_named():
    with pytest.raises(ConditioningError, match="mask_2|region_2.*covers nothing"):
        make_region(torch.randn(1, 3, WIDTH), torch.zeros(32, 32), "region_2", WIDTH)
    with pytest.raises(ConditioningError, match="region_1.*same Krea 2 text encoder"):
        make_region(torch.randn(1, 3, 4096), torch.ones(32, 32), "region_1", WIDTH)
    r = make_region(torch.randn(1, 3, WIDTH), torch.ones(32, 32), "region_1", WIDTH)
    with pytest.raises(ConditioningError, match=f"at most {MAX_REGIONS}"):
        RegionalPrompts([r] * (MAX_REGIONS + 1))
    tiny = torch.zeros(512, 512)
    tiny[0, 0] = 1.0  # one pixel: inside at full size, no patch at the latent grid
    model = _model()
    x, s, ctx = _inputs()
    with pytest.raises(ConditioningError, match="region_1 covers no latent patch"):
        model(x, s, ctx, krea2_regions=RegionalPrompts([make_region(ctx, tiny, "region_1", WIDTH)]))


def test_attn1_patch_sees_the_regional_mask_and_may_replace_it():
    """Host attention patches get the regional mask as ``attn_mask`` (as native passes masks through), and a
    patch that returns its own mask is used."""
    model = _model()
    x, s, ctx = _inputs()
    regions = RegionalPrompts([make_region(ctx[:, :4], _left_half(), "region_1", WIDTH)])
    seen = []

    def patch(q, k, v, pe=None, attn_mask=None, extra_options=None):
        seen.append(None if attn_mask is None else (tuple(attn_mask.shape), attn_mask.dtype))
        return {}

    out = model(x, s, ctx, krea2_regions=regions, transformer_options={"patches": {"attn1_patch": [patch]}})
    L = 7 + 4 + 24
    assert seen and all(m == ((1, 1, L, L), torch.bool) for m in seen[-CFG.layers:]), seen
    assert torch.equal(out, model(x, s, ctx, krea2_regions=regions))  # an identity patch changes nothing

    def no_mask(q, k, v, pe=None, attn_mask=None, extra_options=None):
        return {"attn_mask": None}
    opened = model(x, s, ctx, krea2_regions=regions, transformer_options={"patches": {"attn1_patch": [no_mask]}})
    assert not torch.equal(opened, out)  # without the mask every token sees every prompt
