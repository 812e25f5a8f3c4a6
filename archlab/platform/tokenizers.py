"""Tokenizers for token shards: a byte-level tokenizer (vocab 256) and a BPE tokenizer
trained locally with Hugging Face `tokenizers`.

A token dataset records its tokenizer in every shard's metadata (`ShardMeta.tokenizer`):
- `"byte"`: UTF-8 bytes, ids 0..255. Id 0 (NUL) never occurs in UTF-8 text, so it is the
  document separator that packing puts between documents.
- `"bpe:tokenizer.json"`: a byte-level BPE saved as `tokenizer.json` in the dataset folder
  (the path is relative to the dataset root, so the folder can move). Id 0 is the special
  token `<|sep|>`, the document separator, so both tokenizers agree on `sep_id == 0`.

`load_tokenizer(spec, root)` turns such a record back into a tokenizer.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Iterable

import numpy as np

from archlab.platform.shards import DataError

SEP_TOKEN = "<|sep|>"
SEP_ID = 0  # both tokenizers: the separator packing inserts between documents
BPE_FILE = "tokenizer.json"


class ByteTokenizer:
    """UTF-8 bytes as token ids (vocab 256)."""

    vocab_size = 256
    sep_id = SEP_ID
    spec = "byte"

    def encode(self, text: str) -> np.ndarray:
        return np.frombuffer(text.encode("utf-8"), dtype=np.uint8).copy()

    def encode_batch(self, texts: list[str]) -> list[np.ndarray]:
        return [self.encode(t) for t in texts]

    def decode(self, ids) -> str:
        # errors="replace": a window cut mid-character still decodes for display.
        return bytes(np.asarray(ids, dtype=np.uint8).tolist()).decode("utf-8", errors="replace")


class BPETokenizer:
    """A byte-level BPE (Hugging Face `tokenizers`), loaded from a tokenizer.json."""

    sep_id = SEP_ID

    def __init__(self, path: str | os.PathLike, spec: str | None = None):
        from tokenizers import Tokenizer

        self.path = Path(path)
        if not self.path.exists():
            raise DataError(f"{self.path}: BPE tokenizer file not found")
        self._tok = Tokenizer.from_file(str(self.path))
        self.vocab_size = self._tok.get_vocab_size()
        self.spec = spec or f"bpe:{self.path.name}"
        found = self._tok.token_to_id(SEP_TOKEN)
        if found != SEP_ID:
            raise DataError(f"{self.path}: separator {SEP_TOKEN!r} expected at id {SEP_ID}, found {found}")

    def encode(self, text: str) -> np.ndarray:
        return np.asarray(self._tok.encode(text).ids, dtype=np.int64)

    def encode_batch(self, texts: list[str]) -> list[np.ndarray]:
        return [np.asarray(e.ids, dtype=np.int64) for e in self._tok.encode_batch(texts)]

    def decode(self, ids) -> str:
        return self._tok.decode([int(i) for i in ids], skip_special_tokens=False)


def train_bpe(texts: Iterable[str], vocab_size: int, out_path: str | os.PathLike) -> BPETokenizer:
    """Train a byte-level BPE on `texts` and save it to `out_path` (tokenizer.json).

    Byte-level pre-tokenisation with the full 256-byte alphabet means any text encodes
    without unknown tokens; decoding gives the text back exactly."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    if vocab_size < 257 + 1:
        raise DataError(f"--vocab-size for BPE: expected > 257 (256 bytes + {SEP_TOKEN}), found {vocab_size}")
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=[SEP_TOKEN],  # first special token gets id 0
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(texts, trainer=trainer)
    out_path = Path(out_path)
    out_path.parent.mkdir(parents=True, exist_ok=True)
    tmp = out_path.with_name(f".{out_path.name}.tmp")
    tok.save(str(tmp))
    os.replace(tmp, out_path)  # atomic, like the shards
    return BPETokenizer(out_path)


def load_tokenizer(spec: str, root: str | os.PathLike | None = None):
    """The tokenizer a shard's metadata names: "byte" or "bpe:<path relative to root>"."""
    if spec == "byte":
        return ByteTokenizer()
    if spec.startswith("bpe:"):
        rel = spec[len("bpe:"):]
        path = Path(rel) if root is None else Path(root) / rel
        return BPETokenizer(path, spec=spec)
    raise DataError(f"tokenizer: expected 'byte' or 'bpe:<file>', found {spec!r}")
