"""Text nodes: Krea2TextEncoderLoader, Krea2TextEncode and Krea2ReferenceEncode."""

from __future__ import annotations

from comfy_api.latest import io

from ..krea2_model.errors import Krea2Error
from ..krea2_model.text.prompt import MAX_TOKENS
from ..krea2_model.text.qwen3 import DEFAULT_TAPS
from .files import list_files, resolve
from .host import clip as host_clip
from .host import clip_encode

CATEGORY = "Krea 2"
DEFAULT_TAPS_TEXT = ",".join(map(str, DEFAULT_TAPS))


def parse_taps(text: str) -> tuple[int, ...]:
    try:
        taps = tuple(int(t) for t in text.replace(" ", "").split(",") if t)
    except ValueError:
        raise Krea2Error(f"Krea2TextEncode: taps must be comma-separated integers like '{DEFAULT_TAPS_TEXT}', "
                         f"got {text!r}.") from None
    if not taps:
        raise Krea2Error(f"Krea2TextEncode: taps is empty; the Krea 2 default is '{DEFAULT_TAPS_TEXT}'.")
    return taps


class Krea2TextEncoderLoader(io.ComfyNode):
    @classmethod
    def define_schema(cls):
        return io.Schema(
            node_id="Krea2TextEncoderLoader", display_name="Load Krea 2 Text Encoder", category=CATEGORY,
            description="Loads Qwen3-VL-4B for Krea 2: ComfyUI's full VL files (with the vision tower, for image "
                        "prompts: Krea2ReferenceEncode, TextEncodeQwenImageEditPlus, TextGenerate), text-only "
                        "files, fp8_scaled files, Hugging Face folders and llama.cpp GGUF text-model files (kept "
                        "quantized in memory; needs the gguf package) from models/text_encoders.",
            inputs=[io.Combo.Input("text_encoder_name", options=list_files("text_encoders"),
                                   tooltip="qwen3vl_4b_bf16 / qwen3vl_4b_fp8_scaled, a Qwen3-VL-4B GGUF, or an HF "
                                           "folder.")],
            outputs=[io.Clip.Output()],
        )

    @classmethod
    def execute(cls, text_encoder_name) -> io.NodeOutput:
        return io.NodeOutput(host_clip.load_clip(resolve("text_encoders", text_encoder_name)))


class Krea2TextEncode(io.ComfyNode):
    @classmethod
    def define_schema(cls):
        return io.Schema(
            node_id="Krea2TextEncode", display_name="Krea 2 Text Encode", category=CATEGORY,
            description="Encodes a prompt exactly as Krea 2 was trained: Qwen-Image system template, Qwen3-VL "
                        "hidden states at 12 layer taps, at most 507 prompt tokens (longer prompts are truncated "
                        "with a warning). An empty prompt is Krea's negative.",
            inputs=[
                io.Clip.Input("clip"),
                io.String.Input("text", multiline=True, dynamic_prompts=True, default=""),
                io.String.Input("taps", default=DEFAULT_TAPS_TEXT, optional=True,
                                tooltip="Advanced: hidden-state indices to stack (0 = embeddings)."),
                io.Int.Input("max_tokens", default=MAX_TOKENS, min=6, max=8192, optional=True,
                             tooltip="Advanced: prompt + 5 suffix tokens kept (Krea 2 was trained with 512)."),
            ],
            outputs=[io.Conditioning.Output()],
        )

    @classmethod
    def execute(cls, clip, text, taps=DEFAULT_TAPS_TEXT, max_tokens=MAX_TOKENS) -> io.NodeOutput:
        if clip is None:
            raise Krea2Error("Krea2TextEncode: the clip input is empty (the loader failed or was bypassed).")
        return io.NodeOutput(clip_encode.encode(clip, text, parse_taps(taps), max_tokens))


class Krea2ReferenceEncode(io.ComfyNode):
    @classmethod
    def define_schema(cls):
        methods = list(clip_encode.REFERENCE_METHODS)
        return io.Schema(
            node_id="Krea2ReferenceEncode", display_name="Krea 2 Reference Encode", category=CATEGORY,
            description="Reference images for Krea 2, encoded the way its edit and style-reference LoRAs were trained "
                        "(ai-toolkit): the Qwen3-VL text encoder sees each image (downscaled to at most 384x384, "
                        "never upscaled) after 'Picture N:' under Krea's own system prompt, and each image's latent "
                        "(at most 1 MP on a 16 px grid) joins the conditioning as a reference latent with the "
                        "method the LoRA expects. One node instead of TextEncodeQwenImageEditPlus + "
                        "ReferenceLatent + FluxKontextMultiReferenceLatentMethod.",
            inputs=[
                io.Clip.Input("clip", tooltip="From Load Krea 2 Text Encoder, a full Qwen3-VL file (with its vision "
                                              "tower)."),
                io.String.Input("text", multiline=True, dynamic_prompts=True, default=""),
                io.Vae.Input("vae", tooltip="The Qwen-Image / Wan 2.1 VAE (encodes the reference latents)."),
                io.Image.Input("image", tooltip="Picture 1."),
                io.Image.Input("image2", optional=True, tooltip="Picture 2 (optional)."),
                io.Image.Input("image3", optional=True, tooltip="Picture 3 (optional)."),
                io.Combo.Input("method", options=methods, default=methods[0],
                               tooltip="style / edit (timestep zero): style-reference and edit LoRAs (ostris' "
                                       "Krea 2 edit / style LoRAs, Comfy-Org's krea2_style_reference): reference "
                                       "tokens at t = 0 (index_timestep_zero). identity edit: identity-edit "
                                       "LoRAs, reference tokens at the real t (index)."),
            ],
            outputs=[io.Conditioning.Output(tooltip="Image-grounded text conditioning with the reference latents "
                                                    "and their method.")],
        )

    @classmethod
    def execute(cls, clip, text, vae, image, method, image2=None, image3=None) -> io.NodeOutput:
        if clip is None or vae is None:
            raise Krea2Error("Krea2ReferenceEncode: the clip and vae inputs must be connected.")
        images = [im for im in (image, image2, image3) if im is not None]
        return io.NodeOutput(clip_encode.encode_reference(clip, vae, text, images, method))
