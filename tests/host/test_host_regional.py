"""Krea2RegionalPrompt in a real ComfyUI (issue 23), on both hosts: the two-region example runs (see
test_host_nodes' example test), the regions act, cfg with an unconditioned negative works, a LoRA on top works,
and one region covering the whole image with the base prompt itself stays close to the plain prompt."""

import copy

import pytest

from tests.host.test_host_nodes import (h, expect_error, latent_variant, load_api, nodes_of, read_latent, rel,  # noqa: F401
                                        run, saved, small)

pytestmark = pytest.mark.host
EXAMPLE = "krea2_turbo_regional_prompt.json"


def _latent(h, wf, prefix):
    run(h, latent_variant(wf, prefix))
    return read_latent(saved(h, prefix, ".latent"))


def _plain(wf):
    """The example without the regional node: the base prompt straight into the sampler."""
    wf = copy.deepcopy(wf)
    rk, rn = nodes_of(wf, "Krea2RegionalPrompt")[0]
    nodes_of(wf, "KSampler")[0][1]["inputs"]["positive"] = rn["inputs"]["conditioning"]
    del wf[rk]
    return wf


def test_regions_act_and_stay_deterministic(h):
    wf = small(load_api(EXAMPLE), seed=3)
    a = _latent(h, wf, "regional_a")
    b = _latent(h, wf, "regional_b")
    plain = _latent(h, _plain(wf), "regional_plain")
    assert (a - b).abs().max().item() == 0
    assert rel(a, plain) > 1e-3  # the region prompts change the result


def test_whole_image_region_with_the_base_prompt_is_close_to_the_plain_prompt(h):
    """Every image token then sees the base prompt twice (a second copy of its keys and values in the
    softmax), and the base text tokens never see the copy: close to the plain prompt, not equal. Measured on
    the tiny assets, 128 px, 8 steps: rel. 0.013 on both hosts; asserted < 0.3 and > 0."""
    wf = small(load_api(EXAMPLE), seed=4)
    base = nodes_of(wf, "Krea2RegionalPrompt")[0][1]["inputs"]
    r1 = nodes_of(wf, "Krea2TextEncode")
    text_of = {k: n["inputs"]["text"] for k, n in r1}
    region_key = base["region_1"][0]
    wf[region_key]["inputs"]["text"] = text_of[base["conditioning"][0]]
    wf["950"] = {"class_type": "SolidMask", "inputs": {"value": 1.0, "width": 1024, "height": 1024}}
    base["mask_1"] = ["950", 0]
    del base["region_2"], base["mask_2"]
    got = _latent(h, wf, "regional_whole")
    plain = _latent(h, _plain(wf), "regional_whole_plain")
    r = rel(got, plain)
    print(f"whole-image region with the base prompt vs plain prompt: rel {r:.4f}")
    assert 0 < r < 0.3, r


def test_regions_with_cfg_negative_and_a_lora(h):
    from tests.host import assets as A
    wf = small(load_api(EXAMPLE), seed=5)
    ks = nodes_of(wf, "KSampler")[0][1]["inputs"]
    ks["cfg"] = 3.0
    clip = nodes_of(wf, "Krea2TextEncoderLoader")[0][0]
    wf["960"] = {"class_type": "Krea2TextEncode", "inputs": {"clip": [clip, 0], "text": "blurry",
                                                             "taps": "2,5,8,11,14,17,20,23,26,29,32,35",
                                                             "max_tokens": 512}}
    ks["negative"] = ["960", 0]
    sampling = nodes_of(wf, "Krea2ModelSampling")[0][1]["inputs"]
    wf["961"] = {"class_type": "Krea2LoraLoader", "inputs": {"model": sampling["model"], "lora_name": A.LORA,
                                                             "strength": 1.0}}
    sampling["model"] = ["961", 0]
    got = _latent(h, wf, "regional_cfg_lora")
    assert got.isfinite().all()


def test_a_mask_that_covers_nothing_is_named(h):
    wf = small(load_api(EXAMPLE), seed=6)
    wf["970"] = {"class_type": "SolidMask", "inputs": {"value": 0.0, "width": 64, "height": 64}}
    nodes_of(wf, "Krea2RegionalPrompt")[0][1]["inputs"]["mask_2"] = ["970", 0]
    msg = expect_error(h, wf, "mask of region_2 covers nothing")
    assert "Krea2RegionalPrompt" in msg or "region_2" in msg
