"""Krea 2's text encoder: the Qwen3-VL tower plus its tokenizer, and prompt encoding.

Files are read by :mod:`krea2_model.formats.text_file`; this module turns a prompt into the
conditioning Krea 2's transformer takes (docs/architecture.md: ``(1, tokens, len(taps) * hidden)``).
"""

from __future__ import annotations

import os
from typing import Callable, NamedTuple, Sequence

import torch

from ..errors import ConditioningError, ShapeMismatchError
from ..formats.text_file import TextCheckpoint, load_text_model, load_vision_model
from . import images as I
from .generate import generate
from .prompt import MAX_TOKENS, PromptIds, build_image_prompt_ids, build_prompt_ids, expand_image_pads, mrope_positions
from .qwen3 import DEFAULT_TAPS, Qwen3TextConfig, Qwen3TextModel, VisionInputs
from .tokenizer import IM_END, IM_START, IMAGE_PAD, VISION_END, VISION_START, QwenTokenizer, find_tokenizer

__all__ = ["DEFAULT_TAPS", "Encoding", "Krea2TextEncoder", "load_text_encoder"]


class Encoding(NamedTuple):
    """``cond (1, tokens, len(taps) * hidden)``: layer-major per token, real tokens only (kept prompt tokens
    then the 5 suffix tokens); ``tokens``: that row count; ``prompt_tokens_total``: before truncation."""
    cond: torch.Tensor
    tokens: int
    prompt_tokens_total: int


class Krea2TextEncoder:
    """Qwen3-VL taps for Krea 2: ``model`` (:class:`Qwen3TextModel`) + ``tokenizer`` (:class:`QwenTokenizer`)."""

    def __init__(self, model: Qwen3TextModel, tokenizer: QwenTokenizer, where: str = "", vision=None,
                 vision_problem: str | None = None):
        #: reuse the 34-token system prefix's keys/values across prompts (exact: the tower is causal)
        self.reuse_prefix = True
        self.model = model
        self.tokenizer = tokenizer
        self.where = where
        #: the vision tower (:class:`~krea2_model.text.vision.Qwen3VisionModel`), a zero-argument function that
        #: loads it on first use, or None with ``vision_problem`` saying why images cannot be encoded
        self._vision = vision
        self.vision_problem = vision_problem

    @property
    def vision(self):
        if callable(self._vision) and not isinstance(self._vision, torch.nn.Module):
            self._vision = self._vision()
        return self._vision

    @property
    def config(self) -> Qwen3TextConfig:
        return self.model.config

    def prompt_ids(self, text: str, max_tokens: int = MAX_TOKENS) -> PromptIds:
        """The real-token ids of ``text`` in Krea 2's template (see :func:`~krea2_model.text.prompt.build_prompt_ids`)."""
        return build_prompt_ids(self.tokenizer, text, max_tokens)

    def encode(self, text: str, images=None, taps: Sequence[int] = DEFAULT_TAPS, max_tokens: int = MAX_TOKENS,
               device=None, dtype=None) -> torch.Tensor:
        """The contract of docs/architecture.md: the conditioning ``(1, n, len(taps) * hidden)`` of ``text``, real tokens
        only, so ``n`` (its second size) is the number of real tokens. :meth:`encode_prompt` also gives the
        prompt's length before truncation.

        ``images``: up to three ComfyUI IMAGE tensors ``(H, W, 3)`` / ``(1, H, W, 3)`` in [0, 1], seen by the
        Qwen3-VL vision tower and placed before the text as ``Picture 1: <image> Picture 2: ...`` (how Krea 2's
        edit / style LoRAs were trained); each is prepared by :func:`krea2_model.text.images.prepare`."""
        if isinstance(images, (tuple, list)) and images and all(isinstance(i, int) for i in images):
            raise TypeError("encode(text, images, taps=...): the second argument is now the images; pass taps by "
                            "keyword (taps=...)")
        if images is not None and not isinstance(images, (list, tuple)) and not isinstance(images, torch.Tensor):
            raise TypeError(f"images must be a list of image tensors, not {type(images).__name__}")
        if images is not None and not isinstance(images, (list, tuple)):
            images = [images]
        if images:
            return self.encode_with_images(text, list(images), taps, max_tokens, device, dtype).cond
        return self.encode_prompt(text, taps, max_tokens, device, dtype).cond

    @torch.no_grad()
    def encode_prompt(self, text: str, taps: Sequence[int] = DEFAULT_TAPS, max_tokens: int = MAX_TOKENS,
                      device=None, dtype=None) -> Encoding:
        """``text`` -> :class:`Encoding` ``(cond (1, n, len(taps) * hidden), n, prompt_tokens_total)``.

        ``n`` = kept prompt tokens (at most ``max_tokens - 5``; a warning gives the count when the prompt is
        cut) + 5 suffix tokens. Rows equal the reference's padded encoding at its real tokens.
        ``device``/``dtype``: where and in what to compute (default: the embedding weight's)."""
        if not isinstance(text, str):
            raise TypeError(f"text must be a string, not {type(text).__name__}")
        p = self.prompt_ids(text, max_tokens)
        w = self.model.embed_tokens.weight
        dev = device if device is not None else (w.device if w.device.type != "meta" else "cpu")
        if max(p.ids) >= self.config.vocab:
            raise ShapeMismatchError(f"{self.where}: the tokenizer gives token id {max(p.ids)} but the text encoder's "
                                     f"vocabulary has {self.config.vocab} entries: tokenizer and model do not belong "
                                     "together.")
        ids = torch.tensor([p.ids], dtype=torch.long, device=dev)
        if self.reuse_prefix:  # the template prefix's states are computed once and reused
            h = self.model.forward_after_prefix(ids, p.prefix_len, taps, dtype=dtype)
        else:
            h = self.model(ids, taps, dtype=dtype)[:, p.prefix_len:]
        return Encoding(h, p.real_tokens, p.prompt_tokens_total)


    @torch.no_grad()
    def encode_with_images(self, text: str, images: list, taps: Sequence[int] = DEFAULT_TAPS,
                           max_tokens: int = MAX_TOKENS, device=None, dtype=None) -> Encoding:
        """:meth:`encode_prompt` for a prompt with ``images`` (see :meth:`encode`). Rows: everything after the
        system prefix (the ``Picture N:`` labels, the image tokens, the text, the suffix)."""
        if not isinstance(text, str):
            raise TypeError(f"text must be a string, not {type(text).__name__}")
        prepared, merge = self._prepare_images(images)
        p = build_image_prompt_ids(self.tokenizer, text, image_token_counts(prepared, merge), max_tokens)
        return self.encode_image_ids(p, prepared, taps, device, dtype)

    @torch.no_grad()
    def encode_image_ids(self, p, prepared: list, taps: Sequence[int] = DEFAULT_TAPS, device=None,
                         dtype=None) -> Encoding:
        """The conditioning of prompt ids ``p`` (:class:`~krea2_model.text.prompt.ImagePromptIds`) whose image
        spans hold ``prepared`` images (:func:`krea2_model.text.images.prepare` results, in order)."""
        dev = self._device(device)
        vis = self._vision_inputs(p.ids, p.image_spans, prepared, self.vision.config.merge, dev, dtype)
        ids = torch.tensor([p.ids], dtype=torch.long, device=dev)
        h = self.model(ids, taps, dtype=dtype, vision=vis)[:, p.prefix_len:]
        return Encoding(h, p.real_tokens, p.prompt_tokens_total)

    def generate(self, text: str, images=None, *, thinking: bool = False, template: str | None = None,
                 max_new: int = 256, device=None, dtype=None, **sampling) -> str:
        """Text the model writes in reply to ``text`` (and ``images``): Qwen's chat turn
        ``<|im_start|>user\n[images]text<|im_end|>\n<|im_start|>assistant\n``, with the empty think block
        Qwen3 uses to switch reasoning off unless ``thinking``; ``template`` (a full prompt with ``{}`` for the
        text) replaces that turn. ``sampling``: see :func:`krea2_model.text.generate.generate`."""
        ids = self.generate_ids(text, images, thinking=thinking, template=template, max_new=max_new, device=device,
                                dtype=dtype, **sampling)
        return self.tokenizer.decode(ids, skip_special_tokens=True)

    @torch.no_grad()
    def generate_ids(self, text: str, images=None, *, thinking: bool = False, template: str | None = None,
                     max_new: int = 256, device=None, dtype=None, **sampling) -> list:
        """:meth:`generate` as token ids (the stop token included when produced)."""
        images = [images] if isinstance(images, torch.Tensor) else list(images or [])
        block = VISION_START + IMAGE_PAD + VISION_END
        if template is None:
            template = IM_START + "user\n" + block * len(images) + "{}" + IM_END + "\n" + IM_START + "assistant\n"
            if not thinking:
                template += "<think>\n\n</think>\n\n"
        ids = self.tokenizer.encode(template.replace("{}", text, 1) if "{}" in template else template + text)
        dev = self._device(device)
        vis = None
        if images:
            prepared, merge = self._prepare_images(images)
            ids, spans = expand_image_pads(ids, self.tokenizer.token_id(IMAGE_PAD), image_token_counts(prepared, merge))
            vis = self._vision_inputs(ids, spans, prepared, merge, dev, dtype)
        stop = [self.tokenizer.token_id(IM_END)]
        return generate(self.model, ids, vision=vis, max_new=max_new, stop_ids=stop, dtype=dtype, device=dev,
                        **sampling)

    # -- pieces --------------------------------------------------------------------------------------------
    def _device(self, device):
        w = self.model.embed_tokens.weight
        return device if device is not None else (w.device if w.device.type != "meta" else "cpu")

    def _prepare_images(self, images: list) -> tuple[list, int]:
        """Each image through :func:`krea2_model.text.images.prepare` (checked: count, vision tower present)."""
        if len(images) > I.MAX_IMAGES:
            raise ConditioningError(f"{len(images)} images given; Krea 2's reference encoding takes at most "
                                    f"{I.MAX_IMAGES} (Picture 1 to {I.MAX_IMAGES}). Combine or drop some.")
        if self.vision is None:
            raise ConditioningError(f"{self.where}: cannot encode images: {self.vision_problem}. Load a full "
                                    "Qwen3-VL file with its vision tower (ComfyUI's qwen3vl_4b_bf16 / "
                                    "qwen3vl_4b_fp8_scaled, or the Qwen/Qwen3-VL-4B-Instruct folder).")
        return [I.prepare(im, f"image {i + 1}") for i, im in enumerate(images)], self.vision.config.merge

    def _vision_inputs(self, ids, spans, prepared, merge, dev, dtype) -> VisionInputs:
        if max(ids) >= self.config.vocab:
            raise ShapeMismatchError(f"{self.where}: the tokenizer gives token id {max(ids)} but the text encoder's "
                                     f"vocabulary has {self.config.vocab} entries: tokenizer and model do not belong "
                                     "together.")
        grids = [g for _, g, _ in prepared]
        tokens, deep = self.vision(torch.cat([x for x, _, _ in prepared]).to(dev), grids, dtype=dtype)
        mask = torch.zeros(len(ids), dtype=torch.bool, device=dev)
        for start, count in spans:
            mask[start:start + count] = True
        merged = [(gh // merge, gw // merge) for _, gh, gw in grids]
        return VisionInputs(mask, tokens, deep, mrope_positions(len(ids), spans, merged, dev))


def image_token_counts(prepared: list, merge: int = 2) -> list:
    """Vision tokens each prepared image becomes: its patch count over the ``merge x merge`` group size."""
    return [t * gh * gw // merge ** 2 for _, (t, gh, gw), _ in prepared]


def load_text_encoder(source, *, tokenizer=None, dtype=None, device="cpu", operations=None,
                      progress: Callable[[int, int], None] | None = None) -> Krea2TextEncoder:
    """Load the Qwen3-VL text tower from ``source`` (a ``.safetensors`` file in any accepted layout, an HF
    folder, or a state dict) and its tokenizer -> :class:`Krea2TextEncoder`.

    ``tokenizer``: a folder / ``tokenizer.json`` / tokenizer object; default: files beside the checkpoint,
    else the host's ``comfy/text_encoders/qwen25_tokenizer`` (raises :class:`TokenizerNotFoundError`
    when neither exists). ``dtype``/``device``/``operations`` as :func:`load_text_model`."""
    ck = TextCheckpoint(source)
    tok = find_tokenizer(source if isinstance(source, (str, os.PathLike)) else None, tokenizer)
    model = load_text_model(ck, dtype=dtype, device=device, operations=operations, progress=progress)
    # the vision tower is loaded on the first prompt with images: text-only use never pays for it
    vision = None if ck.vision is None else (
        lambda: load_vision_model(ck, dtype=dtype, device=device, operations=operations))
    return Krea2TextEncoder(model, tok, ck.where, vision, ck.vision_problem)
