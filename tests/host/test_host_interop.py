"""Interop with ComfyUI 0.33's native Krea 2 (host tier, native hosts only).

Our conditioning drives core's native Krea 2 model, Krea2ModelSampling on the native MODEL gives
the reference schedule, and our CLIP works with core's CLIPTextEncode: the native graph's final
latent equals a plain Euler loop over krea2_model with the same weights. The other way round, core's own
Krea 2 text encoder conditions our transformer exactly like ours.
"""

import os

import pytest

from comfy_host import PACK_DIRNAME
from tests.host import assets as A
from tests.host.test_host_nodes import SIZE, host_script, read_latent, reference, rel, run, saved

pytestmark = pytest.mark.host


def native_host(host):
    """The main host with native Krea 2 and the interop assets (a model native can build, a text encoder whose
    taps fit it); skips on a host without native Krea 2."""
    if not host.native_krea2:
        pytest.skip(f"ComfyUI {host.version} has no native Krea 2")
    host.root = str(host.comfy_dir)
    host.pack_dir = str(host.custom_nodes_dir / PACK_DIRNAME)
    if not getattr(host, "_krea2_interop", None):
        host._krea2_interop = A.make_interop_assets(str(host.models_dir))
    return host


@pytest.fixture(scope="module")
def nh(host):
    return native_host(host)


def native_graph(prefix, encoder="Krea2TextEncode", seed=21, steps=6, cfg=4.5):
    enc = (lambda t: {"class_type": encoder, "inputs": {"clip": ["2", 0], "text": t}})
    return {
        "1": {"class_type": "UNETLoader", "inputs": {"unet_name": A.INTEROP, "weight_dtype": "default"}},
        "2": {"class_type": "Krea2TextEncoderLoader", "inputs": {"text_encoder_name": A.INTEROP_TEXT}},
        "3": enc("a lighthouse on a cliff at sunset"),
        "4": enc("blurry, low quality"),
        "5": {"class_type": "Krea2ModelSampling", "inputs": {"model": ["1", 0], "variant": "raw", "width": SIZE,
                                                            "height": SIZE}},
        "6": {"class_type": "EmptySD3LatentImage", "inputs": {"width": SIZE, "height": SIZE, "batch_size": 1}},
        "7": {"class_type": "KSampler", "inputs": {"model": ["5", 0], "seed": seed, "steps": steps, "cfg": cfg,
                                                  "sampler_name": "euler", "scheduler": "simple",
                                                  "positive": ["3", 0], "negative": ["4", 0],
                                                  "latent_image": ["6", 0], "denoise": 1.0}},
        "8": {"class_type": "SaveLatent", "inputs": {"samples": ["7", 0], "filename_prefix": prefix}},
    }


def test_our_conditioning_and_schedule_drive_native_krea2(nh, tmp_path):
    run(nh, native_graph("interop_native"))
    got = read_latent(saved(nh, "interop_native", ".latent"))
    want = reference(nh, tmp_path, transformer=os.path.join(nh.models_dir, "diffusion_models", A.INTEROP),
                     text_encoder=os.path.join(nh.models_dir, "text_encoders", A.INTEROP_TEXT),
                     prompt="a lighthouse on a cliff at sunset", negative="blurry, low quality", seed=21, steps=6,
                     cfg=4.5, variant="raw", width=SIZE, height=SIZE)
    assert rel(got, want) <= 1e-5


def test_core_cliptextencode_with_our_clip_equals_krea2textencode(nh):
    run(nh, native_graph("interop_core_encode", encoder="CLIPTextEncode"))
    a = read_latent(saved(nh, "interop_core_encode", ".latent"))
    b = read_latent(saved(nh, "interop_native", ".latent")) if any(
        f.startswith("interop_native") for f in os.listdir(nh.output_dir)) else None
    if b is None:
        run(nh, native_graph("interop_native"))
        b = read_latent(saved(nh, "interop_native", ".latent"))
    assert rel(a, b) <= 1e-6


def test_cores_own_krea2_clip_conditions_our_model_like_ours(nh, tmp_path):
    """Core's CLIPLoader-type-krea2 encoder (core's loader, tokenizer, template, taps and flattening; its
    size tables shrunk to the tiny test encoder, see core_clip_check.py) gives the conditioning our
    encoder gives, so it drives our transformer to the same velocity; Krea2TextEncode fed core's CLIP
    does too, and cuts long prompts to the reference's 507 tokens where core alone passes all of them."""
    c = A.INTEROP_TEXT_CFG
    long_prompt = " ".join(["lighthouse"] * 600)
    res, r = host_script(nh, tmp_path, "core_clip_check.py", with_run=True,
                         text_encoder=os.path.join(nh.models_dir, "text_encoders", A.INTEROP_TEXT),
                         model=os.path.join(nh.models_dir, "diffusion_models", A.INTEROP),
                         prompts=["a lighthouse on a cliff at sunset", "", "a red fox, watercolor, " * 10, long_prompt],
                         text_cfg={"hidden": c.hidden, "mlp_hidden": c.mlp_hidden, "layers": c.layers, "heads": c.heads,
                                   "kv_heads": c.kv_heads, "vocab": c.vocab, "head_dim": c.head_dim})
    assert res["core_is_krea2"], res
    short, empty, medium, long = res["prompts"]
    for p in (short, empty, medium):
        assert p["core_shape"] == p["ours_shape"] == p["node_core_shape"], p
        assert p["cond_core_vs_ours"] <= 1e-5 and p["velocity_core_vs_ours"] <= 1e-5, p
        assert p["node_with_core_clip_vs_ours"] <= 1e-5, p
    assert long["core_shape"][1] > 512 and long["ours_shape"][1] == long["node_core_shape"][1] == 512, long
    assert long["node_with_core_clip_vs_ours"] <= 1e-5 and long["velocity_node_core_vs_ours"] <= 1e-5, long
    assert "reads at most 507" in r.stderr
