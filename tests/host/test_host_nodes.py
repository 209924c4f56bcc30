"""The nodes in a real ComfyUI (started headless by the tests), on every host found.

Every API-format example workflow runs through /prompt to a saved image on tiny generated assets;
the graph's final latent equals a plain Euler loop over krea2_model; bad inputs fail with clear
node errors; LoRAs through a real graph equal merging their deltas by hand.
"""

import copy
import glob
import json
import os
import subprocess

import numpy as np
import pytest
import torch
from safetensors.torch import load_file, save_file

from comfy_host import PACK_DIRNAME
from host_api import ExecutionError, PromptError
from krea2_model.tiny.lora import STYLES as PATCH_STYLES  # every LoRA style the generator writes
from tests.host import assets as A
from tests.ui_to_api import WIDGETS

pytestmark = pytest.mark.host
ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
API_DIR = os.path.join(ROOT, "example_workflows", "api")
OUR_NODES = {
    "Krea2ModelLoader": ["model_name", "weight_dtype"],
    "Krea2TextEncoderLoader": ["text_encoder_name"],
    "Krea2TextEncode": ["clip", "text"],
    "Krea2ModelSampling": ["model", "variant", "width", "height"],
    "Krea2LoraLoader": ["model", "lora_name", "strength"],
    "Krea2ReferenceEncode": ["clip", "text", "vae", "image", "method"],  # then the optional image2, image3
    "Krea2RegionalPrompt": ["conditioning", "region_1", "mask_1", "region_2", "mask_2", "region_3", "mask_3", "region_4", "mask_4"],
}
SIZE = 128  # pixels: 16x16 latent, 64 image tokens on the tiny model


@pytest.fixture
def h(any_host):
    """Each available host, with the tiny assets written into its models folder."""
    host = any_host
    if not getattr(host, "_krea2_assets", None):
        host._krea2_assets = A.make_assets(str(host.models_dir), host.python, str(host.comfy_dir))
        host.root = str(host.comfy_dir)
        host.pack_dir = str(host.custom_nodes_dir / PACK_DIRNAME)
    return host


def load_api(name):
    return json.load(open(os.path.join(API_DIR, name)))


def nodes_of(wf, cls):
    return [(k, n) for k, n in wf.items() if n["class_type"] == cls]


def small(wf, size=SIZE, seed=None, prefix=None, steps=None):
    """The example pointed at a small image (tiny assets keep the example's file names)."""
    wf = copy.deepcopy(wf)
    for _, n in nodes_of(wf, "EmptySD3LatentImage") + nodes_of(wf, "Krea2ModelSampling"):
        n["inputs"]["width"] = n["inputs"]["height"] = size
    for _, n in nodes_of(wf, "KSampler"):
        if seed is not None:
            n["inputs"]["seed"] = seed
        if steps is not None:
            n["inputs"]["steps"] = steps
    if prefix is not None:
        for _, n in nodes_of(wf, "SaveImage"):
            n["inputs"]["filename_prefix"] = prefix
    return wf


def latent_variant(wf, prefix):
    """Replace decode + save by SaveLatent of the KSampler output."""
    wf = copy.deepcopy(wf)
    ks = nodes_of(wf, "KSampler")[0][0]
    for k in [k for k, n in wf.items() if n["class_type"] in ("VAEDecode", "SaveImage", "VAELoader")]:
        del wf[k]
    wf["900"] = {"class_type": "SaveLatent", "inputs": {"samples": [ks, 0], "filename_prefix": prefix}}
    return wf


def run(host, wf, timeout=600):
    pid = host.post_prompt(wf)
    return host.wait(pid, timeout)


def saved(host, prefix, ext):
    files = sorted(glob.glob(os.path.join(host.output_dir, "**", prefix + "*" + ext), recursive=True))
    assert files, f"no {ext} output with prefix {prefix} in {host.output_dir}"
    return files[-1]


def image_array(path):
    from PIL import Image
    return np.asarray(Image.open(path).convert("RGB"))


def read_latent(path):
    t = load_file(path)
    return t.get("latent_tensor", next(iter(t.values()))).float()


def reference(host, tmp_path, **spec):
    spec = {"transformer": os.path.join(host.models_dir, "diffusion_models", A.TURBO),
            "text_encoder": os.path.join(host.models_dir, "text_encoders", A.TEXT),
            "tokenizer": os.path.join(host.root, "comfy", "text_encoders", "qwen25_tokenizer"),
            "comfy_root": host.root, **spec}
    sp, out = tmp_path / "spec.json", tmp_path / "ref.safetensors"
    sp.write_text(json.dumps(spec))
    r = subprocess.run([host.python, os.path.join(ROOT, "tests", "host", "reference_loop.py"), str(sp), str(out)],
                       capture_output=True, text=True, timeout=600, cwd=host.root)
    assert r.returncode == 0, r.stderr[-4000:]
    return load_file(str(out))["latent"].float()


def rel(a, b):
    return ((a - b).norm() / b.norm()).item()


# -- the nodes as the server lists them -------------------------------------------------------------------


def test_nodes_listed_with_agreed_inputs(h):
    info = h.object_info()
    for node, inputs in OUR_NODES.items():
        assert node in info, f"{node} missing from /object_info"
        assert info[node]["category"] == "Krea 2"
        declared = list(info[node]["input"].get("required", {})) + list(info[node]["input"].get("optional", {}))
        assert declared[:len(inputs)] == inputs, (node, declared)


def test_widget_order_used_by_the_ui_converter_matches_the_server(h):
    info = h.object_info()
    widget_types = ("INT", "FLOAT", "STRING", "BOOLEAN", "COMBO")
    for node, widgets in WIDGETS.items():
        spec = info[node]["input"]
        order = list(spec.get("required", {})) + list(spec.get("optional", {}))
        names = [n for n in order if isinstance((spec.get("required", {}) | spec.get("optional", {}))[n][0], list)
                 or (spec.get("required", {}) | spec.get("optional", {}))[n][0] in widget_types]
        assert names == [w for w, _ in widgets], (node, names)


# -- example workflows -------------------------------------------------------------------------------------


def _combo_options(spec):
    """A combo input's choices in either /object_info form (``[[...], {...}]`` or ``["COMBO", {"options"}]``)."""
    if isinstance(spec, list) and spec and isinstance(spec[0], list):
        return spec[0]
    if isinstance(spec, list) and spec and spec[0] == "COMBO" and len(spec) > 1:
        return spec[1].get("options")
    return None


def host_lacks(host, wf) -> list:
    """What an API workflow uses that this host does not have: node types, or choices of a combo (0.3.64 has
    no ``index_timestep_zero`` reference method, for example)."""
    info, missing = host.object_info(), []
    for n in wf.values():
        cls = n["class_type"]
        if cls not in info:
            missing.append(f"node {cls}")
            continue
        inputs = {**info[cls]["input"].get("required", {}), **info[cls]["input"].get("optional", {})}
        for k, v in n["inputs"].items():
            opts = _combo_options(inputs.get(k))
            if isinstance(v, str) and opts is not None and v not in opts:
                missing.append(f"{cls}.{k} = {v!r}")
    return missing


@pytest.mark.parametrize("name", sorted(os.listdir(API_DIR)))
def test_example_workflow_runs_to_an_image_deterministically(h, name):
    wf = load_api(name)
    lacks = host_lacks(h, wf)
    if lacks:
        assert not h.native_krea2, f"the main host lacks {lacks}"  # only the old host may lack a core feature
        pytest.skip(f"ComfyUI {h.version} has no {', '.join(lacks)} (the example needs a newer host)")
    stem = name[:-5]
    run(h, small(wf, seed=1, prefix=f"{stem}_a"))
    run(h, small(wf, seed=2, prefix=f"{stem}_b"))
    run(h, small(wf, seed=1, prefix=f"{stem}_c"))  # KSampler re-runs: its last inputs had seed 2
    a, b, c = (image_array(saved(h, f"{stem}_{x}", ".png")) for x in "abc")
    assert a.shape == (SIZE, SIZE, 3)
    assert np.array_equal(a, c), "same seed gave a different image"
    assert not np.array_equal(a, b), "another seed gave the same image"


def test_graph_latent_equals_plain_euler_loop_raw_cfg(h, tmp_path):
    wf = small(load_api("krea2_raw_text_to_image.json"), seed=5, steps=6)
    wf = latent_variant(wf, "euler_raw")
    run(h, wf)
    got = read_latent(saved(h, "euler_raw", ".latent"))
    pos = [n for _, n in nodes_of(wf, "Krea2TextEncode") if n["_meta"]["title"] == "Prompt"][0]["inputs"]["text"]
    neg = [n for _, n in nodes_of(wf, "Krea2TextEncode") if n["_meta"]["title"] != "Prompt"][0]["inputs"]["text"]
    want = reference(h, tmp_path, transformer=os.path.join(h.models_dir, "diffusion_models", A.RAW), prompt=pos,
                     negative=neg, seed=5, steps=6, cfg=4.5, variant="raw", width=SIZE, height=SIZE)
    assert got.shape == want.shape
    assert rel(got, want) <= 1e-5


def test_graph_latent_equals_plain_euler_loop_turbo(h, tmp_path):
    wf = latent_variant(small(load_api("krea2_turbo_text_to_image.json"), seed=9), "euler_turbo")
    run(h, wf)
    got = read_latent(saved(h, "euler_turbo", ".latent"))
    prompt = nodes_of(wf, "Krea2TextEncode")[0][1]["inputs"]["text"]
    want = reference(h, tmp_path, prompt=prompt, negative=None, seed=9, steps=8, cfg=1.0, variant="turbo",
                     width=SIZE, height=SIZE)
    assert rel(got, want) <= 1e-5


# -- LoRA through a real graph -------------------------------------------------------------------------------


def lora_graph(prefix, loras, seed=3):
    wf = latent_variant(small(load_api("krea2_turbo_lora.json"), seed=seed), prefix)
    lk, ln = nodes_of(wf, "Krea2LoraLoader")[0]
    upstream = ln["inputs"]["model"]
    del wf[lk]
    for i, (name, strength) in enumerate(loras):
        key = str(800 + i)
        wf[key] = {"class_type": "Krea2LoraLoader", "inputs": {"model": upstream, "lora_name": name,
                                                              "strength": strength}}
        upstream = [key, 0]
    nodes_of(wf, "Krea2ModelSampling")[0][1]["inputs"]["model"] = upstream
    return wf


def test_lora_graph_equals_hand_merged_weights(h, tmp_path):
    run(h, lora_graph("lora_one", [(A.LORA, 0.8)]))
    got = read_latent(saved(h, "lora_one", ".latent"))
    prompt = nodes_of(lora_graph("x", []), "Krea2TextEncode")[0][1]["inputs"]["text"]
    want = reference(h, tmp_path, prompt=prompt, negative=None, seed=3, steps=8, cfg=1.0, variant="turbo",
                     width=SIZE, height=SIZE, loras=[[os.path.join(h.models_dir, "loras", A.LORA), 0.8]])
    assert rel(got, want) <= 1e-5
    plain = reference(h, tmp_path, prompt=prompt, negative=None, seed=3, steps=8, cfg=1.0, variant="turbo",
                      width=SIZE, height=SIZE)
    assert rel(got, plain) > 1e-3, "the LoRA changed nothing"


def test_lora_styles_stack_and_agree_through_the_graph(h, tmp_path):
    run(h, lora_graph("lora_native", [(A.LORA, 1.0)]))
    run(h, lora_graph("lora_diffusers", [(A.LORA_DIFFUSERS, 1.0)]))
    run(h, lora_graph("lora_stack", [(A.LORA, 1.0), (A.LORA_FUSED, 0.5)]))
    run(h, lora_graph("lora_zero", [(A.LORA, 0.0)]))
    native = read_latent(saved(h, "lora_native", ".latent"))
    assert torch.equal(native, read_latent(saved(h, "lora_diffusers", ".latent")))
    prompt = nodes_of(lora_graph("x", []), "Krea2TextEncode")[0][1]["inputs"]["text"]
    lp = lambda n: os.path.join(h.models_dir, "loras", n)  # noqa: E731
    common = dict(prompt=prompt, negative=None, seed=3, steps=8, cfg=1.0, variant="turbo", width=SIZE, height=SIZE)
    stacked = reference(h, tmp_path, loras=[[lp(A.LORA), 1.0], [lp(A.LORA_FUSED), 0.5]], **common)
    assert rel(read_latent(saved(h, "lora_stack", ".latent")), stacked) <= 1e-5
    assert rel(read_latent(saved(h, "lora_zero", ".latent")), reference(h, tmp_path, **common)) <= 1e-5


# -- bad inputs get clear node errors ------------------------------------------------------------------------


def expect_error(host, wf, *needles):
    """The host refuses ``wf`` (validation: PromptError; at run time: ExecutionError) with every needle in its
    message; any other exception (a crash of the test machinery, a timeout) is not what is being tested."""
    with pytest.raises((PromptError, ExecutionError)) as e:
        run(host, wf)
    msg = str(e.value)
    for n in needles:
        assert n in msg, msg[-2000:]
    assert "Traceback" not in msg.split("\n")[0]
    return msg


def test_missing_model_file_is_a_validation_error(h):
    wf = small(load_api("krea2_turbo_text_to_image.json"))
    nodes_of(wf, "Krea2ModelLoader")[0][1]["inputs"]["model_name"] = "does_not_exist.safetensors"
    expect_error(h, wf, "does_not_exist.safetensors")


def test_non_krea_checkpoint_names_what_it_is(h):
    p = os.path.join(h.models_dir, "diffusion_models", "some_flux_model.safetensors")
    save_file({"double_blocks.0.img_attn.qkv.weight": torch.zeros(4, 4),
               "single_blocks.0.linear1.weight": torch.zeros(4, 4)}, p)
    wf = small(load_api("krea2_turbo_text_to_image.json"))
    nodes_of(wf, "Krea2ModelLoader")[0][1]["inputs"]["model_name"] = "some_flux_model.safetensors"
    expect_error(h, wf, "not a Krea 2 transformer", "Flux")


def test_lora_at_strength_zero_is_still_read_and_checked(h):
    """Strength 0 used to return before reading the file, so a foreign or corrupt LoRA passed unseen."""
    p = os.path.join(h.models_dir, "loras", "flux_style_lora.safetensors")
    save_file({"lora_unet_double_blocks_0_img_attn_qkv.lora_down.weight": torch.zeros(4, 8),
               "lora_unet_double_blocks_0_img_attn_qkv.lora_up.weight": torch.zeros(8, 4)}, p)
    wf = lora_graph("lora_zero_foreign", [("flux_style_lora.safetensors", 0.0)])
    expect_error(h, wf, "flux_style_lora.safetensors", "not for Krea 2")


def test_lora_block_filter_past_the_last_block_is_refused(h):
    wf = lora_graph("lora_blocks_oob", [(A.LORA, 1.0)])
    lnode = nodes_of(wf, "Krea2LoraLoader")[0][1]
    lnode["inputs"]["blocks"] = "0,40-41"
    msg = expect_error(h, wf, "40, 41", f"0-{A.HOST_CFG.layers - 1}")
    assert "Krea2LoraLoader" in msg


def host_script(h, tmp_path, script, with_run=False, **spec):
    """Run ``tests/host/<script>`` with the host's python (cwd: the host) on a spec of the pack's location plus
    ``spec``; returns the JSON line it prints last (with ``with_run``: and the finished process, for its stderr)."""
    path = tmp_path / f"{script}.spec.json"
    path.write_text(json.dumps({"pack_parent": os.path.dirname(h.pack_dir), "pack_name": os.path.basename(h.pack_dir),
                                **spec}))
    r = subprocess.run([h.python, os.path.join(ROOT, "tests", "host", script), str(path)],
                       capture_output=True, text=True, timeout=900, cwd=h.root)
    assert r.returncode == 0, r.stderr[-4000:]
    res = json.loads(r.stdout.strip().splitlines()[-1])
    return (res, r) if with_run else res


def test_clip_load_sd_refuses_partial_or_foreign_dicts_and_weight_syntax_is_named(h, tmp_path):
    """``load_sd`` on our CLIP ignored what ``load_state_dict(strict=False)`` reported; prompt-weight syntax was
    encoded literally without a word. Now: errors naming the keys, and one warning per CLIP."""
    res = host_script(h, tmp_path, "clip_check.py", text_encoder=os.path.join(h.models_dir, "text_encoders", A.TEXT))
    assert res["full"] == {"ok": True}
    assert not res["partial"]["ok"] and "3 missing" in res["partial"]["error"]
    assert all(k in res["partial"]["error"] for k in res["partial"]["dropped"])
    assert not res["foreign"]["ok"] and "text_model.encoder.layers.0.mlp.fc1.weight" in res["foreign"]["error"]
    assert len(res["weight_syntax_warnings"]) == 1, res  # said once, not per prompt
    assert res["plain_warnings"] == []


def test_type_error_inside_a_host_call_is_not_taken_for_an_old_signature(h, tmp_path):
    """The loader asked host functions with try/except TypeError whether they take a newer argument, so a
    TypeError raised inside the call was swallowed and the call repeated without it. Now it reads the
    signature once and a TypeError from inside reaches the caller."""
    res = host_script(h, tmp_path, "loader_check.py", model=os.path.join(h.models_dir, "diffusion_models", A.TURBO))
    assert res["plain"] in ("HostKrea2Transformer", "Krea2Transformer")
    assert res["inner_type_error"] == "raised inside set_inference_dtype", res
    assert len(res["calls"]) == 1  # called once, not retried


def test_conditioning_of_the_wrong_width_is_explained(h):
    wf = small(load_api("krea2_turbo_text_to_image.json"))
    nodes_of(wf, "Krea2TextEncode")[0][1]["inputs"]["taps"] = "2,5"  # 2 taps instead of 12
    expect_error(h, wf, "Krea 2 conditioning must be", "Krea2TextEncode")


def test_empty_prompt_and_odd_sizes_equal_the_reference_loop(h, tmp_path):
    wf = small(load_api("krea2_turbo_text_to_image.json"), prefix="odd_size", seed=6)
    nodes_of(wf, "Krea2TextEncode")[0][1]["inputs"]["text"] = ""
    for _, n in nodes_of(wf, "EmptySD3LatentImage") + nodes_of(wf, "Krea2ModelSampling"):
        n["inputs"]["width"], n["inputs"]["height"] = 136, 120  # latents 17 x 15: padded like the reference
    run(h, wf)
    img = image_array(saved(h, "odd_size", ".png"))
    assert img.shape == (120, 136, 3)
    lat = latent_variant(wf, "odd_size_latent")
    run(h, lat)
    got = read_latent(saved(h, "odd_size_latent", ".latent"))
    want = reference(h, tmp_path, prompt="", negative=None, seed=6, steps=8, cfg=1.0, variant="turbo",
                     width=136, height=120)
    assert got.shape == want.shape == (1, 16, 1, 15, 17)
    assert rel(got, want) <= 1e-5


def test_schedule_size_that_differs_from_the_latent_is_warned_once(h):
    """Raw's mu depends on the image size: a Krea2ModelSampling set for 1024x1024 sampling a 128x128 latent
    gets one warning naming both sizes (main said nothing); a matching size gets none."""
    wf = latent_variant(small(load_api("krea2_raw_text_to_image.json"), seed=2, steps=3), "size_mismatch")
    ms = nodes_of(wf, "Krea2ModelSampling")[0][1]["inputs"]
    before = h.log_text().count("Krea2ModelSampling is set for")
    run(h, wf)  # matching sizes
    assert h.log_text().count("Krea2ModelSampling is set for") == before
    ms["width"] = ms["height"] = 1024
    nodes_of(wf, "SaveLatent")[0][1]["inputs"]["filename_prefix"] = "size_mismatch_1024"
    run(h, wf)
    log = h.log_text()
    assert log.count("Krea2ModelSampling is set for") == before + 1, h.log_tail(30)
    line = [ln for ln in log.splitlines() if "Krea2ModelSampling is set for" in ln][-1]
    assert "1024x1024" in line and "128x128" in line


# -- fp8 weights -----------------------------------------------------------------------------------------------


FP8_CHECK = r"""
import json, sys, os
sys.argv = ["main.py", "--cpu"]
sys.path.insert(0, os.getcwd())
sys.path.insert(0, os.environ["KREA2_PACK_PARENT"])
import comfy.options; comfy.options.enable_args_parsing()
import importlib, torch
pack = importlib.import_module(os.environ["KREA2_PACK_NAME"])
cm = importlib.import_module(os.environ["KREA2_PACK_NAME"] + ".nodes.host.model")
out = {}
for wd in ("default", "fp8_e4m3fn", "fp8_e5m2"):
    m = cm.load_model(os.environ["KREA2_MODEL"], wd)
    dm = m.model.diffusion_model
    lin = {str(p.dtype) for n, p in dm.named_parameters() if n.endswith(".weight") and p.ndim == 2}
    out[wd] = {"linear_dtypes": sorted(lin), "bytes": sum(p.numel() * p.element_size() for p in dm.parameters())}
print(json.dumps(out))
"""


#: fp8 graph vs the fp8-rounded reference loop: about twice the error measured (1.38e-6 on 0.33 and on 0.3.64;
#: float32 sums in another order), where the old bound against the full-precision run was 0.1.
FP8_TOL = 3e-6


def test_fp8_weights_stay_fp8_and_equal_the_fp8_rounded_reference(h, tmp_path):
    env = dict(os.environ, KREA2_PACK_PARENT=os.path.dirname(h.pack_dir), KREA2_PACK_NAME=os.path.basename(h.pack_dir),
               KREA2_MODEL=os.path.join(h.models_dir, "diffusion_models", A.TURBO))
    r = subprocess.run([h.python, "-c", FP8_CHECK], capture_output=True, text=True, timeout=600, cwd=h.root, env=env)
    assert r.returncode == 0, r.stderr[-3000:]
    info = json.loads(r.stdout.strip().splitlines()[-1])
    assert info["fp8_e4m3fn"]["linear_dtypes"] == ["torch.float8_e4m3fn"]
    assert info["fp8_e5m2"]["linear_dtypes"] == ["torch.float8_e5m2"]
    assert info["fp8_e4m3fn"]["bytes"] < 0.4 * info["default"]["bytes"]  # fp32 file: fp8 Linears are 1/4
    wf = latent_variant(small(load_api("krea2_turbo_text_to_image.json"), seed=4), "fp8_run")
    run(h, wf)
    full = read_latent(saved(h, "fp8_run", ".latent"))
    nodes_of(wf, "Krea2ModelLoader")[0][1]["inputs"]["weight_dtype"] = "fp8_e4m3fn"
    nodes_of(wf, "SaveLatent")[0][1]["inputs"]["filename_prefix"] = "fp8_run_e4m3"
    run(h, wf)
    low = read_latent(saved(h, "fp8_run_e4m3", ".latent"))
    # the reference loop with the same Linear weights rounded to fp8 (stored fp8, cast per call, fp32 maths)
    prompt = nodes_of(wf, "Krea2TextEncode")[0][1]["inputs"]["text"]
    want = reference(h, tmp_path, prompt=prompt, negative=None, seed=4, steps=8, cfg=1.0, variant="turbo",
                     width=SIZE, height=SIZE, weight_dtype="float8_e4m3fn")
    assert rel(low, want) <= FP8_TOL, rel(low, want)
    assert rel(low, full) > 20 * FP8_TOL  # the fp8 run really differs from the full-precision one


def test_lora_on_fp8_weights_is_within_fp8_error_of_the_full_precision_lora(h):
    wf = lora_graph("lora_fp32", [(A.LORA, 1.0)])
    run(h, wf)
    nodes_of(wf, "Krea2ModelLoader")[0][1]["inputs"]["weight_dtype"] = "fp8_e4m3fn"
    nodes_of(wf, "SaveLatent")[0][1]["inputs"]["filename_prefix"] = "lora_fp8"
    run(h, wf)
    full = read_latent(saved(h, "lora_fp32", ".latent"))
    low = read_latent(saved(h, "lora_fp8", ".latent"))
    run(h, lora_graph("nolora_fp32", []))
    without = read_latent(saved(h, "nolora_fp32", ".latent"))
    err = rel(low, full)
    assert err <= 0.1, err  # fp8-class error
    assert err < 0.5 * rel(without, full), "on fp8 weights the LoRA did (almost) nothing"




def test_comfy_patches_equal_the_merge_through_the_hosts_own_weight_adapters(h):
    """``scripts/check_lora_comfy_adapters.py`` with the host's python: every LoRA style's patches, handed to the
    host's real LoRAAdapter / LoKrAdapter / LoHaAdapter, give the hand merge (the tuple order, alpha and DoRA
    conventions as the host reads them)."""
    r = subprocess.run([h.python, os.path.join(ROOT, "scripts", "check_lora_comfy_adapters.py")],
                       capture_output=True, text=True, timeout=600, cwd=h.root,
                       env=dict(os.environ, COMFYUI_PATH=h.root))
    assert r.returncode == 0, (r.stdout + r.stderr)[-4000:]
    rows = [ln for ln in r.stdout.splitlines() if "patches" in ln]
    assert len(rows) == len(PATCH_STYLES) and all(ln.endswith(" ok") for ln in rows), r.stdout


@pytest.fixture
def patch_check(h, tmp_path_factory):
    """``tests/host/lora_patch_check.py`` run in-process by the host's python (the ``--cpu`` device, where
    the load device is the offload device) on the Turbo asset and a LoRA of each style; once per host."""
    if getattr(h, "_krea2_patch_check", None) is None:
        h._krea2_patch_check = _run_patch_check(h, tmp_path_factory.mktemp("patch_check"))
    return h._krea2_patch_check


def _run_patch_check(h, tmp_path):
    from krea2_model.tiny import lora as tiny_lora
    loras = {}
    for style in PATCH_STYLES:
        lo = tiny_lora.make_lora(A.HOST_CFG, style, seed=7, rank=4)
        loras[style] = str(tmp_path / f"{style}.safetensors")
        save_file({k: v.clone().contiguous() for k, v in lo.state_dict.items()}, loras[style],
                  metadata=lo.metadata or None)
    spec = {"pack_parent": os.path.dirname(h.pack_dir), "pack_name": os.path.basename(h.pack_dir),
            "model": os.path.join(h.models_dir, "diffusion_models", A.TURBO), "loras": loras,
            "stack": [loras["comfy"], loras["lycoris-fused"]],
            "scaled_model": A.scaled_fp8_copy(os.path.join(h.models_dir, "diffusion_models", A.TURBO),
                                             str(tmp_path / "turbo_scaled_fp8.safetensors"))}
    if h.native_krea2:  # core's own Krea 2 MODEL through our loader
        from krea2_model.tiny import transformer as tiny
        spec["core_model"] = tiny.write(tiny.random_state_dict(A.INTEROP_CFG, 11), str(tmp_path / "core.safetensors"),
                                        "comfy")
        lo = tiny_lora.make_lora(A.INTEROP_CFG, "lycoris-fused", seed=7, rank=4)
        spec["core_lora"] = str(tmp_path / "core_lora.safetensors")
        save_file({k: v.clone().contiguous() for k, v in lo.state_dict.items()}, spec["core_lora"],
                  metadata=lo.metadata or None)
        spec["core_ctx_width"] = A.INTEROP_CFG.text_taps * A.INTEROP_CFG.text_dim
    sp = tmp_path / "spec.json"
    sp.write_text(json.dumps(spec))
    r = subprocess.run([h.python, os.path.join(ROOT, "tests", "host", "lora_patch_check.py"), str(sp)],
                       capture_output=True, text=True, timeout=600, cwd=h.root)
    assert r.returncode == 0, r.stderr[-4000:]
    return json.loads(r.stdout.strip().splitlines()[-1])


@pytest.mark.parametrize("wd", ["default", "fp8_e4m3fn", "scaled_fp8_file"])
def test_lora_patching_keeps_no_second_copy_and_unpatches_exactly(patch_check, wd):
    """Load device == offload device: patched Linear weights are applied at cast time (no backup copy,
    weights untouched; scaled-fp8 files included), equal ComfyUI's patch-and-backup result in fp32 and the
    hand merge, and unload leaves every byte and no hook behind."""
    r = patch_check[wd]
    assert r["class"] == "Krea2ModelPatcher" and r["same_device"]
    for style, s in r["styles"].items():
        ctx = f"{wd} {style}: {json.dumps({k: v for k, v in s.items() if k != 'y_standard'})[:1500]}"
        assert s["patched_linear"] > 0 and s["effect"] > 1e-3, ctx
        assert s["backup_linear"] == 0 and s["std_backup_linear"] == s["patched_linear"], ctx
        assert s["cast_time"] == s["patched_linear_keys"], ctx  # every patched Linear key, once
        assert s["backup_other"] == s["patched_other"], ctx  # norms / mod tables: ordinary patching
        assert s["linear_untouched_while_loaded"], ctx
        assert s["restored_bitexact"] and s["restored_after_standard"] and s["stale_after_unload"] == 0, ctx
        assert s["output_restored_rel"] <= 1e-6, ctx
        if wd == "default":
            assert s["vs_standard"] <= 1e-6 and s["vs_hand_merge"] <= 1e-6, ctx
        if style in ("comfy", "kohya", "diffusers", "lycoris-fused") and wd != "scaled_fp8_file":
            # plain low-rank on plain weights: the fused path (scaled weights keep ComfyUI's maths)
            assert s["fused_low_rank_calls"] >= s["patched_linear"], ctx
    assert r["half_twice_vs_once"] <= 1e-6
    assert r["partial_unload_vs_loaded"] <= 1e-6 and r["partial_unload_restored"]
    assert r["forced_baked"] > 0 and r["forced_cast_time"] == 0 and r["forced_restored"]
    assert r["core_loader_cast_time"] > 0 and r["core_loader_vs_ours"] <= 1e-6 and r["core_loader_restored"]
    if wd == "default":
        assert r["stack_vs_standard"] <= 1e-6 and r["forced_vs_cast_time"] <= 1e-6


def test_our_lora_loader_on_cores_native_model_keeps_no_second_copy(h, patch_check):
    if not h.native_krea2:
        pytest.skip(f"ComfyUI {h.version} has no native Krea 2")
    c = patch_check["core_model"]
    assert c["base_class"] == "ModelPatcher" and c["base_class_after"] == "ModelPatcher"  # core's MODEL untouched
    assert c["class"] == "Krea2ModelPatcher", c
    assert c["patched_linear"] > 0 and c["cast_time"] == c["patched_linear"] and c["backup_linear"] == 0, c
    assert c["std_backup_linear"] == c["patched_linear"] and c["vs_standard"] <= 1e-6 and c["effect"] > 1e-3, c
    assert c["restored_bitexact"], c


@pytest.mark.parametrize("wd", ["fp8_e4m3fn", "scaled_fp8_file"])
def test_lora_on_fp8_applied_at_cast_time_is_closer_to_full_precision(patch_check, wd):
    """fp8 storage or a scaled-fp8 file + LoRA: the LoRA acts (the output moves most of the way to the fp32
    LoRA's), within fp8-class error of it, and no worse than ComfyUI's patch-and-backup path (which rounds
    every patched weight to fp8 again)."""
    full, low = patch_check["default"], patch_check[wd]
    t = lambda v: torch.tensor(v)  # noqa: E731
    for style in PATCH_STYLES:
        want = t(full["y"][style])
        cast = rel(t(low["y"][style]), want)
        std = rel(t(low["styles"][style]["y_standard"]), want)
        assert cast <= std + 1e-3, (style, cast, std)
        if wd == "fp8_e4m3fn" or any(w.startswith("QuantizedTensor") for w in low["weight_types"]):
            assert cast <= 0.1, (style, cast)  # fp8-class
        # (hosts before quantized tensors (0.3.64) keep scaled-fp8 files in scaled_fp8 ops, whose own low-VRAM
        # path re-rounds each patched weight to fp8 at the file's scale, clipping what a large update pushes
        # past it; ours is that path there, and the check above keeps it no worse than core's)
        assert cast < 0.5 * rel(t(low["y0"]), want), (style, "the LoRA did (almost) nothing on these weights")


def test_core_lora_loader_works_on_our_model_for_native_keys(h):
    """Attribute names equal the checkpoint keys, so core's LoraLoaderModelOnly finds the weights too."""
    ours = lora_graph("lora_ours_native", [(A.LORA, 0.7)])
    run(h, ours)
    core = copy.deepcopy(ours)
    lk = next(k for k, n in core.items() if n["class_type"] == "Krea2LoraLoader")
    core[lk] = {"class_type": "LoraLoaderModelOnly", "inputs": {"model": core[lk]["inputs"]["model"],
                                                               "lora_name": A.LORA, "strength_model": 0.7}}
    nodes_of(core, "SaveLatent")[0][1]["inputs"]["filename_prefix"] = "lora_core_native"
    run(h, core)
    a = read_latent(saved(h, "lora_ours_native", ".latent"))
    b = read_latent(saved(h, "lora_core_native", ".latent"))
    assert rel(b, a) <= 1e-5


def test_model_listing_uses_the_hosts_cached_lists_and_survives_a_symlink_cycle(h, tmp_path):
    """The loaders' file lists walked every model folder again on every listing, following symlinks (a cycle
    listed the tree over and over). Now: the host's cached file lists (nothing walked while no folder changed, a
    new file seen), one entry per real file, diffusers folders one level deep."""
    root = tmp_path / "models"
    root.mkdir()
    res = host_script(h, tmp_path, "listing_check.py", root=str(root))
    inner = "krea2_diffusers/transformer/diffusion_pytorch_model.safetensors"  # a file the host lists itself
    want = ["a.safetensors", "c.gguf", inner, "sub/b.gguf", "krea2_diffusers/"]
    assert res["first"] == want, res["first"]
    assert res["second"] == want and res["walks_second"] == [], res
    assert res["third"] == ["a.safetensors", "c.gguf", "d.gguf", inner, "sub/b.gguf", "krea2_diffusers/"], res["third"]
    assert res["resolved"] == str(root / "diffusion_models" / "sub" / "b.gguf")


def test_each_host_internal_we_rely_on_works_as_the_adapter_says(h, tmp_path):
    """``nodes/host/internals.py`` is the one place the pack touches ComfyUI internals; each use runs here on each
    host: the host's key lookup, its patch_weight_to_device signature (bound by its own names), its LowVramPatch
    (our cast-time patch computes what it computes), the patcher class switch on a plain clone only, and native
    Krea 2 found by its own classes (0.33) or absent (0.3.64), never by module-name substrings."""
    native = None
    if h.native_krea2:
        if not getattr(h, "_krea2_interop", None):
            h._krea2_interop = A.make_interop_assets(str(h.models_dir))
        native = os.path.join(h.models_dir, "diffusion_models", A.INTEROP)
    res = host_script(h, tmp_path, "internals_check.py", model=os.path.join(h.models_dir, "diffusion_models", A.TURBO),
                      native_model=native, text_encoder=os.path.join(h.models_dir, "text_encoders", A.TEXT))
    assert h.version in res["checked_on"], (h.version, res["checked_on"])
    assert res["key_weight"] == {"is_param": True, "set": True, "convert": True}, res
    p = res["patch_args"]
    assert p["key"] and p["device_to"] and p["inplace_update"], p
    assert {"key", "device_to", "inplace_update"} <= set(p["names"]), p
    lv = res["low_vram_patch"]
    assert lv["is_host_class"] and lv["ours_vs_host"] <= 1e-6 and lv["moved"] > 1e-4, lv
    assert res["adopt"] == {"clone": "Krea2ModelPatcher", "original": "ModelPatcher", "same": True,
                            "subclass_untouched": "Krea2ModelPatcher"}, res["adopt"]
    assert res["native"]["ours"] and res["text"]["ours"] and not res["text"]["ours_is_core"], res
    assert res["unload_patcher"] == {"was_loaded": True, "unloaded": True, "still_listed": False, "again": False}, res
    if h.native_krea2:
        assert res["native"]["class"] == "Krea2" and res["native"]["native"] and res["native"]["native_is_class"], res
        assert res["text"]["class"] == "Krea2TEModel", res
    else:
        assert res["native"]["class"] is None and res["text"]["class"] is None, res


def test_a_damaged_model_file_gets_one_message_naming_it_and_the_step(h):
    """A weights file with a few non-finite values in its data loads; the graph's first NaN velocity gets one
    warning naming the file, the step of the host's schedule and the likely causes; the next sample gets its own."""
    from krea2_model.tiny import transformer as tiny
    name = "krea2_damaged_data.safetensors"
    path = os.path.join(h.models_dir, "diffusion_models", name)
    if not os.path.exists(path):
        sd = A.transformer_state(1)
        sd["blocks.0.mlp.down.weight"].view(-1)[:2] = torch.tensor([float("nan"), float("inf")])
        tiny.write(sd, path, "comfy")
    count = lambda: h.log_text().count(f"{name} returned NaN or infinite values")  # noqa: E731
    before = count()
    for seed in (1, 2):
        wf = latent_variant(small(load_api("krea2_turbo_text_to_image.json"), seed=seed, steps=3), f"damaged_{seed}")
        nodes_of(wf, "Krea2ModelLoader")[0][1]["inputs"]["model_name"] = name
        run(h, wf)
    said = [line for line in h.log_text().splitlines() if f"{name} returned NaN" in line]
    assert count() - before == 2, said[-4:]  # one per sample, not one per step
    assert "at step 1 of 3" in said[-1] and "damaged" in said[-1] and "fp16" in said[-1], said[-1]
