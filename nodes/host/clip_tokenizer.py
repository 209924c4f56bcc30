"""Host adapter: ``Krea2ClipTokenizer``, our CLIP's tokenizer: Krea 2's prompt template as ComfyUI token dicts
(``{KEY: {...}}``), image prompts laid out around their images, and what core's TextGenerate passes kept for
generation; ComfyUI's prompt-weight syntax is read literally, said once per CLIP."""

from __future__ import annotations

import logging
import re

from ...krea2_model.errors import Krea2Error
from ...krea2_model.text.encoder import image_token_counts
from ...krea2_model.text.images import MAX_IMAGES, prepare
from ...krea2_model.text.prompt import MAX_TOKENS, build_image_prompt_ids, build_prompt_ids
from ...krea2_model.text.qwen3 import DEFAULT_TAPS
from ...krea2_model.text.tokenizer import IMAGE_PAD, find_tokenizer
from .clip_model import KEY

log = logging.getLogger("krea2")


class Krea2ClipTokenizer:
    """Krea 2's template tokenizer as a ComfyUI tokenizer: ``tokenize_with_weights`` returns
    ``{KEY: {"ids", "prefix_len", "prompt_tokens", "prompt_tokens_total"}}``."""

    tokenizer_source = None  # set on the per-file subclass made by make_target

    def __init__(self, embedding_directory=None, tokenizer_data=None):
        self.tok = find_tokenizer(self.tokenizer_source)
        self.told_literal = False

    def tokenize_with_weights(self, text, return_word_ids=False, max_tokens=MAX_TOKENS, taps=DEFAULT_TAPS,
                              images=None, llama_template=None, **kwargs):
        """Our token dict. With ``images`` (core's image path: TextEncodeQwenImageEditPlus passes ``images`` and
        its own ``llama_template``, TextGenerate ``image``) the images are prepared here and the prompt laid out
        around them; the generation arguments core passes (``thinking``, ``skip_template``) are kept for
        :meth:`Krea2ClipModel.generate`."""
        image = kwargs.pop("image", None)
        if image is not None and not images:  # TextGenerate: one IMAGE batch, one picture per frame
            images = [image[i:i + 1] for i in range(image.shape[0])]
        images = list(images or [])
        out = self._generation_entry(text, images, llama_template, kwargs)
        if images:
            return {KEY: dict(out, **self._image_prompt(text, images, llama_template, max_tokens), taps=tuple(taps))}
        if not self.told_literal and uses_weight_syntax(text):
            self.told_literal = True
            log.warning("Krea 2: the prompt uses ComfyUI's weighting / embedding syntax ('(word:1.2)', 'embedding:'); "
                        "Krea 2's text encoder reads the prompt literally, as the reference does, so these are "
                        "encoded as plain text, not as weights or embeddings.")
        p = build_prompt_ids(self.tok, text, max_tokens)
        return {KEY: dict(out, ids=list(p.ids), prefix_len=p.prefix_len, prompt_tokens=p.prompt_tokens,
                          prompt_tokens_total=p.prompt_tokens_total, taps=tuple(taps))}

    def _generation_entry(self, text, images, llama_template, kwargs) -> dict:
        thinking = bool(kwargs.get("thinking", False))
        template = "{}" if kwargs.get("skip_template") or text.startswith("<|im_start|>") else llama_template
        # TextGenerate tokenizes with its generation options (thinking, skip_template): then the memory estimate
        # counts what generation needs on top of encoding
        requested = "thinking" in kwargs or "skip_template" in kwargs
        return {"generate": {"text": text, "images": images, "thinking": thinking, "template": template,
                             "tokenizer": self.tok, "requested": requested}}

    def _image_prompt(self, text, images, llama_template, max_tokens) -> dict:
        """The conditioning layout of a prompt with images: Krea 2's template with ``Picture N:`` labels, or the
        host's ``llama_template`` around a text that already holds the image blocks (core's edit node)."""
        if len(images) > MAX_IMAGES:
            raise Krea2Error(f"Krea 2 text encoder: {len(images)} images; the reference encoding takes at most "
                             f"{MAX_IMAGES}.")
        prepared = [prepare(im, f"image {i + 1}") for i, im in enumerate(images)]
        counts = image_token_counts(prepared)
        if llama_template and "{}" in llama_template:
            head, tail = llama_template.split("{}", 1)
            labelled = IMAGE_PAD in text
            p = build_image_prompt_ids(self.tok, text, counts, max_tokens, prefix=head, suffix_text=tail,
                                       labels=not labelled)
        else:
            p = build_image_prompt_ids(self.tok, text, counts, max_tokens)
        return {"ids": list(p.ids), "prefix_len": p.prefix_len, "prompt_tokens": p.prompt_tokens,
                "prompt_tokens_total": p.prompt_tokens_total, "prompt": p, "images": prepared}

    def decode(self, token_ids, skip_special_tokens=True):
        ids = token_ids.tolist() if hasattr(token_ids, "tolist") else list(token_ids)
        if ids and isinstance(ids[0], list):
            ids = ids[0]
        return self.tok.decode(ids, skip_special_tokens=skip_special_tokens)

    def untokenize(self, token_weight_pair):
        return token_weight_pair

    def state_dict(self):
        return {}


_WEIGHTED = re.compile(r"\([^()]*:\s*[-+]?(\d+\.?\d*|\.\d+)\s*\)")


def uses_weight_syntax(text: str) -> bool:
    """Whether ``text`` holds ComfyUI prompt-weight groups ``(words:1.2)`` or ``embedding:name``."""
    return bool(_WEIGHTED.search(text)) or "embedding:" in text
