"""Krea 2 for ComfyUI. ComfyUI imports this package; all work happens in ``comfy_entrypoint``."""


async def comfy_entrypoint():
    from .nodes import Krea2Extension
    return Krea2Extension()
