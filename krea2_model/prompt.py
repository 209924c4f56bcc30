"""Krea 2's prompt layout and the Qwen tokenizer, without padding.

The reference (diffusers ``Krea2Pipeline.get_text_hidden_states``) tokenizes
``PREFIX + prompt`` truncated to ``512 + 34 - 5`` tokens and padded to that length, appends the
5-token ``SUFFIX`` after the padding, masks the padding, gives real tokens consecutive positions
(``cumsum(mask) - 1``) and drops the first 34 rows (the system prefix). Padding is masked as a key
and never moves a position, so running only the real tokens, ``[prefix | prompt | suffix]`` at
positions ``0..n-1``, gives the same rows; :func:`build_prompt_ids` builds exactly those ids.

The tokenizer is read with the ``tokenizers`` library (present in every ComfyUI host, imported
lazily): a ``tokenizer.json``, or Qwen's ``vocab.json`` + ``merges.txt`` (+ ``tokenizer_config.json``
for the special tokens) rebuilt the way ``transformers``' ``Qwen2Tokenizer`` builds it.
"""

from __future__ import annotations

import json
import logging
import os
import sys
from dataclasses import dataclass

from .errors import Krea2Error, TokenizerNotFoundError

log = logging.getLogger("krea2")

#: The Qwen-Image system template Krea 2 was trained with; everything up to the user turn is dropped.
PREFIX = ("<|im_start|>system\nDescribe the image by detailing the color, shape, size, texture, quantity, text, "
          "spatial relationships of the objects and background:<|im_end|>\n<|im_start|>user\n")
SUFFIX = "<|im_end|>\n<|im_start|>assistant\n"
IM_START, IM_END, ENDOFTEXT = "<|im_start|>", "<|im_end|>", "<|endoftext|>"
#: The reference's ``max_sequence_length``: prompt tokens + suffix tokens after the prefix.
MAX_TOKENS = 512

#: ``transformers``' Qwen2 pre-tokenizer split (a published constant of the tokenizer format).
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

    def token_id(self, token: str):
        if self._hf:
            i = self.backend.convert_tokens_to_ids(token)
            return None if i is None or i == getattr(self.backend, "unk_token_id", -1) else int(i)
        i = self.backend.token_to_id(token)
        return None if i is None else int(i)

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


def tokenizer_from_vocab(folder: str):
    """A ``tokenizers.Tokenizer`` from Qwen's ``vocab.json`` + ``merges.txt`` (+ ``tokenizer_config.json``):
    NFC normalisation, the Qwen split regex, byte-level BPE, special tokens from the config."""
    tk = _import_tokenizers()
    from tokenizers import AddedToken, Regex, decoders, normalizers, pre_tokenizers
    from tokenizers.models import BPE

    try:
        with open(os.path.join(folder, "vocab.json"), encoding="utf-8") as f:
            vocab = json.load(f)
    except (OSError, ValueError) as e:
        raise TokenizerNotFoundError(f"{folder}: unreadable vocab.json ({e}).") from None
    merges = []
    with open(os.path.join(folder, "merges.txt"), encoding="utf-8") as f:
        for line in f:
            line = line.rstrip("\r\n")
            if not line or line.startswith("#version"):
                continue
            parts = line.split(" ")
            if len(parts) != 2:
                raise TokenizerNotFoundError(f"{folder}: merges.txt line {line!r} is not 'left right'.")
            merges.append((parts[0], parts[1]))
    added = _added_tokens(folder, vocab)
    try:
        tok = tk.Tokenizer(BPE(vocab=vocab, merges=merges, dropout=None, unk_token=None, continuing_subword_prefix="",
                               end_of_word_suffix="", fuse_unk=False, byte_fallback=False))
    except Exception as e:  # tokenizers raises a bare Exception
        raise TokenizerNotFoundError(f"{folder}: vocab.json and merges.txt do not form a BPE tokenizer ({e}).") from None
    tok.normalizer = normalizers.NFC()
    tok.pre_tokenizer = pre_tokenizers.Sequence([
        pre_tokenizers.Split(Regex(QWEN_SPLIT), behavior="isolated", invert=False),
        pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False),
    ])
    tok.decoder = decoders.ByteLevel()
    for i, spec in added:
        t = AddedToken(spec["content"], single_word=spec.get("single_word", False), lstrip=spec.get("lstrip", False),
                       rstrip=spec.get("rstrip", False), normalized=spec.get("normalized", False),
                       special=spec.get("special", True))
        tok.add_special_tokens([t]) if spec.get("special", True) else tok.add_tokens([t])
        got = tok.token_to_id(spec["content"])
        if got != i:
            raise TokenizerNotFoundError(
                f"{folder}: tokenizer_config.json gives '{spec['content']}' id {i} but it lands at {got} after the "
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
    Raises :class:`TokenizerNotFoundError` listing every place looked."""
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


@dataclass(frozen=True)
class PromptIds:
    """``ids``: ``[prefix | prompt | suffix]`` token ids (real tokens only); ``prefix_len``: rows to drop;
    ``prompt_tokens``: prompt tokens kept; ``prompt_tokens_total``: before truncation."""
    ids: list
    prefix_len: int
    prompt_tokens: int
    prompt_tokens_total: int

    @property
    def real_tokens(self) -> int:
        """Rows of the conditioning: kept prompt tokens + suffix tokens."""
        return len(self.ids) - self.prefix_len


def prefix_length(tok: QwenTokenizer, ids: list) -> int:
    """Index of the first token after ``<|im_start|>user\\n``, found by token ids: the second
    ``<|im_start|>`` then the tokens of ``user\\n`` (34 with Qwen's vocabulary).

    The newline is counted as one token even when it merges with the prompt's leading whitespace,
    so the rows dropped are those the reference drops."""
    start = tok.token_id(IM_START)
    seen = [i for i, t in enumerate(ids) if t == start][:2]
    user = tok.encode("user\n")
    if start is None or len(seen) < 2 or ids[seen[1] + 1:seen[1] + len(user)] != user[:-1]:
        raise Krea2Error(f"{tok.where}: the Krea 2 template did not tokenize as the Qwen chat format ('<|im_start|>' "
                         "is not a special token of this tokenizer?); use the Qwen tokenizer.")
    return seen[1] + 1 + len(user)


def build_prompt_ids(tok: QwenTokenizer, text: str, max_tokens: int = MAX_TOKENS, warn: bool = True) -> PromptIds:
    """Token ids of ``PREFIX + text`` (truncated to ``max_tokens - len(suffix)`` prompt tokens) + ``SUFFIX``.

    Tokenized together like the reference, so the prompt's first token may merge with the prefix's
    closing newline exactly as it did in training. Truncation logs a warning with the counts."""
    suffix = tok.encode(SUFFIX)
    budget = max_tokens - len(suffix)
    if budget < 0:
        raise ValueError(f"max_tokens {max_tokens} is below the {len(suffix)}-token assistant suffix")
    full = tok.encode(PREFIX + text)
    n = prefix_length(tok, full)
    total = len(full) - n
    kept = min(total, budget)
    if total > budget and warn:
        warn_truncated(total, max_tokens, len(suffix))
    return PromptIds(full[:n + kept] + suffix, n, kept, total)


def warn_truncated(total: int, max_tokens: int, suffix_len: int = 5) -> None:
    budget = max_tokens - suffix_len
    log.warning("Krea 2: the prompt is %d tokens; Krea 2 reads at most %d (%d minus the %d-token assistant "
                "suffix), so the last %d tokens are dropped.", total, budget, max_tokens, suffix_len, total - budget)


IM_START_ID, IM_END_ID, USER_ID, NEWLINE_ID = 151644, 151645, 872, 198  # Qwen's ids
SUFFIX_LEN = 5  # <|im_end|> \n <|im_start|> assistant \n


def templated_prompt_span(ids: list) -> tuple[int, int] | None:
    """``(start, end)`` of the prompt inside the token ids of the whole chat template (system turn, user turn
    with the prompt, assistant opening) as another tokenizer produced them, e.g. ComfyUI's own Krea 2
    tokenizer; ``None`` if ``ids`` do not have that shape. The prompt starts after ``<|im_start|>user\n`` (or
    after ``user`` where the newline merged with the prompt's first token, as :func:`prefix_length` counts it)
    and ends before the 5-token assistant suffix."""
    if len(ids) < 3 + SUFFIX_LEN or ids[-SUFFIX_LEN] != IM_END_ID or ids[-3] != IM_START_ID:
        return None
    starts = [i for i, v in enumerate(ids[:-SUFFIX_LEN]) if v == IM_START_ID]
    if len(starts) < 2 or ids[starts[1] + 1] != USER_ID:
        return None
    u = starts[1]
    start = u + 3 if ids[u + 2] == NEWLINE_ID else u + 2
    end = len(ids) - SUFFIX_LEN
    return (start, end) if start <= end else None
