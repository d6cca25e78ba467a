"""Tokenizers behind one interface: encode / decode / vocab_size / bos_id / eos_id / pad_id."""

from __future__ import annotations

from typing import Protocol

import numpy as np


class Tokenizer(Protocol):
  vocab_size: int
  bos_id: int
  eos_id: int
  pad_id: int

  def encode(self, text: str) -> np.ndarray: ...

  def decode(self, ids) -> str: ...


class ByteTokenizer:
  """UTF-8 bytes (ids 0-255) plus BOS=256, EOS=257, PAD=258."""

  vocab_size = 259
  bos_id, eos_id, pad_id = 256, 257, 258
  name = "bytes"

  def encode(self, text: str | bytes) -> np.ndarray:
    data = text if isinstance(text, bytes) else text.encode("utf-8", errors="replace")
    return np.frombuffer(data, dtype=np.uint8).astype(np.int32)

  def decode(self, ids) -> str:
    ids = np.asarray(ids)
    return bytes(ids[ids < 256].astype(np.uint8).tolist()).decode("utf-8", errors="replace")


def get_tokenizer(spec: str) -> Tokenizer:
  """`bytes` (default). Subword tokenizers are added behind the same interface."""
  if spec == "bytes":
    return ByteTokenizer()
  raise ValueError(f"data.tokenizer={spec!r} unknown; allowed: bytes")
