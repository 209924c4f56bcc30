"""ComfyUI V3 nodes for Krea 2. Thin: parse inputs, call one adapter function, wrap the result.

Node classes live in ``*_nodes.py``; everything that adapts our model to ComfyUI's machinery (model config,
BaseModel, ModelPatcher, model sampling, CLIP, LoRA patches) lives in ``host/``.
"""

from __future__ import annotations

import logging

from comfy_api.latest import ComfyExtension, io

log = logging.getLogger("krea2")


def node_list():
    from .model_nodes import Krea2ModelLoader, Krea2ModelSampling
    nodes = [Krea2ModelLoader, Krea2ModelSampling]
    try:
        from .text_nodes import Krea2ReferenceEncode, Krea2TextEncode, Krea2TextEncoderLoader
        nodes += [Krea2TextEncoderLoader, Krea2TextEncode, Krea2ReferenceEncode]
    except ImportError as e:  # pragma: no cover - reported, never silent
        log.error("Krea 2: text nodes unavailable: %s", e)
    try:
        from .regional_nodes import Krea2RegionalPrompt
        nodes.append(Krea2RegionalPrompt)
    except ImportError as e:  # pragma: no cover
        log.error("Krea 2: regional prompt node unavailable: %s", e)
    try:
        from .lora_nodes import Krea2LoraLoader
        nodes.append(Krea2LoraLoader)
    except ImportError as e:  # pragma: no cover
        log.error("Krea 2: LoRA node unavailable: %s", e)
    return nodes


class Krea2Extension(ComfyExtension):
    async def get_node_list(self) -> list[type[io.ComfyNode]]:
        return node_list()
