"""Images in our text encoder inside a real ComfyUI: Krea2ReferenceEncode, and core's image-aware nodes
(TextEncodeQwenImageEditPlus, TextGenerate) with our CLIP, compared with krea2_model run from the pieces."""

import os

import pytest

from tests.host import assets as A
from tests.host.test_host_nodes import h, host_script  # noqa: F401  (h: the per-host fixture with the tiny assets)

pytestmark = pytest.mark.host


@pytest.fixture
def vision(h, tmp_path):  # noqa: F811
    return h, host_script(h, tmp_path, "vision_check.py",
                          text_encoder=os.path.join(h.models_dir, "text_encoders", A.TEXT),
                          vae=os.path.join(h.models_dir, "vae", A.VAE),
                          tokenizer=os.path.join(h.root, "comfy", "text_encoders", "qwen25_tokenizer"))


def test_reference_encode_conditioning_and_latents_equal_the_pieces(vision):
    h, res = vision
    for method in ("style / edit (timestep zero)", "identity edit"):
        r = res[method]
        assert r["method"] == r["want_method"]
        assert r["cond_rel"] <= 1e-5, r
        assert r["latent_shapes"] == r["want_shapes"] and r["latent_rel"] <= 1e-5, r
        assert r["latent_shapes"][0][-2:] == [192 // 8, 112 // 8]  # 200 x 120 px on the 16 px grid: 192 x 112


def test_core_qwen_image_edit_plus_runs_with_our_clip(vision):
    h, res = vision
    r = res.get("qwen_edit_plus")
    assert r is not None, f"ComfyUI {h.version} has no TextEncodeQwenImageEditPlus"
    assert r["shape"] == r["want_shape"] and r["cond_rel"] <= 1e-5, r


def test_core_text_generate_runs_with_our_clip_and_equals_ours(vision):
    h, res = vision
    if "generate_text" not in res:
        pytest.skip(f"ComfyUI {h.version} has no TextGenerate node")
    for k in ("generate_text", "generate_image"):
        assert res[k]["got"] == res[k]["want"], res[k]
    assert res["generate_seeded_same"]
