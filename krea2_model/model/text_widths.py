"""Which text encoder a conditioning of a given width probably came from (named in Krea 2's shape errors)."""

from __future__ import annotations

_KNOWN_TEXT_WIDTHS = {
    768: "a CLIP-L encoder (SD1.x / Flux pooled)",
    1024: "an SD2 / OpenCLIP-H encoder",
    1280: "an OpenCLIP-G encoder (SDXL)",
    2048: "an SDXL dual CLIP encoder",
    2304: "a Gemma-2 2B encoder (Lumina 2)",
    2560: "a single Qwen3 4B layer (Z-Image, or a Qwen3-VL encoder without Krea's layer taps)",
    3584: "a Qwen2.5-VL 7B encoder (Qwen-Image)",
    4096: "a T5-XXL encoder (Flux, SD3) or an 8B LLM",
    4608: "the Hunyuan Video text encoder",
    12288: "a Flux.2 / Mistral encoder",
}


def guess_text_encoder(width: int) -> str:
    """One sentence on which text encoder a conditioning of this width probably came from."""
    name = _KNOWN_TEXT_WIDTHS.get(int(width))
    if name:
        return f"A width of {width} looks like {name}."
    if width and width % 2560 == 0:
        return f"A width of {width} is {width // 2560} Qwen3-VL-4B taps, not this model's tap count."
    return f"A width of {width} matches no text encoder Krea 2 knows."
