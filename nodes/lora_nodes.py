"""Krea2LoraLoader: every Krea 2 LoRA style, patched through ComfyUI's ModelPatcher."""

from __future__ import annotations

import logging
import re

from comfy_api.latest import io

from ..krea2_model.errors import Krea2Error, LoraError, first_names
from .host import lora as host_lora

log = logging.getLogger("krea2")
CATEGORY = "Krea 2"


def parse_blocks(text: str) -> set | None:
    """``"0-3, 7"`` -> {0, 1, 2, 3, 7}; empty -> None (all blocks)."""
    text = (text or "").strip()
    if not text:
        return None
    out = set()
    for part in text.replace(" ", "").split(","):
        m = re.fullmatch(r"(\d+)(?:-(\d+))?", part)
        if not m:
            raise Krea2Error(f"Krea2LoraLoader: blocks must look like '0-13,20' (block indices and ranges), got "
                             f"{text!r}.")
        a, b = int(m.group(1)), int(m.group(2) or m.group(1))
        out.update(range(min(a, b), max(a, b) + 1))
    return out


class Krea2LoraLoader(io.ComfyNode):
    @classmethod
    def define_schema(cls):
        import folder_paths
        return io.Schema(
            node_id="Krea2LoraLoader", display_name="Load Krea 2 LoRA", category=CATEGORY,
            description="Applies a Krea 2 LoRA of any style (Krea, ai-toolkit/ComfyUI, diffusers/PEFT, kohya/musubi, "
                        "LyCORIS LoRA/LoKr/LoHa/DoRA, fused qkv, full diffs for norms and modulation tables) on "
                        "bf16, fp16 or fp8 weights. Keys it cannot map are listed in a warning, never dropped "
                        "silently.",
            inputs=[
                io.Model.Input("model"),
                io.Combo.Input("lora_name", options=folder_paths.get_filename_list("loras")),
                io.Float.Input("strength", default=1.0, min=-100.0, max=100.0, step=0.01),
                io.Float.Input("strength_text_fusion", default=1.0, min=-100.0, max=100.0, step=0.01, optional=True,
                               tooltip="Advanced: multiplies strength on the text fusion and text projection layers."),
                io.String.Input("blocks", default="", optional=True,
                                tooltip="Advanced: only patch these transformer blocks, e.g. '0-13,20'; empty = all."),
            ],
            outputs=[io.Model.Output()],
        )

    @classmethod
    def execute(cls, model, lora_name, strength, strength_text_fusion=1.0, blocks="") -> io.NodeOutput:
        import folder_paths
        path = folder_paths.get_full_path("loras", lora_name)
        if path is None:
            raise Krea2Error(f"Krea2LoraLoader: '{lora_name}' is not in models/loras.")
        try:
            m, report = host_lora.apply_lora(model, path, strength, strength_text_fusion, parse_blocks(blocks))
        except LoraError as e:
            raise Krea2Error(f"Krea2LoraLoader: {e}") from None
        if strength == 0:
            log.info("Krea 2 LoRA %s: strength 0, checked and not applied", lora_name)
        else:
            log.info("Krea 2 LoRA %s: %d weights patched%s", lora_name, report["applied"],
                     f", {report['filtered']} left out by the block filter" if report["filtered"] else "")
        if report["unmapped"]:
            log.warning("Krea 2 LoRA %s: %d keys could not be mapped to Krea 2 weights and were NOT applied: %s",
                        lora_name, len(report["unmapped"]), first_names(report["unmapped"], 8))
        return io.NodeOutput(m)
