"""Model nodes: Krea2ModelLoader and Krea2ModelSampling."""

from __future__ import annotations

import logging

from comfy_api.latest import io

from ..krea2_model import Krea2Error, sampling
from .files import list_files, resolve
from .host import model as host_model
from .host import sampling as host_sampling

log = logging.getLogger("krea2")
CATEGORY = "Krea 2"


class Krea2ModelLoader(io.ComfyNode):
    @classmethod
    def define_schema(cls):
        return io.Schema(
            node_id="Krea2ModelLoader", display_name="Load Krea 2 Model", category=CATEGORY,
            description="Loads a Krea 2 transformer (Raw or Turbo) in any layout: Krea's file, ComfyUI repacks "
                        "(bf16, fp8_scaled, quantized), diffusers files and folders, GGUF files (kept quantized in "
                        "memory, dequantized per layer; needs the gguf package).",
            inputs=[
                io.Combo.Input("model_name", options=list_files("diffusion_models"),
                               tooltip="A file (.safetensors or .gguf) or diffusers folder from models/diffusion_models "
                                       "(or models/unet)."),
                io.Combo.Input("weight_dtype", options=host_model.WEIGHT_DTYPES, default="default",
                               tooltip="Storage dtype of the weights, as core's Load Diffusion Model."),
            ],
            outputs=[io.Model.Output()],
        )

    @classmethod
    def execute(cls, model_name, weight_dtype="default") -> io.NodeOutput:
        path = resolve("diffusion_models", model_name)
        return io.NodeOutput(host_model.name_source(host_model.load_model(path, weight_dtype), path))


class Krea2ModelSampling(io.ComfyNode):
    @classmethod
    def define_schema(cls):
        return io.Schema(
            node_id="Krea2ModelSampling", display_name="Krea 2 Model Sampling", category=CATEGORY,
            description="Krea 2's reference sigma schedule. Raw: time shift mu from the image size (0.906 at "
                        "1024x1024); Turbo: mu = 1.15. Use with the 'simple' scheduler. KSampler cfg = Krea "
                        "guidance + 1 (Turbo: cfg 1; Raw: guidance 3.5 -> cfg 4.5).",
            inputs=[
                io.Model.Input("model"),
                io.Combo.Input("variant", options=["raw", "turbo"], default="raw",
                               tooltip="raw: resolution-aware shift; turbo: fixed mu 1.15 (8 steps, cfg 1)."),
                io.Int.Input("width", default=1024, min=16, max=16384, step=8,
                             tooltip="Image width in pixels (the same as the latent's)."),
                io.Int.Input("height", default=1024, min=16, max=16384, step=8,
                             tooltip="Image height in pixels."),
                io.Float.Input("base_shift", default=sampling.BASE_SHIFT, min=-10.0, max=10.0, step=0.01,
                               optional=True, tooltip="raw only: mu at 256 image tokens (256x256 px)."),
                io.Float.Input("max_shift", default=sampling.MAX_SHIFT, min=-10.0, max=10.0, step=0.01,
                               optional=True, tooltip="raw only: mu at 6400 image tokens (1280x1280 px)."),
            ],
            outputs=[io.Model.Output(tooltip="The model, cloned and patched. KSampler cfg = Krea guidance + 1.")],
        )

    @classmethod
    def execute(cls, model, variant, width, height, base_shift=sampling.BASE_SHIFT,
                max_shift=sampling.MAX_SHIFT) -> io.NodeOutput:
        if not host_model.is_krea2_model(model):
            raise Krea2Error(f"Krea2ModelSampling: the model input is a {type(model.model).__name__} model, not Krea 2. "
                             "Connect a Krea2ModelLoader (or core's Krea 2) MODEL.")
        m, mu = host_sampling.patch_model_sampling(model, variant, width, height, base_shift, max_shift)
        log.info("Krea 2 sampling: %s at %dx%d, mu = %.4f", variant, width, height, mu)
        return io.NodeOutput(m)
