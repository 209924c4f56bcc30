"""Interop with ComfyUI 0.33's native Krea 2 (host tier, native hosts only).

Our conditioning drives core's native Krea 2 model, Krea2ModelSampling on the native MODEL gives
the reference schedule, and our CLIP works with core's CLIPTextEncode: the native graph's final
latent equals a plain Euler loop over krea2_model with the same weights.
"""

import os

import pytest

from tests.host import assets as A
from tests.host.test_host_nodes import SIZE, read_latent, reference, rel, run, saved

pytestmark = pytest.mark.host


@pytest.fixture(scope="module")
def nh(host):
    if not host.native_krea2:
        pytest.skip(f"ComfyUI {host.version} has no native Krea 2")
    host.root = str(host.comfy_dir)
    if not getattr(host, "_krea2_interop", None):
        host._krea2_interop = A.make_interop_assets(str(host.models_dir))
    return host


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
