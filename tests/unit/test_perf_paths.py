"""The speed paths keep the outputs: text-stage cache keyed safely, in-place inference path equal to
the autograd path, blocks traceable by torch.compile without graph breaks (issue 6). No timings here."""

import pytest
import torch

from krea2_model import load_transformer
from krea2_model.tiny.transformer import CONFIGS, random_state_dict


def rel(a, b):
    return ((a.float() - b.float()).norm() / b.float().norm()).item()


@pytest.fixture()
def model():
    cfg = CONFIGS["gqa"]
    return cfg, load_transformer(random_state_dict(cfg, 2), dtype=torch.float32)


def _inputs(cfg, seed=0, text=5):
    g = torch.Generator().manual_seed(seed)
    return (torch.randn(1, 16, 6, 8, generator=g), torch.tensor([0.6]),
            torch.randn(1, text, cfg.text_taps * cfg.text_dim, generator=g))


def _count_text_runs(m):
    calls = []
    h = m.txtfusion.register_forward_hook(lambda *a: calls.append(1))
    return calls, h


def test_text_cache_hits_on_equal_content_and_matches_uncached(model):
    cfg, m = model
    x, s, c = _inputs(cfg)
    calls, h = _count_text_runs(m)
    with torch.inference_mode():
        a = m(x, s, c)
        b = m(x, torch.tensor([0.3]), c.clone())   # new tensor, same content, other timestep: a hit
        m.cache_text = False
        ref = m(x, torch.tensor([0.3]), c)
    h.remove()
    assert len(calls) == 2  # first call and the uncached one
    assert torch.equal(b, ref)
    assert a.shape == b.shape


def test_text_cache_misses_on_new_prompt_weight_patch_and_hooks(model):
    cfg, m = model
    x, s, c = _inputs(cfg)
    calls, h = _count_text_runs(m)
    with torch.inference_mode():
        m(x, s, c)
        c2 = c.clone()
        c2[0, 0, 0] += 1.0
        m(x, s, c2)                                   # new prompt content
        assert len(calls) == 2
        w = m.txtfusion.refiner_blocks[0].attn.wq.weight
        w.add_(0.01)                                  # in-place patch (version counter)
        m(x, s, c2)
        assert len(calls) == 3
        w.data.copy_(w.data * 1.01)                   # .data copy: no version bump, caught by sampled values
        m(x, s, c2)
        assert len(calls) == 4
        lin = m.txtmlp[1]
        lin.weight = torch.nn.Parameter(lin.weight.detach().clone() * 1.01, requires_grad=False)  # replaced
        m(x, s, c2)
        assert len(calls) == 5
        lin.weight_function = [lambda w: w * 1.0]     # a host low-VRAM LoRA hook appears
        m(x, s, c2)
        assert len(calls) == 6
        lin.weight_function = [lambda w: w * 1.0]     # replaced by another hook object
        m(x, s, c2)
        assert len(calls) == 7
        m(x, s, c2)                                   # unchanged: a hit
        assert len(calls) == 7
        m(x, s, c2, transformer_options={"krea2_cache_text": False})
        assert len(calls) == 8
    h.remove()


def test_text_cache_keeps_cond_and_uncond_apart(model):
    cfg, m = model
    x, s, c = _inputs(cfg)
    _, _, u = _inputs(cfg, seed=9, text=3)
    calls, h = _count_text_runs(m)
    with torch.inference_mode():
        for _ in range(3):  # cond and uncond in separate calls every step
            m(x, s, c.clone())
            m(x, s, u.clone())
    h.remove()
    assert len(calls) == 2


def test_never_cached_under_autograd(model):
    cfg, m = model
    x, s, c = _inputs(cfg)
    calls, h = _count_text_runs(m)
    with torch.enable_grad():
        m(x, s, c)
        m(x, s, c)
    h.remove()
    assert len(calls) == 2
    assert not m._text_cache.entries


@pytest.mark.parametrize("dtype,tol", [(torch.float32, 1e-6), (torch.bfloat16, 1e-2)])
def test_inference_path_equals_autograd_path(model, dtype, tol):
    cfg, _ = model
    m = load_transformer(random_state_dict(cfg, 2), dtype=dtype)
    m.cache_text = False
    x, s, c = _inputs(cfg)
    x, c = x.to(dtype), c.to(dtype)
    with torch.no_grad():
        fast = m(x, s, c)
    with torch.enable_grad():
        slow = m(x, s, c).detach()
    assert rel(fast, slow) <= tol


def test_block_has_no_graph_breaks(model):
    cfg, m = model
    blk = m.blocks[0]
    L = 12
    h = torch.randn(1, L, cfg.hidden)
    vec = torch.randn(1, 1, 6 * cfg.hidden)
    rope = m.rope(4, 2, 4, "cpu")
    for ctx in (torch.enable_grad, torch.no_grad):
        torch._dynamo.reset()
        with ctx():
            explain = torch._dynamo.explain(blk)(h, vec, rope, None)
        assert explain.graph_break_count == 0, explain.break_reasons


def test_streamed_load_equals_direct_cast_across_chunks(tmp_path, monkeypatch):
    from krea2_model.formats import safetensors_io
    from krea2_model.model.ops import CastOps
    from krea2_model.tiny.transformer import write

    cfg = CONFIGS["tiny"]
    sd = random_state_dict(cfg, 4, torch.bfloat16)
    path = write(sd, str(tmp_path / "k.safetensors"), "diffusers")
    monkeypatch.setattr(safetensors_io, "READ_CHUNK", 40)  # many chunks per tensor, ragged last one
    m8 = load_transformer(path, dtype=torch.float8_e4m3fn, operations=CastOps)
    m16 = load_transformer(path)
    for k, v in sd.items():
        got8, got16 = m8.state_dict()[k], m16.state_dict()[k]
        want = v.reshape(got16.shape)
        # norm scales are kept in float32 (RMSNorm), everything else as stored; the values are the file's either way
        assert got16.dtype == (torch.float32 if k.endswith(".scale") else torch.bfloat16), (k, got16.dtype)
        assert torch.equal(got16.float(), want.float()), k
        if got8.dtype == torch.float8_e4m3fn:
            assert torch.equal(got8.view(torch.uint8), want.to(torch.float8_e4m3fn).view(torch.uint8))
    g = torch.Generator().manual_seed(0)
    x = torch.randn(1, 16, 4, 4, generator=g).bfloat16()
    c = torch.randn(1, 3, cfg.text_taps * cfg.text_dim, generator=g).bfloat16()
    with torch.inference_mode():
        out = m8(x, torch.tensor([0.5]), c)
    assert out.dtype == torch.bfloat16 and torch.isfinite(out.float()).all()
