"""Core's TextGenerate with our CLIP in a real ComfyUI (issue 20): from a GGUF text encoder in a graph posted to
/prompt, greedy output equal to the same graph on the weights dequantized by the gguf package (safetensors);
sampling with the Krea 2 templates' settings runs and a seed repeats; and our sampler draws exactly the tokens
core's own sampler draws for the same logits, options and seed."""

import pytest

from tests.host.comfy_host import PACK_DIRNAME
from tests.host.test_host_gguf import TEXT, TEXT_REF, gh, run  # noqa: F401  (gh: the host with the GGUF assets)
from tests.host.test_host_nodes import host_script

pytestmark = pytest.mark.host

#: the sampling options of ComfyUI's own Krea 2 text-to-image templates
TEMPLATE_SAMPLING = {"sampling_mode": "on", "sampling_mode.temperature": 0.7, "sampling_mode.top_k": 64,
                     "sampling_mode.top_p": 0.95, "sampling_mode.min_p": 0.05,
                     "sampling_mode.repetition_penalty": 1.05, "sampling_mode.seed": 11}


def text_graph(text_encoder, sampling, prompt="a red fox in the snow", max_length=12):
    return {"1": {"class_type": "Krea2TextEncoderLoader", "inputs": {"text_encoder_name": text_encoder}},
            "2": {"class_type": "TextGenerate", "inputs": dict({"clip": ["1", 0], "prompt": prompt,
                                                                "max_length": max_length}, **sampling)},
            "3": {"class_type": "PreviewAny", "inputs": {"source": ["2", 0]}}}


def generated(history) -> str:
    return "".join(history["outputs"]["3"]["text"])


def test_core_text_generate_from_a_gguf_text_encoder_in_a_graph(gh):  # noqa: F811
    info = gh.object_info()
    if "TextGenerate" not in info or "PreviewAny" not in info:
        pytest.skip(f"ComfyUI {gh.version} has no TextGenerate / PreviewAny node")
    greedy = generated(run(gh, text_graph(TEXT, {"sampling_mode": "off"})))
    want = generated(run(gh, text_graph(TEXT_REF, {"sampling_mode": "off"})))
    assert greedy and greedy == want, (greedy, want)
    # the templates' sampling; the same seed again after another prompt (so the node runs again, not from cache)
    a = generated(run(gh, text_graph(TEXT, TEMPLATE_SAMPLING)))
    generated(run(gh, text_graph(TEXT, TEMPLATE_SAMPLING, prompt="a blue bird")))
    again = generated(run(gh, text_graph(TEXT, TEMPLATE_SAMPLING)))
    assert a and a == again


def test_our_sampler_draws_what_cores_sampler_draws(any_host, tmp_path):
    any_host.pack_dir = str(any_host.custom_nodes_dir / PACK_DIRNAME)
    any_host.root = str(any_host.comfy_dir)
    res = host_script(any_host, tmp_path, "generate_check.py")
    if not res:
        pytest.skip(f"ComfyUI {any_host.version} has no LLM sampler (comfy.text_encoders.llama.BaseGenerate.sample_token)")
    for name, r in res.items():
        assert r["same"] == r["seeds"], (name, r)


def test_gguf_generation_copies_layers_once_per_call_with_the_patches(gh, tmp_path):  # noqa: F811
    """On a GGUF text encoder, generation dequantizes each layer once per call (within the host's free memory)
    instead of once per token; the copies carry the weight patches (core's ``add_patches``), so patched and plain
    output each equal the same generation without copies, and the patch acts, as on the dequantized safetensors."""
    import json
    import os
    gh.pack_dir = str(gh.custom_nodes_dir / PACK_DIRNAME)
    gh.root = str(gh.comfy_dir)
    res = host_script(gh, tmp_path, "gguf_generate_check.py",
                      text_encoder=os.path.join(gh.models_dir, "text_encoders", TEXT),
                      reference=os.path.join(gh.models_dir, "text_encoders", TEXT_REF))
    assert res["layers"] >= 2 and res["patched_keys"] == res["layers"], res
    assert len(res["plain_copies"]) >= 2 and res["plain_copies"] == res["plain_per_use"], res
    assert res["lora_copies"] == res["lora_per_use"], res
    assert res["lora_copies"] != res["plain_copies"], json.dumps(res)  # the patch acts
    # and acts as core's patching of the same weights in a safetensors file: before, core's CLIP patcher tried to
    # merge the patch into the packed bytes, logged a shape mismatch and dropped it
    assert res["lora_copies"] == res["lora_reference"], json.dumps(res)
    per_layer = 7  # q, k, v, o, gate, up, down
    assert res["copied_layers"] == [res["layers"] * per_layer, 0] * 2, res
