"""Krea2RegionalPrompt: a prompt per masked region, in one forward (see krea2_model/model/regions.py)."""

from __future__ import annotations

from comfy_api.latest import io

from .host.regions import add_regions

CATEGORY = "Krea 2"
SLOTS = 4


class Krea2RegionalPrompt(io.ComfyNode):
    @classmethod
    def define_schema(cls):
        inputs = [io.Conditioning.Input("conditioning", tooltip="The base prompt: the whole image sees it.")]
        for i in range(1, SLOTS + 1):
            inputs += [io.Conditioning.Input(f"region_{i}", optional=True,
                                             tooltip=f"Prompt of region {i} (Krea 2 Text Encode / CLIPTextEncode "
                                                     "with the same Krea 2 text encoder)."),
                       io.Mask.Input(f"mask_{i}", optional=True,
                                     tooltip=f"Where region {i} is (white = inside), any size: resized to the "
                                             "latent.")]
        return io.Schema(
            node_id="Krea2RegionalPrompt", display_name="Krea 2 Regional Prompt", category=CATEGORY,
            description="Gives each region's prompt to that region's image tokens inside one forward of Krea 2's "
                        "joint attention (base prompt for the whole image, region prompts only where their masks "
                        "are), instead of one forward per masked prompt. Works with our Krea 2 MODEL "
                        "(Load Krea 2 Model); chain nodes for more than four regions (eight at most).",
            inputs=inputs, outputs=[io.Conditioning.Output()],
        )

    @classmethod
    def execute(cls, conditioning, **kwargs) -> io.NodeOutput:
        pairs = [(f"region_{i}", kwargs.get(f"region_{i}"), f"mask_{i}", kwargs.get(f"mask_{i}"))
                 for i in range(1, SLOTS + 1)]
        return io.NodeOutput(add_regions(conditioning, pairs))
