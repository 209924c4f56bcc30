"""Images in our text encoder inside a real ComfyUI: Krea2ReferenceEncode, and core's image-aware nodes
(TextEncodeQwenImageEditPlus, TextGenerate) with our CLIP, compared with krea2_model run from the pieces."""

import json
import os
import subprocess

import pytest

from tests.host import assets as A
from tests.host.test_host_nodes import ROOT, h  # noqa: F401  (the per-host fixture with the tiny assets)

pytestmark = pytest.mark.host


@pytest.fixture
def vision(h, tmp_path):  # noqa: F811
    spec = tmp_path / "spec.json"
    spec.write_text(json.dumps({"pack_parent": os.path.dirname(h.pack_dir), "pack_name": os.path.basename(h.pack_dir),
                                "text_encoder": os.path.join(h.models_dir, "text_encoders", A.TEXT),
                                "vae": os.path.join(h.models_dir, "vae", A.VAE),
                                "tokenizer": os.path.join(h.root, "comfy", "text_encoders", "qwen25_tokenizer")}))
    r = subprocess.run([h.python, os.path.join(ROOT, "tests", "host", "vision_check.py"), str(spec)],
                       capture_output=True, text=True, timeout=900, cwd=h.root)
    assert r.returncode == 0, r.stderr[-4000:]
    return h, json.loads(r.stdout.strip().splitlines()[-1])


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
