"""Host adapter: ``Krea2ClipModel``, the ``cond_stage_model`` of our CLIP: the Qwen3-VL tower with Krea 2's taps
(and its vision tower where the file has one), built through the host's operations. Encodes the token dicts of
:mod:`.clip_tokenizer` (text, or text around images) and generates (core's TextGenerate)."""

from __future__ import annotations

import torch

import comfy.model_management as mm
import comfy.ops
import comfy.utils

from ...krea2_model.errors import Krea2Error, first_names
from ...krea2_model.formats.gguf_dequant import dequantize
from ...krea2_model.text.encoder import Krea2TextEncoder
from ...krea2_model.text.generate import COPY_RESERVE, FIRST_CAPACITY, cache_bytes, output_head
from ...krea2_model.text.qwen3 import DEFAULT_TAPS, Qwen3TextConfig, Qwen3TextModel
from ...krea2_model.text.vision import Qwen3VisionConfig, Qwen3VisionModel

#: the key of our entry in ComfyUI's token dicts
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
