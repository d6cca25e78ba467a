"""grain pipeline: documents -> one flat token stream -> fixed-length windows -> batches.

Each split is one flat stream `[BOS] doc0 [EOS] [BOS] doc1 [EOS] ...` with a document index.
Window i is `stream[i*L : i*L + L + 1]` (inputs plus the shifted targets), so the same data can be
re-read at any context length L and the position in the data is a pure function of the index.
Documents shorter than L are packed with their neighbours; attention is *not* masked at document
boundaries (the model sees BOS/EOS and learns to reset), which is what the papers' pretraining does.

The grain iterator's state is small (the next index) and is checkpointed for exact resume.
"""

from __future__ import annotations

import dataclasses
import functools

import grain
import numpy as np

from ttt_jax.data.sources import get_documents
from ttt_jax.data.tokenizers import Tokenizer, get_tokenizer


@dataclasses.dataclass(frozen=True)
class TokenStream:
  tokens: np.ndarray  # int32 [N]
  doc_starts: np.ndarray  # int64 [num_docs] offset of each document's BOS
  names: tuple[str, ...]

  @property
  def doc_lengths(self) -> np.ndarray:
    ends = np.append(self.doc_starts[1:], len(self.tokens))
    return ends - self.doc_starts


def build_stream(documents, tokenizer: Tokenizer) -> TokenStream:
  """Concatenates `[BOS] tokens [EOS]` of every (name, text) document."""
  pieces, starts, names, offset = [], [], [], 0
  bos = np.array([tokenizer.bos_id], np.int32)
  eos = np.array([tokenizer.eos_id], np.int32)
  for name, text in documents:
    ids = np.asarray(tokenizer.encode(text), np.int32)
    starts.append(offset)
    names.append(name)
    pieces += [bos, ids, eos]
    offset += len(ids) + 2
  if not pieces:
    raise ValueError("the data source produced no documents")
  return TokenStream(np.concatenate(pieces), np.asarray(starts, np.int64), tuple(names))


@functools.lru_cache(maxsize=8)
def load_stream(source: str, tokenizer: str, split: str, val_fraction: float) -> TokenStream:
  """The token stream of one split (cached per process)."""
  return build_stream(get_documents(source, split, val_fraction), get_tokenizer(tokenizer))


class WindowSource:
  """Random-access grain source: window i = tokens [i*L, i*L + L + 1)."""

  def __init__(self, tokens: np.ndarray, seq_len: int):
    if len(tokens) < seq_len + 1:
      raise ValueError(f"data.seq_len={seq_len} is longer than the whole split "
                       f"({len(tokens)} tokens)")
    self.tokens = tokens
    self.seq_len = seq_len
    self._len = (len(tokens) - 1) // seq_len

  def __len__(self) -> int:
    return self._len

  def __getitem__(self, i: int) -> dict[str, np.ndarray]:
    start = int(i) * self.seq_len
    return {"tokens": self.tokens[start:start + self.seq_len + 1]}


def windows_dataset(data_cfg, split: str, *, seed: int, shuffle: bool, batch_size: int,
                    process_index: int = 0, process_count: int = 1) -> grain.MapDataset:
  """A batched, infinitely repeated MapDataset of windows for this process.

  `batch_size` is the per-process batch. Processes read disjoint, interleaved windows.
  """
  stream = load_stream(data_cfg.source, data_cfg.tokenizer, split, data_cfg.val_fraction)
  ds = grain.MapDataset.source(WindowSource(stream.tokens, data_cfg.seq_len))
  if process_count > 1:
    ds = ds[process_index::process_count]
  if len(ds) < batch_size:
    raise ValueError(f"split {split!r} has {len(ds)} windows of data.seq_len={data_cfg.seq_len} "
                     f"per process, fewer than the batch size {batch_size}")
  ds = ds.repeat(None)
  if shuffle:
    ds = ds.shuffle(seed=seed)
  return ds.batch(batch_size, drop_remainder=True)


def make_iterator(ds: grain.MapDataset, prefetch: int = 2) -> grain.DatasetIterator:
  """A checkpointable iterator (`get_state()` / `set_state()`) with background prefetch."""
  read = grain.ReadOptions(num_threads=1 if prefetch else 0, prefetch_buffer_size=prefetch)
  return iter(ds.to_iter_dataset(read))


def unigram_entropy(tokens: np.ndarray, vocab_size: int) -> float:
  """Entropy (nats/token) of the empirical unigram distribution: the no-context baseline."""
  counts = np.bincount(tokens, minlength=vocab_size).astype(np.float64)
  p = counts[counts > 0] / counts.sum()
  return float(-(p * np.log(p)).sum())
