"""The Qwen BPE tokenizer Krea 2's text encoder reads, from the files that ship with it.

Read with the ``tokenizers`` library (present in every ComfyUI host, imported lazily): a
``tokenizer.json``, or Qwen's ``vocab.json`` + ``merges.txt`` (+ ``tokenizer_config.json`` for the
special tokens), from beside the checkpoint or from the host's own ``qwen25_tokenizer`` folder.
"""

from __future__ import annotations

import json
import logging
import os
import sys

from ..errors import Krea2Error, TokenizerNotFoundError

log = logging.getLogger("krea2")

IM_START, IM_END, ENDOFTEXT = "<|im_start|>", "<|im_end|>", "<|endoftext|>"
#: Qwen-VL's image tokens (ids 151652 / 151655 / 151653 in Qwen's vocabulary).
VISION_START, IMAGE_PAD, VISION_END = "<|vision_start|>", "<|image_pad|>", "<|vision_end|>"
#: Qwen's pre-tokenizer split pattern (a fixed part of the tokenizer format, the same in every Qwen
#: ``tokenizer.json``).
QWEN_SPLIT = (r"""(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*|"""
              r"""\s*[\r\n]+|\s+(?!\S)|\s+""")
#: Where a ComfyUI host keeps its Qwen tokenizer, relative to the ComfyUI root.
HOST_TOKENIZER = os.path.join("comfy", "text_encoders", "qwen25_tokenizer")


def _import_tokenizers():
    try:
        import tokenizers
    except ImportError:
        raise Krea2Error("the Krea 2 text encoder needs the 'tokenizers' package (it ships with ComfyUI and with "
                         "transformers): pip install tokenizers") from None
    return tokenizers


class QwenTokenizer:
    """A Qwen BPE tokenizer: ``encode(text) -> list[int]`` (never adds BOS/EOS) and ``token_id(tok)``.

    Wraps a ``tokenizers.Tokenizer`` or a ``transformers`` tokenizer object."""

    def __init__(self, backend, where: str = "<tokenizer>"):
        self.backend = backend
        self.where = where
        self._hf = not hasattr(backend, "encode_batch")  # transformers tokenizers have no encode_batch

    def encode(self, text: str) -> list[int]:
        if self._hf:
            return list(self.backend.encode(text, add_special_tokens=False))
        return list(self.backend.encode(text, add_special_tokens=False).ids)

    def decode(self, ids, skip_special_tokens: bool = True) -> str:
        """Text of token ``ids`` (both backends take the same arguments)."""
        return self.backend.decode(list(ids), skip_special_tokens=skip_special_tokens)

    def token_id(self, token: str):
        if self._hf:
            i = self.backend.convert_tokens_to_ids(token)
            return None if i is None or i == getattr(self.backend, "unk_token_id", -1) else int(i)
        i = self.backend.token_to_id(token)
        return None if i is None else int(i)

    def tokens_by_id(self) -> list:
        """Every token string at its id (added tokens included; ``None`` where an id has no token)."""
        vocab = self.backend.get_vocab() if self._hf else self.backend.get_vocab(with_added_tokens=True)
        out = [None] * (max(vocab.values()) + 1 if vocab else 0)
        for t, i in vocab.items():
            out[int(i)] = t
        return out

    def is_qwen_chat(self) -> bool:
        """Whether ``<|im_start|>`` and ``<|im_end|>`` are single special tokens."""
        ids = [self.token_id(IM_START), self.token_id(IM_END)]
        return None not in ids and self.encode(IM_START + IM_END) == ids


def _added_tokens(folder: str, vocab: dict) -> list[tuple[int, dict]]:
    cfg = os.path.join(folder, "tokenizer_config.json")
    added = []
    if os.path.isfile(cfg):
        try:
            with open(cfg, encoding="utf-8") as f:
                dec = json.load(f).get("added_tokens_decoder") or {}
            added = sorted((int(i), v) for i, v in dec.items())
        except (OSError, ValueError) as e:
            raise TokenizerNotFoundError(f"{cfg}: unreadable tokenizer config ({e}).")
    if not added:  # Qwen's three chat/pad tokens follow the BPE vocabulary
        if "\u0120the" not in vocab:  # "Ġthe": byte-level BPE with Qwen/GPT-2 word starts (not CLIP's "the</w>")
            raise TokenizerNotFoundError(f"{folder}: vocab.json is not a byte-level BPE vocabulary like Qwen's.")
        n = len(vocab)
        added = [(n + i, {"content": t, "special": True}) for i, t in enumerate((ENDOFTEXT, IM_START, IM_END))]
    return added


def _read_merges(folder: str) -> list:
    """``merges.txt`` as ``[[left, right], ...]`` in file order (the ``#version`` header skipped)."""
    path = os.path.join(folder, "merges.txt")
    merges = []
    with open(path, encoding="utf-8") as f:
        for n, line in enumerate(f, 1):
            line = line.rstrip("\r\n")
            if line and not line.startswith("#version"):
                pair = line.split(" ")
                if len(pair) != 2:
                    raise TokenizerNotFoundError(f"{path}: line {n} ({line!r}) is not a merge 'left right'.")
                merges.append(pair)
    return merges


def tokenizer_from_vocab(folder: str):
    """A ``tokenizers.Tokenizer`` for Qwen's ``vocab.json`` + ``merges.txt`` (+ ``tokenizer_config.json``).

    Qwen ships the same tokenizer as one ``tokenizer.json`` document; this writes that document from the
    three files (byte-level BPE over Qwen's split pattern after NFC, the special tokens at their ids) and
    has ``tokenizers`` read it, so both ways of shipping it give one tokenizer."""
    tk = _import_tokenizers()
    try:
        with open(os.path.join(folder, "vocab.json"), encoding="utf-8") as f:
            vocab = json.load(f)
    except (OSError, ValueError) as e:
        raise TokenizerNotFoundError(f"{folder}: unreadable vocab.json ({e}).") from None
    added = _added_tokens(folder, vocab)
    byte_level = {"type": "ByteLevel", "add_prefix_space": False, "trim_offsets": False, "use_regex": False}
    document = {
        "version": "1.0", "truncation": None, "padding": None, "post_processor": None,
        "added_tokens": [{"id": i, "content": t["content"], "single_word": t.get("single_word", False),
                          "lstrip": t.get("lstrip", False), "rstrip": t.get("rstrip", False),
                          "normalized": t.get("normalized", False), "special": t.get("special", True)}
                         for i, t in added],
        "normalizer": {"type": "NFC"},
        "pre_tokenizer": {"type": "Sequence", "pretokenizers": [
            {"type": "Split", "pattern": {"Regex": QWEN_SPLIT}, "behavior": "Isolated", "invert": False},
            byte_level]},
        "decoder": byte_level,
        "model": {"type": "BPE", "dropout": None, "unk_token": None, "continuing_subword_prefix": "",
                  "end_of_word_suffix": "", "fuse_unk": False, "byte_fallback": False, "ignore_merges": False,
                  "vocab": vocab, "merges": _read_merges(folder)},
    }
    try:
        tok = tk.Tokenizer.from_str(json.dumps(document))
    except Exception as e:  # tokenizers raises a bare Exception
        raise TokenizerNotFoundError(f"{folder}: vocab.json and merges.txt do not form a BPE tokenizer ({e}).") from None
    for i, t in added:
        got = tok.token_to_id(t["content"])
        if got != i:
            raise TokenizerNotFoundError(
                f"{folder}: tokenizer_config.json gives '{t['content']}' id {i} but it lands at {got} after the "
                f"{len(vocab)}-entry vocab.json; the tokenizer files do not belong together.")
    return tok


def tokenizer_files(folder: str) -> str | None:
    """``'tokenizer.json'``, ``'vocab'`` (vocab.json + merges.txt) or None for what ``folder`` holds."""
    if os.path.isfile(os.path.join(folder, "tokenizer.json")):
        return "tokenizer.json"
    if os.path.isfile(os.path.join(folder, "vocab.json")) and os.path.isfile(os.path.join(folder, "merges.txt")):
        return "vocab"
    return None


def load_tokenizer(spec) -> QwenTokenizer:
    """``spec``: a folder (``tokenizer.json``, or ``vocab.json`` + ``merges.txt``), a ``tokenizer.json``
    path, a ``tokenizers.Tokenizer``, a ``transformers`` tokenizer or a :class:`QwenTokenizer`."""
    if isinstance(spec, QwenTokenizer):
        return spec
    if not isinstance(spec, (str, os.PathLike)):
        if hasattr(spec, "encode"):
            return QwenTokenizer(spec, type(spec).__name__)
        raise TypeError(f"tokenizer must be a path or a tokenizer object, not {type(spec).__name__}")
    path = os.fspath(spec)
    tk = _import_tokenizers()
    if os.path.isfile(path):
        if not path.endswith(".json"):
            raise TokenizerNotFoundError(f"{path}: not a tokenizer.json; give the tokenizer file or its folder.")
        try:
            return QwenTokenizer(tk.Tokenizer.from_file(path), path)
        except Exception as e:
            raise TokenizerNotFoundError(f"{path}: cannot read this tokenizer.json ({e}).") from None
    if os.path.isdir(path):
        kind = tokenizer_files(path)
        if kind == "tokenizer.json":
            return load_tokenizer(os.path.join(path, "tokenizer.json"))
        if kind == "vocab":
            return QwenTokenizer(tokenizer_from_vocab(path), path)
        raise TokenizerNotFoundError(f"{path}: no tokenizer.json, nor vocab.json + merges.txt, in this folder.")
    raise TokenizerNotFoundError(f"{path}: no such tokenizer file or folder.")


def host_tokenizer_dirs() -> list[str]:
    """Candidate host tokenizer folders: ``<root>/comfy/text_encoders/qwen25_tokenizer`` for a loaded
    ``comfy`` package (read from ``sys.modules``, never imported), ``COMFYUI_PATH`` and ``sys.path``."""
    roots = []
    comfy = sys.modules.get("comfy")
    if comfy is not None and getattr(comfy, "__file__", None):
        roots.append(os.path.dirname(os.path.dirname(os.path.abspath(comfy.__file__))))
    if os.environ.get("COMFYUI_PATH"):
        roots.append(os.environ["COMFYUI_PATH"])
    roots += [p or os.getcwd() for p in sys.path if isinstance(p, str)]
    out = []
    for r in roots:
        d = os.path.join(r, HOST_TOKENIZER)
        if d not in out:
            out.append(d)
    return out


def find_tokenizer(source=None, tokenizer=None) -> QwenTokenizer:
    """The Qwen tokenizer for a text encoder at ``source``.

    ``tokenizer`` given: that. Else files beside the checkpoint (its folder, ``tokenizer/`` in it, or for
    an HF folder its parent's ``tokenizer/``), then the host's ``qwen25_tokenizer``. A candidate that is
    not a Qwen chat tokenizer (no ``<|im_start|>`` special token) is skipped.
    Raises :class:`TokenizerNotFoundError` listing every place looked. For a GGUF ``source`` the tokenizer is
    then checked against the vocabulary the file records (:func:`krea2_model.formats.gguf.check_text_vocab`;
    :class:`~krea2_model.errors.TokenizerMismatchError` when they disagree)."""
    tok = _find_tokenizer(source, tokenizer)
    if isinstance(source, (str, os.PathLike)) and os.path.isfile(source):
        from ..formats.gguf import check_text_vocab, is_gguf
        if is_gguf(source):
            check_text_vocab(source, tok)
    return tok


def _find_tokenizer(source=None, tokenizer=None) -> QwenTokenizer:
    if tokenizer is not None:
        tok = load_tokenizer(tokenizer)
        if not tok.is_qwen_chat():
            raise TokenizerNotFoundError(f"{tok.where}: this tokenizer has no '<|im_start|>'/'<|im_end|>' special "
                                         "tokens, so it is not the Qwen tokenizer Krea 2 needs.")
        return tok
    cands = []
    if isinstance(source, (str, os.PathLike)):
        p = os.path.abspath(os.fspath(source))
        if os.path.isdir(p):
            cands += [p, os.path.join(p, "tokenizer"), os.path.join(os.path.dirname(p), "tokenizer")]
        else:
            d = os.path.dirname(p)
            stem = os.path.splitext(os.path.basename(p))[0]
            cands += [d, os.path.join(d, stem + "_tokenizer"), os.path.join(d, "tokenizer")]
    local = len(cands)
    cands += host_tokenizer_dirs()
    skipped = []
    for i, c in enumerate(cands):
        if not os.path.isdir(c) or tokenizer_files(c) is None:
            continue
        try:
            tok = load_tokenizer(c)
        except TokenizerNotFoundError as e:
            skipped.append(str(e))
            continue
        if tok.is_qwen_chat():
            log.debug("Krea 2: Qwen tokenizer from %s", c)
            return tok
        skipped.append(f"{c}: not a Qwen chat tokenizer")
    looked = cands[:local] + cands[local:local + 3] + (["... every sys.path entry"] if len(cands) > local + 3 else [])
    raise TokenizerNotFoundError(
        "no Qwen tokenizer found for the Krea 2 text encoder. Put the Qwen3-VL tokenizer files (tokenizer.json, or "
        "vocab.json + merges.txt + tokenizer_config.json) beside the checkpoint, or run inside ComfyUI, whose "
        f"'{HOST_TOKENIZER}' folder is used otherwise. Looked in: {', '.join(looked)}"
        + (f". Skipped: {'; '.join(skipped)}" if skipped else "") + ".")


