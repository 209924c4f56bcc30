"""UI-format example workflows and their API-format twins stay in step."""

import glob
import json
import os

import pytest

from tests.ui_to_api import ui_to_api

ROOT = os.path.join(os.path.dirname(__file__), "..", "..")
UI_FILES = sorted(glob.glob(os.path.join(ROOT, "example_workflows", "*.json")))
NODE_IDS = {"Krea2ModelLoader", "Krea2TextEncoderLoader", "Krea2TextEncode", "Krea2ModelSampling", "Krea2LoraLoader",
            "Krea2ReferenceEncode", "Krea2RegionalPrompt"}


def test_examples_exist():
    names = {os.path.basename(p) for p in UI_FILES}
    assert {"krea2_turbo_text_to_image.json", "krea2_raw_text_to_image.json", "krea2_turbo_lora.json",
            "krea2_turbo_style_reference.json", "krea2_turbo_reference_core_nodes.json"} <= names


@pytest.mark.parametrize("path", UI_FILES, ids=os.path.basename)
def test_ui_converts_to_its_api_twin(path):
    ui = json.load(open(path))
    twin = json.load(open(os.path.join(os.path.dirname(path), "api", os.path.basename(path))))
    assert ui_to_api(ui) == twin


@pytest.mark.parametrize("path", UI_FILES, ids=os.path.basename)
def test_links_are_consistent(path):
    ui = json.load(open(path))
    nodes = {n["id"]: n for n in ui["nodes"]}
    for lid, src, sslot, dst, dslot, typ in ui["links"]:
        assert lid in nodes[src]["outputs"][sslot]["links"]
        assert nodes[dst]["inputs"][dslot]["link"] == lid and nodes[dst]["inputs"][dslot]["type"] == typ
    assert {n["type"] for n in ui["nodes"]} & NODE_IDS


def test_converter_detects_a_drifted_twin():
    path = os.path.join(ROOT, "example_workflows", "krea2_turbo_text_to_image.json")
    ui = json.load(open(path))
    ks = next(n for n in ui["nodes"] if n["type"] == "KSampler")
    ks["widgets_values"][2] = 9  # steps: 8 -> 9 in the UI file only
    twin = json.load(open(os.path.join(ROOT, "example_workflows", "api", os.path.basename(path))))
    assert ui_to_api(ui) != twin
    ui["nodes"][0]["type"] = "Krea2ModelLoadr"
    with pytest.raises(KeyError, match="Krea2ModelLoadr"):
        ui_to_api(ui)


def test_turbo_and_raw_settings_follow_krea():
    turbo = json.load(open(os.path.join(ROOT, "example_workflows", "api", "krea2_turbo_text_to_image.json")))
    raw = json.load(open(os.path.join(ROOT, "example_workflows", "api", "krea2_raw_text_to_image.json")))
    pick = lambda wf, cls: next(n["inputs"] for n in wf.values() if n["class_type"] == cls)  # noqa: E731
    assert pick(turbo, "KSampler")["steps"] == 8 and pick(turbo, "KSampler")["cfg"] == 1.0
    assert pick(turbo, "KSampler")["sampler_name"] == "euler" and pick(turbo, "KSampler")["scheduler"] == "simple"
    assert pick(turbo, "Krea2ModelSampling")["variant"] == "turbo"
    assert any(n["class_type"] == "ConditioningZeroOut" for n in turbo.values())
    assert pick(raw, "KSampler")["cfg"] == 4.5 and pick(raw, "Krea2ModelSampling")["variant"] == "raw"
    negs = [n for n in raw.values() if n["class_type"] == "Krea2TextEncode"]
    assert len(negs) == 2 and all(n["inputs"]["text"].strip() for n in negs)
