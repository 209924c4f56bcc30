"""Host adapter: the loader of our Qwen3-VL text encoder as a ComfyUI CLIP.

``comfy.sd.CLIP`` builds :class:`~.clip_model.Krea2ClipModel` (the ``cond_stage_model``) through ComfyUI's
operations with :class:`~.clip_tokenizer.Krea2ClipTokenizer`, and wraps it in a ModelPatcher, so the encoder is
loaded to the GPU to encode and offloaded after, like core text encoders. Works with core ``CLIPTextEncode``
(default taps) and ``Krea2TextEncode`` (any taps: they travel inside the token dict). The encode functions the nodes
call are in :mod:`.clip_encode`, core's own Krea 2 CLIP in :mod:`.core_tokens`.
"""

from __future__ import annotations

import logging
import os

import torch

import comfy.sd
import comfy.supported_models_base
import comfy.utils

from ...krea2_model.formats.text_file import TextCheckpoint
from .clip_model import Krea2ClipModel
from .clip_tokenizer import Krea2ClipTokenizer
from .compat import takes
from .weights import load_into

log = logging.getLogger("krea2")


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
