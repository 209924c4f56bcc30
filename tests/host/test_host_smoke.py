"""Host tier, first checks: the pack loads in a real ComfyUI, its node IDs are there, and the
harness can post a workflow, wait for it, find its files and surface errors. Runs on each host."""

import uuid

import pytest

from host_api import ExecutionError, PromptError

pytestmark = pytest.mark.host

# docs/architecture.md rule 6: frozen IDs and the inputs every saved workflow depends on (more may follow).
FROZEN_NODES = {
    "Krea2ModelLoader": ["model_name", "weight_dtype"],
    "Krea2TextEncoderLoader": ["text_encoder_name"],
    "Krea2TextEncode": ["clip", "text"],
    "Krea2ModelSampling": ["model", "variant", "width", "height"],
    "Krea2LoraLoader": ["model", "lora_name", "strength"],
    "Krea2ReferenceEncode": ["clip", "text", "vae", "image", "method"],  # then the optional image2, image3
}
CATEGORY = "Krea 2"


def _input_names(defn):
    """Input names in declared order (required first), from /object_info."""
    order = defn.get("input_order")
    if order:
        return list(order.get("required", [])) + list(order.get("optional", []))
    inputs = defn.get("input", {})
    return list(inputs.get("required", {})) + list(inputs.get("optional", {}))


def test_server_answers_and_pack_imports(any_host):
    info = any_host.object_info()
    assert "KSampler" in info and "EmptyLatentImage" in info, "core nodes missing from /object_info"
    errors = any_host.pack_import_errors()
    assert not errors, f"ComfyUI {any_host.version} failed to import the pack:\n" + "\n".join(errors)
    assert any_host.pack_import_ok(), (
        f"the pack is not in ComfyUI {any_host.version}'s import table; log tail:\n{any_host.log_tail()}")


def test_native_krea2_detection_matches_what_the_server_offers(any_host):
    """The harness's file check for native Krea 2 agrees with the running server on each host (CLIPLoader
    offers type krea2 exactly when comfy/ldm/krea2 exists), and the main host has it: the side-by-side
    interop tests need it, so a main host without it fails here instead of their skipping quietly."""
    types = any_host.object_info("CLIPLoader")["CLIPLoader"]["input"]["required"]["type"][0]
    assert ("krea2" in types) == any_host.native_krea2, (any_host.version, types)


def test_main_host_has_native_krea2(host):
    assert host.native_krea2, (f"the main host (ComfyUI {host.version} at {host.comfy_dir}) has no native Krea 2; "
                               "the interop tests compare with it. Point COMFYUI_PATH at ComfyUI 0.26 or newer.")


@pytest.mark.parametrize("node_id", sorted(FROZEN_NODES))
def test_frozen_node_ids_and_inputs(any_host, node_id):
    info = any_host.object_info(node_id)
    assert node_id in info, (f"{node_id} not in /object_info of ComfyUI {any_host.version}"
                             + (f"; pack import errors: {any_host.pack_import_errors()}"
                                if any_host.pack_import_errors() else ""))
    defn = info[node_id]
    assert defn.get("category") == CATEGORY
    names = _input_names(defn)
    want = FROZEN_NODES[node_id]
    missing = [n for n in want if n not in names]
    assert not missing, f"{node_id} lacks frozen inputs {missing}; has {names}"
    assert [n for n in names if n in want] == want, f"{node_id} inputs out of frozen order: {names}"
    if node_id == "Krea2ModelSampling":
        variant = (defn["input"].get("required", {}).get("variant")
                   or defn["input"].get("optional", {}).get("variant"))
        # V1 combos are [options, {...}]; V3 combos are ["COMBO", {"options": options, ...}].
        options = variant[0] if isinstance(variant[0], list) else variant[1].get("options", [])
        assert set(options) >= {"raw", "turbo"}, variant


def test_core_workflow_round_trip(any_host):
    """EmptyLatentImage -> SaveLatent and EmptyImage -> SaveImage: no model, proves post/wait/outputs."""
    tag = uuid.uuid4().hex[:8]  # fresh prefix: a cached identical prompt would save nothing new
    wf = {
        "1": {"class_type": "EmptyLatentImage", "inputs": {"width": 64, "height": 64, "batch_size": 1}},
        "2": {"class_type": "SaveLatent", "inputs": {"samples": ["1", 0], "filename_prefix": f"harness/lat_{tag}"}},
        "3": {"class_type": "EmptyImage", "inputs": {"width": 32, "height": 32, "batch_size": 1, "color": 0xFF8000}},
        "4": {"class_type": "SaveImage", "inputs": {"images": ["3", 0], "filename_prefix": f"harness/img_{tag}"}},
    }
    hist = any_host.run(wf, timeout=120)
    assert hist["status"]["status_str"] == "success"
    latents = any_host.outputs(hist, kind="latents")
    images = any_host.outputs(hist, kind="images")
    assert len(latents) == 1 and latents[0].is_file() and latents[0].suffix == ".latent", latents
    assert len(images) == 1 and images[0].is_file() and images[0].suffix == ".png", images
    assert latents[0].parent == any_host.output_dir / "harness"


def test_validation_error_is_raised_with_node_text(any_host):
    wf = {"1": {"class_type": "EmptyLatentImage", "inputs": {"width": 64, "height": 64, "batch_size": 0}},
          "2": {"class_type": "SaveLatent", "inputs": {"samples": ["1", 0], "filename_prefix": "harness/bad"}}}
    with pytest.raises(PromptError) as e:
        any_host.post_prompt(wf)
    assert "batch_size" in str(e.value) and "1" in e.value.node_errors


def test_execution_error_is_raised_with_node_text(any_host):
    # A file LoadLatent lists (validation passes) but cannot parse: fails while running.
    name = f"broken_{uuid.uuid4().hex[:8]}.latent"
    (any_host.input_dir / name).write_bytes(b"not a safetensors file")
    wf = {"1": {"class_type": "LoadLatent", "inputs": {"latent": name}},
          "2": {"class_type": "SaveLatent", "inputs": {"samples": ["1", 0], "filename_prefix": "harness/never"}}}
    with pytest.raises(ExecutionError) as e:
        any_host.run(wf, timeout=120)
    assert "LoadLatent" in str(e.value)
    assert any_host.alive()
