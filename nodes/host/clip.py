"""Host adapter: our Qwen3-VL text tower with Krea 2 taps as a ComfyUI CLIP.

``comfy.sd.CLIP`` builds ``Krea2ClipModel`` (the ``cond_stage_model``) through ComfyUI's operations
and wraps it in a ModelPatcher, so the encoder is loaded to the GPU to encode and offloaded after,
like core text encoders. Works with core ``CLIPTextEncode`` (default taps) and ``Krea2TextEncode``
(any taps: they travel inside the token dict).
"""

from __future__ import annotations

import logging
import os
import re

import torch

import comfy.model_management as mm
import comfy.ops
import comfy.sd
import comfy.supported_models_base
import comfy.utils

from ...krea2_model.errors import Krea2Error, first_names
from ...krea2_model.formats.text_file import TextCheckpoint
from ...krea2_model.formats.gguf_dequant import dequantize
from ...krea2_model.text.encoder import Krea2TextEncoder, image_token_counts
from ...krea2_model.text.generate import COPY_RESERVE, FIRST_CAPACITY, cache_bytes, output_head
from ...krea2_model.text.images import MAX_IMAGES, prepare, reference_pixels
from ...krea2_model.text.tokenizer import IMAGE_PAD
from ...krea2_model.text.vision import Qwen3VisionConfig, Qwen3VisionModel
from ...krea2_model.text.prompt import (MAX_TOKENS, SUFFIX_LEN, build_image_prompt_ids, build_prompt_ids, templated_prompt_span,
                                        warn_truncated)
from ...krea2_model.text.qwen3 import DEFAULT_TAPS, Qwen3TextConfig, Qwen3TextModel
from ...krea2_model.text.tokenizer import find_tokenizer
from .weights import load_into
from .compat import takes

log = logging.getLogger("krea2")
KEY = "krea2_qwen3vl"


class Krea2ClipModel(torch.nn.Module):
    """``cond_stage_model``: ``transformer`` is our :class:`Qwen3TextModel`; ``encode_token_weights``
    turns our token dict into ``(cond (1, n, taps*hidden), None, {})``."""

    def __init__(self, text_config: dict, device="cpu", dtype=None, model_options=None, vision_config=None,
                 vision_problem=None):
        super().__init__()
        ops = (model_options or {}).get("custom_operations") or comfy.ops.manual_cast
        self.transformer = Qwen3TextModel(Qwen3TextConfig(**text_config), dtype=dtype, device=device, operations=ops)
        #: the vision tower (when the file has one): a submodule, so the host loads and offloads it with the rest
        self.visual = Qwen3VisionModel(Qwen3VisionConfig(**vision_config), dtype=dtype, device=device,
                                       operations=ops) if vision_config else None
        self.vision_problem = vision_problem
        self.dtypes = {dtype} if dtype is not None else {torch.float32}
        self.execution_device = None

    def encoder(self, tokenizer=None) -> Krea2TextEncoder:
        """Our pure encoder around the host-managed modules (weights wherever the host put them)."""
        return Krea2TextEncoder(self.transformer, tokenizer, "Krea 2 text encoder", self.visual, self.vision_problem)

    def reset_clip_options(self):
        self.execution_device = None

    def set_clip_options(self, options):
        self.execution_device = options.get("execution_device", self.execution_device)

    def load_sd(self, sd):
        """Load a state dict in our canonical names (what ``state_dict()`` gives); a key that is missing or has
        no place in the model is an error naming it, never a silently half-loaded encoder."""
        result = self.transformer.load_state_dict(sd, strict=False)
        if result.missing_keys or result.unexpected_keys:
            parts = []
            if result.missing_keys:
                parts.append(f"{len(result.missing_keys)} missing (first: {first_names(result.missing_keys, 4)})")
            if result.unexpected_keys:
                parts.append(f"{len(result.unexpected_keys)} with no place in the model (first: "
                             f"{first_names(result.unexpected_keys, 4)})")
            raise Krea2Error(f"Krea 2 text encoder: a state dict given to load_sd does not fit the Qwen3-VL tower: "
                             f"{'; '.join(parts)}. Load the text encoder with Krea2TextEncoderLoader.")
        return result

    def memory_estimation_function(self, tokens, device=None):
        t = tokens.get(KEY, {})
        n = len(t.get("ids", [])) or 512
        patches = sum(int(x.shape[0]) for x, _, _ in t.get("images", []))
        vision = patches * self.visual.config.hidden * 64 if self.visual is not None else 0
        extra = 0
        if (t.get("generate") or {}).get("requested"):  # TextGenerate: the per-call head copy and the KV cache
            dtype = self.generation_dtype(device)
            extra = (self.head_copy_bytes(dtype) +
                     cache_bytes(self.transformer, n + FIRST_CAPACITY, dtype))
        return n * self.transformer.config.hidden * 64 + vision + extra

    def storage_dtype(self) -> torch.dtype:
        """The dtype the tower's weights are kept in (for GGUF blocks: the host's dtype for the other tensors)."""
        w = self.transformer.embed_tokens.weight
        return w.dtype if w.dtype.is_floating_point else next(iter(self.dtypes))

    def generation_dtype(self, device) -> torch.dtype:
        """The compute dtype of generation on ``device``, from the storage, as ComfyUI's own LLM generate picks it:
        float32 storage stays float32; bf16 storage computes in bf16 where the device supports it; fp16, fp8 and
        GGUF storage compute in bf16 where supported (ComfyUI never generates in fp16), else float32 (the CPU)."""
        storage = self.storage_dtype()
        if storage == torch.float32 or device is None:
            return torch.float32
        return torch.bfloat16 if mm.should_use_bf16(device) else torch.float32

    def head_copy_bytes(self, dtype) -> int:
        """Bytes of the output head's per-call copy in ``dtype`` (0 when the stored table is used as it is)."""
        emb = self.transformer.embed_tokens
        if getattr(emb, "gguf_qtype", None) is None and emb.weight.dtype == dtype and not getattr(
                emb, "weight_function", None):
            return 0
        cfg = self.transformer.config
        return cfg.vocab * cfg.hidden * torch.empty((), dtype=dtype).element_size()

    def output_head(self, dtype, device) -> torch.Tensor:
        """The tied output head in ``dtype`` on ``device`` for one generation call, through the host's cast path
        (weight patches applied), made once per call: a GGUF table is dequantized once, a stored table already in
        ``dtype`` is used as it is."""
        emb = self.transformer.embed_tokens
        if getattr(emb, "gguf_qtype", None) is not None:
            w = dequantize(emb.weight.to(device), emb.gguf_qtype, emb.gguf_shape, dtype)
            for f in getattr(emb, "weight_function", ()):
                w = f(w)
            return w
        if getattr(emb, "comfy_cast_weights", False) or getattr(emb, "weight_function", None):
            w, _ = comfy.ops.cast_bias_weight(emb, torch.empty(0, dtype=dtype, device=device), dtype=dtype,
                                              device=device)
            return w
        return output_head(self.transformer, dtype, device)

    @staticmethod
    def copy_budget(device) -> int:
        """Bytes a GGUF tower's per-call dequantized layer copies may take during generation: the host's free
        memory on ``device`` less its inference reserve, a quarter of it, or 1 GiB, whichever is most."""
        free = mm.get_free_memory(device)
        return max(0, free - max(COPY_RESERVE, free // 4, mm.minimum_inference_memory()))

    def generate(self, tokens, do_sample=True, max_length=256, temperature=1.0, top_k=50, top_p=0.95, min_p=0.0,
                 repetition_penalty=1.0, seed=None, presence_penalty=0.0):
        """ComfyUI's ``CLIP.generate`` (TextGenerate): new token ids for the prompt stored by the tokenizer, computed
        in :meth:`generation_dtype`, one progress step per token (the host's interrupt stops it)."""
        t = tokens[KEY]
        g = t["generate"]
        dev = torch.device(self.execution_device or next(self.transformer.parameters()).device)
        dtype = self.generation_dtype(dev)
        pbar = comfy.utils.ProgressBar(max_length)
        return self.encoder(g["tokenizer"]).generate_ids(
            g["text"], list(g["images"]), thinking=g["thinking"], template=g["template"], max_new=max_length,
            device=dev, dtype=dtype, head=self.output_head(dtype, dev), copy_budget=self.copy_budget(dev),
            progress=lambda n: pbar.update(1),
            do_sample=do_sample, temperature=temperature, top_k=top_k, top_p=top_p, min_p=min_p,
            repetition_penalty=repetition_penalty, presence_penalty=presence_penalty, seed=seed)

    def encode_token_weights(self, tokens):
        t = tokens[KEY]
        taps = tuple(t.get("taps", DEFAULT_TAPS))
        dev = self.execution_device or next(self.transformer.parameters()).device
        if t.get("images"):
            enc = self.encoder().encode_image_ids(t["prompt"], t["images"], taps, dev, torch.float32)
            return enc.cond.to(mm.intermediate_device(), torch.float32), None, {}
        ids = torch.tensor([t["ids"]], dtype=torch.long, device=dev)
        cfg = self.transformer.config
        deepest = max(taps)
        pbar = comfy.utils.ProgressBar(deepest) if len(t["ids"]) * deepest > 2048 else None
        hooks = [layer.register_forward_hook(lambda *_: pbar.update(1)) for layer in self.transformer.layers[:deepest]] \
            if pbar is not None else []
        try:
            # float32 activations whatever the storage (ComfyUI's CLIP sets float32 compute for text
            # encoders too); the host's operations cast each weight as it is used
            h = self.transformer.forward_after_prefix(ids, t["prefix_len"], taps, dtype=torch.float32)
        finally:
            for hk in hooks:
                hk.remove()
        cond = h.to(mm.intermediate_device(), torch.float32)
        if cond.shape[-1] != len(taps) * cfg.hidden:
            raise Krea2Error("internal: unexpected conditioning width")
        return cond, None, {}


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


def load_clip(path: str, disable_dynamic: bool = False):
    """A ComfyUI CLIP for a Qwen3-VL file or HF folder (validated with clear errors first). ``disable_dynamic``:
    a plain (not dynamic-VRAM) patcher, what the host asks for through ``cached_patcher_init``."""
    clip = _load_clip(path, disable_dynamic)
    # the host rebuilds the encoder from this factory when it needs a non-dynamic or per-device copy (hooks,
    # multi-GPU); core's own CLIPLoader registers the same
    clip.patcher.cached_patcher_init = (load_clip_patcher, (path,))
    return clip


def load_clip_patcher(path: str, disable_dynamic: bool = False):
    """The ModelPatcher of a freshly loaded CLIP: the factory ``cached_patcher_init`` calls."""
    return load_clip(path, disable_dynamic).patcher


def _load_clip(path: str, disable_dynamic: bool):
    ck = TextCheckpoint(path)
    tok_cls = type("Krea2ClipTokenizerFor", (Krea2ClipTokenizer,), {"tokenizer_source": path})
    tok_cls(None)  # tokenizer errors now, at load time, naming the file
    target = comfy.supported_models_base.ClipTarget(tok_cls, Krea2ClipModel)
    target.params = {"text_config": dict(ck.config.__dict__), "vision_problem": ck.vision_problem}
    if ck.vision is not None and ck.layout != "gguf":
        target.params["vision_config"] = dict(ck.vision.config.__dict__)
    n_params = sum(int(torch.Size(ck.shape(k)).numel()) for k in ck.keys())
    if ck.layout == "gguf":  # weights stay quantized, dequantized at cast time: see nodes.host.gguf
        from .gguf import load_gguf_clip
        return load_gguf_clip(ck, target, n_params)
    kwargs = {"disable_dynamic": True} if disable_dynamic and takes(comfy.sd.CLIP.__init__, "disable_dynamic") \
        else {}
    clip = comfy.sd.CLIP(target=target, embedding_directory=None, tokenizer_data={}, parameters=n_params,
                         model_options={}, **kwargs)  # fresh dicts: the host keeps and may fill them
    # module by module through the host's own loading protocol (its layers may be built lazily: see
    # nodes.host.weights): peak memory = model + one layer
    fp8 = (torch.float8_e4m3fn, torch.float8_e5m2)
    pbar = comfy.utils.ProgressBar(len(ck.keys()))

    def text_tensor(k, dtype):
        pbar.update(1)
        return ck.dequantized(k, keep_fp8=dtype in fp8)

    load_into(clip.cond_stage_model.transformer, ck.keys(), text_tensor, path, "text encoder")
    visual = clip.cond_stage_model.visual
    if visual is not None:
        load_into(visual, ck.vision.keys(), lambda k, dtype: ck.vision.dequantized(k, keep_fp8=dtype in fp8),
                  path, "vision tower")
    log.info("Krea 2: text encoder %s (%s layout, %d layers, hidden %d)", os.path.basename(path.rstrip('/')),
             ck.layout, ck.config.layers, ck.config.hidden)
    return clip




def is_ours(clip) -> bool:
    return isinstance(getattr(clip, "cond_stage_model", None), Krea2ClipModel)


def is_core_krea2(clip) -> bool:
    """True for a CLIP of core's native Krea 2 text encoder (its own class, where the host has one)."""
    from .internals import native_krea2_text_class
    native = native_krea2_text_class()
    return native is not None and isinstance(getattr(clip, "cond_stage_model", None), native)


def limit_core_tokens(tokens: dict, max_tokens: int = MAX_TOKENS) -> dict:
    """Core's Krea 2 tokens cut to the reference's limit: at most ``max_tokens - 5`` prompt tokens, then the
    assistant suffix (core itself passes any length, which the model was never trained on). Logs the same
    warning as our encoder; token lists of another shape are returned as they are."""
    if max_tokens < SUFFIX_LEN:
        raise Krea2Error(f"Krea2TextEncode: max_tokens {max_tokens} is below the {SUFFIX_LEN}-token assistant suffix.")
    out = {}
    for key, batches in tokens.items():
        cut = []
        for seq in batches:
            ids = [t[0] if isinstance(t, (tuple, list)) and isinstance(t[0], int) else None for t in seq]
            span = templated_prompt_span(ids)
            budget = max_tokens - SUFFIX_LEN
            if span is not None and span[1] - span[0] > budget:
                warn_truncated(span[1] - span[0], max_tokens, SUFFIX_LEN)
                seq = list(seq[:span[0] + budget]) + list(seq[span[1]:])
            cut.append(seq)
        out[key] = cut
    return out


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
