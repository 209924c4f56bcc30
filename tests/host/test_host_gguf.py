"""GGUF in a real ComfyUI (issue 15): a Turbo graph from a GGUF transformer and a GGUF text encoder reaches an
image; a LoRA on the GGUF model equals the same LoRA on the same weights dequantized (by the gguf package)
and saved as safetensors, on a second image after an unload too; without the LoRA the output is again the
plain GGUF output, bit for bit.

Skips with one reason when the host's Python has no ``gguf`` package (``.ci/run`` installs it there)."""

import copy
import glob
import json
import os
import subprocess

import numpy as np
import pytest
import torch
from safetensors.torch import load_file, save_file

from krea2_model import Krea2Config
from krea2_model.formats.gguf import llama_cpp_to_canonical
from krea2_model.tiny import gguf as tiny_gguf
from krea2_model.tiny import lora as tiny_lora
from tests.host import assets as A

pytestmark = pytest.mark.host
ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
API_DIR = os.path.join(ROOT, "example_workflows", "api")
SIZE = 128

# Rows of 256 for the K / IQ4_XS types; text side fits the host asset text encoder (12 taps of width 32)
GGUF_CFG = Krea2Config(hidden=256, heads=8, kv_heads=2, head_dim=32, mlp_hidden=512, layers=2, time_dim=256,
                       text_dim=A.HOST_TEXT_CFG.hidden, text_taps=12, text_heads=2, text_kv_heads=2, text_head_dim=16,
                       text_mlp_hidden=64)
MODEL = "krea2_gguf_test.gguf"
MODEL_REF = "krea2_gguf_test_dequantized.safetensors"
TEXT = "qwen3vl_gguf_test_Q8_0.gguf"
TEXT_REF = "qwen3vl_gguf_test_dequantized.safetensors"
LORA = "krea2_gguf_test_lora.safetensors"
DORA = "krea2_gguf_test_dora.safetensors"  # DoRA: its exact form reads the real (dequantized) base weights
K_TYPES = ("Q4_K", "Q5_K", "Q6_K", "Q3_K", "Q2_K", "IQ4_XS")
SMALL_TYPES = ("Q8_0", "Q5_1", "Q4_0", "IQ4_NL", "Q5_0", "Q4_1")


def _model_types():
    """Every Linear in a block type: the 256-element types where rows allow, else 32-element ones."""
    count = {256: 0, 32: 0}

    def pick(name, shape):
        for block, types in ((256, K_TYPES), (32, SMALL_TYPES)):
            if len(shape) == 2 and shape[1] % block == 0:
                count[block] += 1
                return types[count[block] % len(types)]
        return "F32"
    return pick


def _reference(path, rename=lambda n: n):
    import gguf
    r = gguf.GGUFReader(path)
    return {rename(t.name): torch.from_numpy(np.array(gguf.quants.dequantize(t.data, t.tensor_type),
                                                      dtype=np.float32)).reshape(
        tuple(int(x) for x in reversed(list(t.shape)))) for t in r.tensors}


@pytest.fixture
def gh(any_host):
    """Each host, with the GGUF assets (and the host tier's tiny assets) in its models folder."""
    host = any_host
    if getattr(host, "gguf_types", None) is None:
        _write_assets(host)
    return host


def _write_assets(host):
    r = subprocess.run([host.python, "-c", "import gguf"], capture_output=True, text=True, timeout=120)
    if r.returncode != 0:
        pytest.skip(f"GGUF host tests skipped: the host's Python ({host.python}) has no 'gguf' package; install it "
                    f"with: {host.python} -m pip install gguf  (.ci/run does this where a host is found)")
    md = str(host.models_dir)
    for sub in ("diffusion_models", "text_encoders", "loras"):
        os.makedirs(os.path.join(md, sub), exist_ok=True)
    model = os.path.join(md, "diffusion_models", MODEL)
    sd = tiny_gguf.tiny_transformer.random_state_dict(GGUF_CFG, 21)
    pick = _model_types()
    used = tiny_gguf.write_gguf(sd, model, "krea2", lambda n: pick(n, tuple(sd[n].shape)), seed=21)
    save_file(_reference(model), os.path.join(md, "diffusion_models", MODEL_REF))
    text = os.path.join(md, "text_encoders", TEXT)
    tensors = {tiny_gguf.canonical_to_llama_cpp(k): v for k, v in A.text_state(0).items()}
    meta = {"qwen3vl.attention.layer_norm_rms_epsilon": float(A.HOST_TEXT_CFG.eps),
            "qwen3vl.rope.freq_base": float(A.HOST_TEXT_CFG.rope_theta)}
    tiny_gguf.write_gguf(tensors, text, "qwen3vl", "Q8_0", seed=22, metadata=meta)
    save_file(_reference(text, llama_cpp_to_canonical), os.path.join(md, "text_encoders", TEXT_REF))
    for name, style in ((LORA, "comfy"), (DORA, "dora")):
        lo = tiny_lora.make_lora(GGUF_CFG, style, seed=23, rank=4)
        save_file({k: v.clone().contiguous() for k, v in lo.state_dict.items()}, os.path.join(md, "loras", name),
                  metadata=lo.metadata or None)
    if not getattr(host, "_krea2_assets", None):  # the VAE (and the other tiny assets) of the host tier
        host._krea2_assets = A.make_assets(md, host.python, str(host.comfy_dir))
    host.gguf_types = used


def load_api(name):
    return json.load(open(os.path.join(API_DIR, name)))


def nodes_of(wf, cls):
    return [(k, n) for k, n in wf.items() if n["class_type"] == cls]


def run(host, wf, timeout=600):
    return host.wait(host.post_prompt(wf), timeout)


def saved(host, prefix, ext):
    files = sorted(glob.glob(os.path.join(host.output_dir, "**", prefix + "*" + ext), recursive=True))
    assert files, f"no {ext} output with prefix {prefix} in {host.output_dir}"
    return files[-1]


def read_latent(path):
    t = load_file(path)
    return t.get("latent_tensor", next(iter(t.values()))).float()


def graph(prefix, model=MODEL, text=TEXT, loras=(), seed=3, latent=True):
    """The Turbo LoRA example on ``model`` / ``text`` with ``loras`` chained (none: no LoRA node), small."""
    wf = copy.deepcopy(load_api("krea2_turbo_lora.json"))
    for _, n in nodes_of(wf, "EmptySD3LatentImage") + nodes_of(wf, "Krea2ModelSampling"):
        n["inputs"]["width"] = n["inputs"]["height"] = SIZE
    nodes_of(wf, "KSampler")[0][1]["inputs"]["seed"] = seed
    nodes_of(wf, "Krea2ModelLoader")[0][1]["inputs"]["model_name"] = model
    nodes_of(wf, "Krea2TextEncoderLoader")[0][1]["inputs"]["text_encoder_name"] = text
    lk, ln = nodes_of(wf, "Krea2LoraLoader")[0]
    upstream = ln["inputs"]["model"]
    del wf[lk]
    for i, (name, strength) in enumerate(loras):
        wf[str(800 + i)] = {"class_type": "Krea2LoraLoader", "inputs": {"model": upstream, "lora_name": name,
                                                                       "strength": strength}}
        upstream = [str(800 + i), 0]
    nodes_of(wf, "Krea2ModelSampling")[0][1]["inputs"]["model"] = upstream
    if latent:
        ks = nodes_of(wf, "KSampler")[0][0]
        for k in [k for k, n in wf.items() if n["class_type"] in ("VAEDecode", "SaveImage", "VAELoader")]:
            del wf[k]
        wf["900"] = {"class_type": "SaveLatent", "inputs": {"samples": [ks, 0], "filename_prefix": prefix}}
    else:
        nodes_of(wf, "SaveImage")[0][1]["inputs"]["filename_prefix"] = prefix
    return wf


def rel(a, b):
    return ((a - b).norm() / b.norm()).item()


def _options(spec):
    """A combo's choices in either /object_info form: ``[[...], {...}]`` or ``["COMBO", {"options": [...]}]``."""
    return spec[1]["options"] if spec[0] == "COMBO" else spec[0]


def test_gguf_files_are_listed_by_our_loaders(gh):
    info = gh.object_info()
    assert MODEL in _options(info["Krea2ModelLoader"]["input"]["required"]["model_name"])
    assert TEXT in _options(info["Krea2TextEncoderLoader"]["input"]["required"]["text_encoder_name"])
    # the file really holds every block type (the 256-element ones where rows allow)
    assert set(K_TYPES + SMALL_TYPES) <= set(gh.gguf_types.values())


def test_turbo_graph_from_gguf_files_reaches_an_image(gh):
    run(gh, graph("gguf_image", latent=False))
    from PIL import Image
    img = np.asarray(Image.open(saved(gh, "gguf_image", ".png")).convert("RGB"))
    assert img.shape == (SIZE, SIZE, 3) and img.std() > 0


def test_lora_on_gguf_equals_lora_on_the_dequantized_model_and_unpatches_exactly(gh):
    loads = lambda: gh.log_text().count(f"loaded {MODEL} (GGUF")  # noqa: E731
    before = loads()
    # GGUF graphs first, back to back, so the loader's MODEL stays cached (one load) throughout
    run(gh, graph("gguf_plain_a"))
    run(gh, graph("gguf_lora_1", loras=[(LORA, 0.8)]))
    gh.post("/free", {"unload_models": True})  # unload (unpatch) but keep the loaders' cached MODELs
    run(gh, graph("gguf_lora_2", loras=[(LORA, 0.8)], seed=4))
    # the LoRA removed: the same GGUF MODEL samples again, and gives the plain output bit for bit
    run(gh, graph("gguf_plain_b"))
    assert loads() - before <= 1, "the GGUF model was loaded again: the unpatch check would prove nothing"
    plain, got, got2, plain_b = (read_latent(saved(gh, p, ".latent"))
                                 for p in ("gguf_plain_a", "gguf_lora_1", "gguf_lora_2", "gguf_plain_b"))
    assert torch.equal(plain_b, plain)
    assert rel(got, plain) > 1e-3, "the LoRA changed nothing"

    # the same graphs on the weights dequantized by the gguf package, saved as safetensors
    run(gh, graph("gguf_ref_plain", MODEL_REF, TEXT_REF))
    run(gh, graph("gguf_ref_lora_1", MODEL_REF, TEXT_REF, loras=[(LORA, 0.8)]))
    run(gh, graph("gguf_ref_lora_2", MODEL_REF, TEXT_REF, loras=[(LORA, 0.8)], seed=4))
    want_plain, want, want2 = (read_latent(saved(gh, p, ".latent"))
                               for p in ("gguf_ref_plain", "gguf_ref_lora_1", "gguf_ref_lora_2"))
    print(f"GGUF host check: rel plain {rel(plain, want_plain):.2e}, LoRA {rel(got, want):.2e}, "
          f"LoRA after an unload {rel(got2, want2):.2e}, LoRA effect {rel(got, plain):.2e}")
    assert rel(plain, want_plain) <= 1e-5, rel(plain, want_plain)
    assert rel(got, want) <= 1e-5, rel(got, want)
    assert rel(got2, want2) <= 1e-5, rel(got2, want2)  # the second image, after an unload: no lost patch


def test_core_lora_loader_on_the_gguf_model_equals_ours(gh):
    """Core's LoraLoaderModelOnly on our GGUF MODEL patches at cast time too (the stored blocks cannot take a
    patch), and gives what Krea2LoraLoader gives."""
    ours = graph("gguf_lora_ours", loras=[(LORA, 0.7)], seed=5)
    run(gh, ours)
    core = copy.deepcopy(ours)
    lk = next(k for k, n in core.items() if n["class_type"] == "Krea2LoraLoader")
    core[lk] = {"class_type": "LoraLoaderModelOnly", "inputs": {"model": core[lk]["inputs"]["model"],
                                                               "lora_name": LORA, "strength_model": 0.7}}
    nodes_of(core, "SaveLatent")[0][1]["inputs"]["filename_prefix"] = "gguf_lora_core"
    run(gh, core)
    a, b = (read_latent(saved(gh, p, ".latent")) for p in ("gguf_lora_ours", "gguf_lora_core"))
    plain = graph("gguf_lora_none", seed=5)
    run(gh, plain)
    assert rel(b, a) <= 1e-5, rel(b, a)
    assert rel(a, read_latent(saved(gh, "gguf_lora_none", ".latent"))) > 1e-3, "the LoRA changed nothing"


def test_dora_on_gguf_reads_the_dequantized_weights(gh):
    """DoRA normalises by the base weight: on GGUF it must be the dequantized weight (the raw block bytes read
    as numbers gave silently wrong weights), so it equals DoRA on the gguf-dequantized model."""
    run(gh, graph("gguf_with_dora", loras=[(DORA, 0.9)], seed=6))
    run(gh, graph("gguf_ref_dora", MODEL_REF, TEXT_REF, loras=[(DORA, 0.9)], seed=6))
    run(gh, graph("gguf_without_dora", seed=6))
    got, want, plain = (read_latent(saved(gh, p, ".latent")) for p in ("gguf_with_dora", "gguf_ref_dora", "gguf_without_dora"))
    print(f"GGUF DoRA: rel vs dequantized model {rel(got, want):.2e}, DoRA effect {rel(got, plain):.2e}")
    assert rel(got, plain) > 1e-3, "the DoRA changed nothing"
    assert rel(got, want) <= 1e-5, rel(got, want)


def test_core_save_nodes_refuse_a_gguf_model_clearly_and_sampling_goes_on(gh):
    """Core's ModelSave, CLIPSave and CheckpointSave on our GGUF MODEL (with a LoRA) and GGUF CLIP: a clear refusal
    naming the file, never a file of packed blocks written as weights without the LoRA; the same MODEL samples
    afterwards. (CheckpointSave meets the GGUF text encoder or the GGUF MODEL first, depending on the host: either
    refusal names its file.)"""
    from host_api import ExecutionError

    wf = graph("gguf_before_save", loras=[(LORA, 0.8)], seed=7)
    run(gh, wf)  # the MODEL loaded (and cached), so the save meets an already loaded model too
    lora = [next(k for k, n in wf.items() if n["class_type"] == "Krea2LoraLoader"), 0]
    clip = [nodes_of(wf, "Krea2TextEncoderLoader")[0][0], 0]
    save_dir = os.path.join(gh.output_dir, "checkpoints")
    before = set(glob.glob(os.path.join(gh.output_dir, "**", "*.safetensors"), recursive=True))
    saves = {
        "ModelSave": {"model": lora, "filename_prefix": "checkpoints/krea2_gguf_saved"},
        "CheckpointSave": {"model": lora, "clip": clip, "vae": ["901", 0],
                           "filename_prefix": "checkpoints/krea2_gguf_ckpt"},
        "CLIPSave": {"clip": clip, "filename_prefix": "text_encoders/krea2_gguf_clip"},
    }
    names = {"ModelSave": (MODEL,), "CheckpointSave": (MODEL, TEXT), "CLIPSave": (TEXT,)}
    for cls, inputs in saves.items():
        save = copy.deepcopy(wf)
        save["901"] = {"class_type": "VAELoader", "inputs": {"vae_name": A.VAE}}
        save["902"] = {"class_type": cls, "inputs": inputs}
        with pytest.raises(ExecutionError) as e:
            run(gh, save)
        text = str(e.value)
        assert any(n in text for n in names[cls]) and "cannot be saved" in text and "LoRA" in text, (cls, text)
    after = set(glob.glob(os.path.join(gh.output_dir, "**", "*.safetensors"), recursive=True))
    assert after == before, f"a save wrote {sorted(after - before)} in {save_dir}"
    run(gh, graph("gguf_after_save", loras=[(LORA, 0.8)], seed=7))
    assert torch.equal(read_latent(saved(gh, "gguf_after_save", ".latent")),
                       read_latent(saved(gh, "gguf_before_save", ".latent")))
