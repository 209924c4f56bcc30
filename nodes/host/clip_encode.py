"""Host adapter: CONDITIONING from a CLIP for the pack's encode nodes: Krea2TextEncode (our CLIP with any taps, or
core's Krea 2 CLIP with the default ones) and Krea2ReferenceEncode (text grounded on reference images, their
latents and the reference method, in one conditioning)."""

from __future__ import annotations

from ...krea2_model.errors import Krea2Error
from ...krea2_model.text.images import reference_pixels
from ...krea2_model.text.prompt import MAX_TOKENS
from ...krea2_model.text.qwen3 import DEFAULT_TAPS
from .clip_model import Krea2ClipModel
from .core_tokens import is_core_krea2, limit_core_tokens


def is_ours(clip) -> bool:
    return isinstance(getattr(clip, "cond_stage_model", None), Krea2ClipModel)


def encode(clip, text: str, taps=DEFAULT_TAPS, max_tokens: int = MAX_TOKENS):
    """CONDITIONING for ``text`` from our CLIP (any taps) or core's Krea 2 CLIP (default taps only)."""
    taps = tuple(int(t) for t in taps)
    if is_ours(clip):
        tokens = clip.tokenizer.tokenize_with_weights(text, max_tokens=max_tokens, taps=taps)
        return clip.encode_from_tokens_scheduled(tokens)
    if is_core_krea2(clip):
        if taps != tuple(DEFAULT_TAPS):
            raise Krea2Error("Krea2TextEncode: core's Krea 2 CLIP (CLIPLoader type krea2) only encodes the default "
                             f"taps {','.join(map(str, DEFAULT_TAPS))}. Load the text encoder with "
                             "Krea2TextEncoderLoader to choose other taps.")
        return clip.encode_from_tokens_scheduled(limit_core_tokens(clip.tokenize(text), max_tokens))
    name = type(getattr(clip, "cond_stage_model", clip)).__name__
    raise Krea2Error(f"Krea2TextEncode: the clip input is a {name} text encoder, not Krea 2's Qwen3-VL-4B. Load "
                     "qwen3vl_4b with Krea2TextEncoderLoader (or CLIPLoader type krea2).")


#: Krea2ReferenceEncode's methods: the reference-latent method each kind of Krea 2 LoRA was trained with.
REFERENCE_METHODS = {"style / edit (timestep zero)": "index_timestep_zero", "identity edit": "index"}


def encode_reference(clip, vae, text: str, images: list, method: str, taps=DEFAULT_TAPS,
                     max_tokens: int = MAX_TOKENS):
    """CONDITIONING for Krea2ReferenceEncode: the image-grounded text conditioning (``text`` after
    ``Picture 1..N``, Krea's template), each image's reference latent (1 MP on the 16 px grid, VAE encoded) and
    the reference method, in one conditioning."""
    import node_helpers

    if not is_ours(clip):
        raise Krea2Error("Krea2ReferenceEncode: the clip input must come from Krea2TextEncoderLoader (the "
                         "training-matched image layout is ours; core's CLIP uses Qwen-Image-Edit's).")
    if method not in REFERENCE_METHODS:
        raise Krea2Error(f"Krea2ReferenceEncode: method must be one of {list(REFERENCE_METHODS)}, got {method!r}.")
    if not images:
        raise Krea2Error("Krea2ReferenceEncode: connect at least one image.")
    tokens = clip.tokenizer.tokenize_with_weights(text, max_tokens=max_tokens, taps=tuple(taps), images=images)
    cond = clip.encode_from_tokens_scheduled(tokens)
    latents = [vae.encode(reference_pixels(im, f"image {i + 1}")) for i, im in enumerate(images)]
    return node_helpers.conditioning_set_values(cond, {"reference_latents": latents,
                                                       "reference_latents_method": REFERENCE_METHODS[method]},
                                                append=False)
