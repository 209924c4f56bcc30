"""Inputs and states the transformer used to pass over without a word (issue 21): unknown forward inputs, block
replacements that keep what they were given, 5-D latents of several samples and frames, non-finite output,
reference methods placed as another."""

import logging

import pytest
import torch

from krea2_model import load_transformer
from krea2_model.tiny.transformer import CONFIGS, random_state_dict, write


@pytest.fixture(scope="module")
def model():
    cfg = CONFIGS["tiny"]
    return cfg, load_transformer(random_state_dict(cfg, 3), dtype=torch.float32)


def inputs(cfg, B=2, H=4, W=4, text=3, seed=0):
    g = torch.Generator().manual_seed(seed)
    return (torch.randn(B, 16, H, W, generator=g), torch.tensor([0.7, 0.35][:B]),
            torch.randn(B, text, cfg.text_taps * cfg.text_dim, generator=g))


def krea2_warnings(caplog):
    return [r.getMessage() for r in caplog.records if r.name == "krea2" and r.levelno >= logging.WARNING]


def test_unknown_inputs_get_one_warning_naming_them(model, caplog):
    cfg, ours = model
    ours._warned_inputs.clear()
    x, s, c = inputs(cfg)
    caplog.set_level(logging.WARNING, "krea2")
    with torch.no_grad():
        plain = ours(x, s, c)
        ours(x, s, c, control=None)                      # what the host passes on every call: no input
        assert krea2_warnings(caplog) == []
        with_control = ours(x, s, c, control={"output": [torch.ones(2, 24, 2, 2)]})
        ours(x, s, c, control={"output": [torch.ones(2, 24, 2, 2)]})
    said = krea2_warnings(caplog)
    assert len(said) == 1, said
    assert "'control'" in said[0] and "ControlNet" in said[0] and "native" in said[0]
    assert torch.equal(with_control, plain)             # ignored, as the warning says
    caplog.clear()
    with torch.no_grad():
        ours(x, s, c, ref_latent_method="index")          # a misspelt keyword
    said = krea2_warnings(caplog)
    assert len(said) == 1 and "'ref_latent_method'" in said[0] and "control" not in said[0]


def test_a_replacement_that_keeps_tensors_finds_them_unchanged(model):
    """A ("single_block", i) replacement keeping the tensors it was given and returned (a cache) must find them as
    they were after the forward: the blocks after it must not add into them in place."""
    cfg, ours = model
    x, s, c = inputs(cfg)
    kept = {}

    def cache(args, extra):
        kept["in"], kept["in_copy"] = args["img"], args["img"].clone()
        out = extra["original_block"](args)
        kept["out"], kept["out_copy"] = out["img"], out["img"].clone()
        return out

    with torch.no_grad():
        plain = ours(x, s, c)
        got = ours(x, s, c, transformer_options={"patches_replace": {"dit": {("single_block", 0): cache}}})
    assert torch.equal(kept["out"], kept["out_copy"])
    assert torch.equal(kept["in"], kept["in_copy"])
    assert torch.allclose(got, plain, rtol=0, atol=1e-6)


def test_five_d_latents_keep_each_sample_with_its_own_prompt(model):
    """(B=2, C, T=3, H, W): every frame of sample b gets sample b's time and prompt, as if sampled alone."""
    cfg, ours = model
    g = torch.Generator().manual_seed(4)
    x = torch.randn(2, 16, 3, 4, 4, generator=g)
    s = torch.tensor([0.8, 0.3])
    c = torch.randn(2, 3, cfg.text_taps * cfg.text_dim, generator=g)
    with torch.no_grad():
        v = ours(x, s, c)
        for b in range(2):
            for t in range(3):
                alone = ours(x[b:b + 1, :, t], s[b:b + 1], c[b:b + 1])
                assert torch.allclose(v[b:b + 1, :, t], alone, rtol=0, atol=1e-5), (b, t)


@pytest.fixture()
def damaged(tmp_path):
    """A weights file whose data has a few non-finite values (bytes flipped into NaN / inf exponents)."""
    cfg = CONFIGS["tiny"]
    sd = random_state_dict(cfg, 3)
    sd["blocks.0.mlp.down.weight"].view(-1)[:3] = torch.tensor([float("nan"), float("inf"), 1e38])
    path = write(sd, str(tmp_path / "krea2_damaged.safetensors"), "original", cfg)
    return cfg, load_transformer(path, dtype=torch.float32), path


def test_non_finite_output_is_said_once_per_sample_naming_file_and_step(damaged, caplog):
    cfg, ours, path = damaged
    x, s, c = inputs(cfg)
    sched = torch.tensor([1.0, 0.7, 0.35, 0.0])
    caplog.set_level(logging.WARNING, "krea2")
    with torch.no_grad():
        for sample in range(2):
            for step in range(3):
                out = ours(x, sched[step].expand(2), c,
                           transformer_options={"sample_sigmas": sched, "sigmas": sched[step:step + 1]})
                assert not torch.isfinite(out).all()
    said = krea2_warnings(caplog)
    assert len(said) == 2, said                               # one per sample, not one per step
    for msg in said:
        assert "krea2_damaged.safetensors" in msg and "step 1 of 3" in msg
        assert "damaged" in msg and "fp16" in msg


def test_finite_output_says_nothing(model, caplog):
    cfg, ours = model
    caplog.set_level(logging.WARNING, "krea2")
    with torch.no_grad():
        out = ours(*inputs(cfg))
    assert torch.isfinite(out).all() and krea2_warnings(caplog) == []


@pytest.mark.parametrize("method", ["offset", "uxo"])
def test_offset_and_uxo_say_they_are_placed_as_index(model, caplog, method):
    cfg, ours = model
    ours._warned_method = None
    x, s, c = inputs(cfg)
    refs = [torch.randn(1, 16, 4, 4)]
    caplog.set_level(logging.WARNING, "krea2")
    with torch.no_grad():
        got = ours(x, s, c, ref_latents=refs, ref_latents_method=method)
        ours(x, s, c, ref_latents=refs, ref_latents_method=method)
        want = ours(x, s, c, ref_latents=refs, ref_latents_method="index")
    said = krea2_warnings(caplog)
    assert len(said) == 1 and repr(method) in said[0] and "'index'" in said[0] and "native" in said[0]
    assert torch.equal(got, want)
