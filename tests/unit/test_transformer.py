"""Transformer parity with diffusers 0.42.1 and checkpoint layouts (issue: transformer foundation)."""

import os
import struct

import pytest
import torch

from krea2_model import (ConditioningError, Krea2FileError, MissingTensorsError, NotKrea2Error, PickleRefusedError,
                         ShapeMismatchError, load_transformer)
from krea2_model.formats.transformer_file import (CanonicalCheckpoint, canonical_to_diffusers, diffusers_to_canonical,
                                    expected_shapes)
from krea2_model.tiny.transformer import CONFIGS, diffusers_config, random_state_dict, to_layout, write

# diffusers is a pinned test dependency: imported, so a missing one fails the run
from diffusers import Krea2Transformer2DModel  # noqa: E402
from diffusers.pipelines.krea2.pipeline_krea2 import Krea2Pipeline  # noqa: E402


def rel(a, b):
    return ((a.float() - b.float()).norm() / b.float().norm()).item()


def reference_velocity(ref, x, sigma, ctx4, mask):
    """diffusers fed the pipeline's layout: packed latents, padded text + mask, (L, 3) position ids."""
    B, C, H, W = x.shape
    p = 2
    gh, gw = H // p, W // p
    img = x.view(B, C, gh, p, gw, p).permute(0, 2, 4, 1, 3, 5).reshape(B, gh * gw, C * p * p)
    pos = Krea2Pipeline.prepare_position_ids(ctx4.shape[1], gh, gw, x.device)
    with torch.no_grad():
        v = ref(img, ctx4, sigma, pos, encoder_attention_mask=mask, return_dict=False)[0]
    return v.view(B, gh, gw, C, p, p).permute(0, 3, 1, 4, 2, 5).reshape(B, C, H, W)


def make_pair(name, seed=1, dtype=torch.float32):
    cfg = CONFIGS[name]
    sd = random_state_dict(cfg, seed)
    ref = Krea2Transformer2DModel(**diffusers_config(cfg)).eval()
    ref.load_state_dict(to_layout(sd, "diffusers"), strict=True)
    ref.to(dtype)
    ours = load_transformer(sd, dtype=dtype)
    return cfg, sd, ours, ref


@pytest.mark.parametrize("name", ["tiny", "gqa", "mha"])
@pytest.mark.parametrize("dtype,tol", [(torch.float32, 1e-5), (torch.bfloat16, 2e-2)])
def test_parity_with_diffusers_padded_reference(name, dtype, tol):
    cfg, _, ours, ref = make_pair(name, dtype=dtype)
    g = torch.Generator().manual_seed(3)
    B, H, W = 2, 6, 10  # non-square grid 3x5
    real = [7, 4]
    pad = 32  # the reference pads text; we feed only the real tokens
    x = torch.randn(B, 16, H, W, generator=g)
    # bf16-representable times: the reference pipeline casts t to the latent dtype, ComfyUI keeps fp32
    sigma = torch.tensor([0.83, 0.21]).to(dtype).float()
    ctx = torch.randn(B, pad, cfg.text_taps, cfg.text_dim, generator=g)
    mask = torch.zeros(B, pad, dtype=torch.bool)
    for i, n in enumerate(real):
        mask[i, :n] = True
    want = reference_velocity(ref, x.to(dtype), sigma.to(dtype), ctx.to(dtype), mask)
    with torch.no_grad():
        for i, n in enumerate(real):
            got = ours(x[i:i + 1].to(dtype), sigma[i:i + 1], ctx[i:i + 1, :n].flatten(2).to(dtype))
            assert got.dtype == dtype and got.shape == (1, 16, H, W)
            assert rel(got, want[i:i + 1]) <= tol
        # batch 2 with mixed prompt lengths: same result through our own mask
        got = ours(x.to(dtype), sigma, ctx.flatten(2).to(dtype), attention_mask=mask)
        assert rel(got, want) <= tol


def test_five_d_latent_and_unpadded_sides():
    cfg, _, ours, ref = make_pair("tiny")
    g = torch.Generator().manual_seed(5)
    ctx = torch.randn(1, 6, cfg.text_taps * cfg.text_dim, generator=g)
    x4 = torch.randn(1, 16, 6, 8, generator=g)
    with torch.no_grad():
        v4 = ours(x4, torch.tensor([0.5]), ctx)
        v5 = ours(x4.unsqueeze(2), torch.tensor([0.5]), ctx)
        assert v5.shape == (1, 16, 1, 6, 8)
        assert torch.equal(v5[:, :, 0], v4)
        odd = torch.randn(1, 16, 7, 9, generator=g)
        out = ours(odd, torch.tensor([0.5]), ctx)
    assert out.shape == odd.shape and torch.isfinite(out).all()


def test_conditioning_width_error_names_the_encoder():
    cfg, _, ours, _ = make_pair("tiny")
    with pytest.raises(ConditioningError, match="T5-XXL"):
        ours(torch.randn(1, 16, 4, 4), torch.tensor([0.5]), torch.randn(1, 5, 4096))
    with pytest.raises(ConditioningError, match=f"{cfg.text_taps} text-encoder taps"):
        ours(torch.randn(1, 16, 4, 4), torch.tensor([0.5]), torch.randn(1, 5, 77))


def test_key_maps_agree_with_diffusers_converter():
    from diffusers.loaders.single_file_utils import convert_krea2_transformer_checkpoint_to_diffusers

    cfg = CONFIGS["gqa"]
    sd = random_state_dict(cfg, 2)
    theirs = convert_krea2_transformer_checkpoint_to_diffusers({"model.diffusion_model." + k: v for k, v in sd.items()})
    ours = to_layout(sd, "diffusers")
    assert set(theirs) == set(ours)
    for k in ours:
        assert torch.equal(theirs[k], ours[k]), k
        assert canonical_to_diffusers(diffusers_to_canonical(k)) == k


@pytest.fixture(scope="module")
def layouts(tmp_path_factory):
    d = tmp_path_factory.mktemp("layouts")
    cfg = CONFIGS["gqa"]
    sd = random_state_dict(cfg, 4, torch.bfloat16)
    paths = {lay: write(sd, str(d / (lay if lay == "diffusers-folder" else lay + ".safetensors")), lay, cfg)
             for lay in ("original", "comfy", "diffusers", "diffusers-folder")}
    return sd, paths


def test_every_layout_loads_bit_identical(layouts):
    sd, paths = layouts
    assert os.path.isfile(os.path.join(paths["diffusers-folder"], "diffusion_pytorch_model.safetensors.index.json"))
    models = {lay: load_transformer(p) for lay, p in paths.items()}
    base = models["original"].state_dict()
    for k, v in sd.items():
        want = v.float() if k.endswith(".scale") else v
        assert torch.equal(base[k], want), k
    for lay, m in models.items():
        other = m.state_dict()
        assert set(other) == set(base)
        for k in base:
            assert other[k].dtype == base[k].dtype and torch.equal(other[k], base[k]), (lay, k)
    assert {CanonicalCheckpoint(p).layout for p in paths.values()} == {"original", "comfy", "diffusers"}


def test_extra_tensors_are_reported_by_name(tmp_path, caplog):
    from safetensors.torch import save_file

    sd = random_state_dict(CONFIGS["tiny"], 0)
    sd["blocks.0.attn.unused_probe.weight"] = torch.zeros(2)
    p = tmp_path / "extra.safetensors"
    save_file(sd, str(p))
    with caplog.at_level("WARNING", logger="krea2"):
        load_transformer(str(p))
    assert "blocks.0.attn.unused_probe.weight" in caplog.text and "1 tensors" in caplog.text


def test_scaled_fp8_file_is_dequantised(tmp_path):
    from safetensors.torch import save_file

    sd = random_state_dict(CONFIGS["tiny"], 0)
    q = {}
    for k, v in sd.items():
        if k.endswith(".weight") and v.ndim == 2 and k.startswith("blocks."):
            s = v.abs().max() / 448.0
            q["model.diffusion_model." + k] = (v / s).to(torch.float8_e4m3fn)
            q["model.diffusion_model." + k[:-len("weight")] + "scale_weight"] = s.reshape(())
        else:
            q["model.diffusion_model." + k] = v
    q["model.diffusion_model.scaled_fp8"] = torch.zeros(0, dtype=torch.float8_e4m3fn)
    p = tmp_path / "fp8_scaled.safetensors"
    save_file(q, str(p))
    m = load_transformer(str(p), dtype=torch.float32)
    got = m.state_dict()
    for k in sd:
        fk = "model.diffusion_model." + k
        if q[fk].dtype == torch.float8_e4m3fn:  # the stored fp8 numbers times their scale, exactly
            scale = q[fk[:-len("weight")] + "scale_weight"]
            assert got[k].dtype == torch.float32 and torch.equal(got[k], q[fk].float() * scale), k
    assert sum(v.dtype == torch.float8_e4m3fn for v in q.values()) >= 8  # the file really holds fp8 weights


def _comfy_quant(conf: dict) -> torch.Tensor:
    import json
    return torch.tensor(list(json.dumps(conf).encode()), dtype=torch.uint8)


def _quantized_file(tmp_path, fmt, per_row=False, conf_extra=None):
    """The tiny model with every block Linear weight stored as ComfyUI's per-layer ``fmt`` (``comfy_quant`` +
    ``weight_scale``), as a ComfyUI repack lays it out. Returns the path and the weights' exact real values.
    ``conf_extra`` may relabel the format; one that packs 4-bit values or pads gets its stored shape."""
    from safetensors.torch import save_file
    from krea2_model.formats.quant import stored_shape

    sd = random_state_dict(CONFIGS["tiny"], 0)
    q, want = {}, {}
    top = {"int8_tensorwise": 127.0, "float8_e4m3fn": 448.0}[fmt]
    for k, v in sd.items():
        if k.endswith(".weight") and v.ndim == 2 and k.startswith("blocks."):
            s = (v.abs().amax(dim=1, keepdim=True) if per_row else v.abs().max()) / top
            if fmt == "int8_tensorwise":
                stored = (v / s).round().clamp(-127, 127).to(torch.int8)
            else:
                stored = (v / s).to(torch.float8_e4m3fn)
            label = (conf_extra or {}).get("format", fmt)
            if stored_shape(stored.shape, label) != tuple(stored.shape):
                # a format that packs or pads: bytes in the shape ComfyUI stores it in (their values never read)
                stored = torch.zeros(stored_shape(stored.shape, label), dtype=torch.uint8)
            q["model.diffusion_model." + k] = stored
            q["model.diffusion_model." + k[:-len("weight")] + "weight_scale"] = s.float()
            q["model.diffusion_model." + k[:-len("weight")] + "comfy_quant"] = _comfy_quant(
                {"format": fmt, **(conf_extra or {})})
            want[k] = stored.float() * s.float()
        else:
            q["model.diffusion_model." + k] = v
    p = tmp_path / f"{fmt}.safetensors"
    save_file(q, str(p))
    return str(p), want


@pytest.mark.parametrize("fmt,per_row", [("int8_tensorwise", False), ("int8_tensorwise", True),
                                         ("float8_e4m3fn", False)])
def test_comfy_per_layer_quantized_file_is_dequantised_exactly(tmp_path, fmt, per_row):
    """ComfyUI's per-layer quantized files: the stored numbers times their scale, exactly (main loaded the raw
    int8 values, up to 127, for an int8_tensorwise weight)."""
    path, want = _quantized_file(tmp_path, fmt, per_row)
    got = load_transformer(path, dtype=torch.float32).state_dict()
    for k, w in want.items():
        assert torch.equal(got[k], w), k


@pytest.mark.parametrize("conf", [{"format": "nvfp4"}, {"format": "mxfp8"}, {"format": "convrot_w4a4"},
                                  {"format": "int8_tensorwise", "params": {"convrot": True}},
                                  {"format": "a_future_format"}])
def test_unreadable_quant_formats_are_refused_by_name(tmp_path, conf):
    from krea2_model.errors import QuantFormatError

    path, _ = _quantized_file(tmp_path, "int8_tensorwise", conf_extra=conf)
    with pytest.raises(QuantFormatError) as e:
        load_transformer(path)
    msg = str(e.value)
    assert path in msg and "blocks.0." in msg
    assert ("ConvRot" if conf.get("params") else f"'{conf['format']}'") in msg


def test_packed_and_padded_quant_formats_are_sized_from_their_logical_shape():
    """nvfp4 / convrot_w4a4 store two 4-bit values per byte and mxfp8 pads to 32: the size is read through that
    (as ComfyUI's own loader does), and a weight in the wrong stored shape is still a shape error."""
    from krea2_model.formats.quant import logical_shape, stored_shape
    assert stored_shape((6144, 16384), "nvfp4") == (6144, 8192) and logical_shape((6144, 8192), "nvfp4") == (
        6144, 16384)
    assert stored_shape((1536, 6144), "convrot_w4a4") == (1536, 3072)
    assert stored_shape((16, 64), "mxfp8") == (32, 64) and stored_shape((16, 64), "int8_tensorwise") == (16, 64)
    assert stored_shape((12,), "nvfp4") == (12,)


def test_transformer_and_text_readers_share_one_dequantizer():
    """One helper for both checkpoint readers (they disagreed: the text side refused what the transformer side
    loaded raw)."""
    import krea2_model.formats.quant as Q
    import krea2_model.formats.text_file as TF
    import krea2_model.formats.transformer_file as MF

    assert MF.dequantize is Q.dequantize and TF.dequantize is Q.dequantize


# -- bad input -------------------------------------------------------------------------------------------


def test_not_krea2_file(tmp_path):
    from safetensors.torch import save_file

    p = tmp_path / "flux.safetensors"
    save_file({"double_blocks.0.img_attn.qkv.weight": torch.zeros(4, 4),
               "single_blocks.0.linear1.weight": torch.zeros(4, 4)}, str(p))
    with pytest.raises(NotKrea2Error) as e:
        load_transformer(str(p))
    assert str(p) in str(e.value) and "Flux" in str(e.value)


def test_truncated_and_corrupt_files(tmp_path):
    src = write(random_state_dict(CONFIGS["tiny"], 0), str(tmp_path / "ok.safetensors"), "original")
    data = open(src, "rb").read()
    trunc = tmp_path / "trunc.safetensors"
    trunc.write_bytes(data[: len(data) // 2])
    with pytest.raises(Krea2FileError, match="truncated") as e:
        load_transformer(str(trunc))
    assert str(trunc) in str(e.value)
    bad = tmp_path / "garbage.safetensors"
    bad.write_bytes(struct.pack("<Q", 20) + b"{not json at all!!!}" + b"\0" * 10)
    with pytest.raises(Krea2FileError, match="corrupt"):
        load_transformer(str(bad))
    empty = tmp_path / "empty.safetensors"
    empty.write_bytes(b"")
    with pytest.raises(Krea2FileError, match="too short"):
        load_transformer(str(empty))
    with pytest.raises(Krea2FileError, match="no such file"):
        load_transformer(str(tmp_path / "absent.safetensors"))


def test_missing_tensors_count_and_names(tmp_path):
    sd = random_state_dict(CONFIGS["tiny"], 0)
    gone = [k for k in sd if k.startswith("blocks.1.mlp.")]
    for k in gone:
        del sd[k]
    p = write(sd, str(tmp_path / "partial.safetensors"), "original")
    with pytest.raises(MissingTensorsError) as e:
        load_transformer(p)
    msg = str(e.value)
    assert p in msg and f"{len(gone)} of the {len(expected_shapes(CONFIGS['tiny']))}" in msg
    assert "blocks.1.mlp.down.weight" in msg


def test_shape_mismatch_names_key_seen_expected(tmp_path):
    sd = random_state_dict(CONFIGS["tiny"], 0)
    sd["blocks.1.attn.wo.weight"] = torch.zeros(64, 60)
    p = write(sd, str(tmp_path / "mixed.safetensors"), "original")
    with pytest.raises(ShapeMismatchError) as e:
        load_transformer(p)
    msg = str(e.value)
    assert "blocks.1.attn.wo.weight" in msg and "[64, 60]" in msg and "[64, 64]" in msg and p in msg


@pytest.mark.parametrize("name", ["model.ckpt", "model.pt", "model.bin", "disguised.safetensors"])
def test_pickle_checkpoints_are_refused_unopened(tmp_path, name):
    p = tmp_path / name
    torch.save({"first.weight": torch.zeros(2)}, str(p))  # a real pickle (zip) file
    with pytest.raises(PickleRefusedError, match="never unpickle") as e:
        load_transformer(str(p))
    assert str(p) in str(e.value)


def test_sharded_folder_with_missing_shard(tmp_path):
    cfg = CONFIGS["tiny"]
    folder = write(random_state_dict(cfg, 0), str(tmp_path / "dif"), "diffusers-folder", cfg)
    os.remove(os.path.join(folder, "diffusion_pytorch_model-00002-of-00002.safetensors"))
    with pytest.raises(Krea2FileError, match="incomplete"):
        load_transformer(folder)


def test_folder_with_two_shard_indexes_is_refused_listing_them(tmp_path):
    """Main took the first index silently; which model a folder with two holds is a guess."""
    import shutil
    cfg = CONFIGS["tiny"]
    folder = write(random_state_dict(cfg, 0), str(tmp_path / "dif"), "diffusers-folder", cfg)
    shutil.copy(os.path.join(folder, "diffusion_pytorch_model.safetensors.index.json"),
                os.path.join(folder, "other_model.safetensors.index.json"))
    with pytest.raises(Krea2FileError) as e:
        load_transformer(folder)
    msg = str(e.value)
    assert "diffusion_pytorch_model.safetensors.index.json" in msg and "other_model.safetensors.index.json" in msg


def test_every_tensor_knows_its_file(tmp_path):
    from krea2_model.formats.safetensors_io import open_source
    cfg = CONFIGS["tiny"]
    folder = write(random_state_dict(cfg, 0), str(tmp_path / "dif"), "diffusers-folder", cfg)
    src = open_source(folder)
    shards = {src.file_of(k) for k in src.keys()}
    assert len(shards) == 2 and all(os.path.dirname(f) == folder for f in shards)
    for f in shards:  # each key really is in the shard named for it
        assert {k for k in src.keys() if src.file_of(k) == f} == set(open_source(f).keys())


def test_krea2_model_never_imports_comfy():
    root = os.path.join(os.path.dirname(__file__), "..", "..", "krea2_model")
    offenders = []
    for dirpath, _, files in os.walk(root):
        for f in files:
            if f.endswith(".py"):
                for n, line in enumerate(open(os.path.join(dirpath, f), encoding="utf-8"), 1):
                    s = line.strip()
                    if s.startswith(("import comfy", "from comfy")) or "importlib.import_module(\"comfy" in s:
                        offenders.append(f"{f}:{n}: {s}")
    assert not offenders, offenders


def test_import_does_not_load_comfy_at_runtime():
    import subprocess
    import sys

    code = ("import sys, krea2_model, krea2_model.formats.transformer_file, krea2_model.tiny.transformer; "
            "print(sorted(m for m in sys.modules if m == 'comfy' or m.startswith('comfy.')))")
    root = os.path.join(os.path.dirname(__file__), "..", "..")
    out = subprocess.run([sys.executable, "-c", code], cwd=root, capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "[]"


def test_tiny_generator_cli(tmp_path):
    import subprocess
    import sys

    root = os.path.join(os.path.dirname(__file__), "..", "..")
    h = subprocess.run([sys.executable, "-m", "krea2_model.tiny", "--help"], cwd=root, capture_output=True, text=True)
    assert h.returncode == 0 and "--layout" in h.stdout
    r = subprocess.run([sys.executable, "-m", "krea2_model.tiny", "--out", str(tmp_path), "--layout", "comfy"],
                       cwd=root, capture_output=True, text=True)
    assert r.returncode == 0, r.stderr
    (path,) = [p for p in os.listdir(tmp_path)]
    assert CanonicalCheckpoint(str(tmp_path / path)).layout == "comfy"


def test_public_call_order_is_designs():
    """The surface of docs/architecture.md: ``model(x, sigma, context, attention_mask=None, transformer_options=None)``; a
    5th positional argument is the options dict (references go by keyword)."""
    import inspect
    from krea2_model import Krea2Transformer
    names = list(inspect.signature(Krea2Transformer.forward).parameters)[1:6]
    assert names == ["x", "sigma", "context", "attention_mask", "transformer_options"]
    cfg = CONFIGS["tiny"]
    m = load_transformer(random_state_dict(cfg, 0), dtype=torch.float32)
    x = torch.randn(1, cfg.channels, 4, 4)
    ctx = torch.randn(1, 3, cfg.text_taps * cfg.text_dim)
    seen = []

    def recorder(q, k, v, pe=None, attn_mask=None, extra_options=None):
        seen.append(extra_options["block_index"])
        return {"q": q, "k": k, "v": v}

    out = m(x, torch.tensor([0.5]), ctx, None, {"patches": {"attn1_patch": [recorder]}})
    assert seen == list(range(cfg.layers)) and out.shape == x.shape
