"""grain pipeline: documents -> one flat token stream -> fixed-length windows -> batches.

Each split is one flat stream `[BOS] doc0 [EOS] [BOS] doc1 [EOS] ...` with a document index.
Window i is `stream[i*L : i*L + L + 1]` (inputs plus the shifted targets), so the same data can be
re-read at any context length L and the position in the data is a pure function of the index.
Documents shorter than L are packed with their neighbours; attention is *not* masked at document
boundaries (the model sees BOS/EOS and learns to reset), which is what the papers' pretraining does.

The grain iterator's state is small (the next index) and is checkpointed for exact resume.
Documents read on demand (prepared ArrayRecord shards) go through the same windowing
(`DocumentWindows`), which can also keep every window inside one document and drop short
documents (long-context evaluation). This module is the mechanics only; which source, tokenizer
and knobs a run uses is resolved once by `ttt_jax.data.dataset.Dataset`.
"""

from __future__ import annotations

import dataclasses

import grain
import numpy as np

from ttt_jax.config import ConfigError
from ttt_jax.data.tokenizers import Tokenizer


class NoDocuments(ConfigError):
  """A split without a single (non-empty) document."""


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
  names: list[str] = []

  def encoded():
    for name, text in documents:
      names.append(name)
      yield np.asarray(tokenizer.encode(text), np.int32)

  return build_stream_from_arrays(encoded(), names, tokenizer)


def build_stream_from_arrays(arrays, names, tokenizer: Tokenizer) -> TokenStream:
  """`[BOS] ids [EOS]` of already tokenized documents."""
  pieces, starts, offset = [], [], 0
  bos = np.array([tokenizer.bos_id], np.int32)
  eos = np.array([tokenizer.eos_id], np.int32)
  for ids in arrays:
    starts.append(offset)
    pieces += [bos, ids, eos]
    offset += len(ids) + 2
  if not pieces:
    raise NoDocuments("the data source produced no documents")
  return TokenStream(np.concatenate(pieces), np.asarray(starts, np.int64), tuple(names))


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


class DocumentWindows:
  """Random-access grain source of `seq_len + 1`-token windows over documents read on demand.

  `get_doc(d)` returns document d's ids (no BOS/EOS); `lengths[d]` its length. Only documents
  with at least `min_len` tokens are used. `pack=True`: windows tile the virtual flat stream
  `[BOS] doc [EOS] [BOS] doc [EOS] ...` exactly like `WindowSource`. `pack=False`: windows never
  cross a document; each `[BOS] doc [EOS]` gives `(len + 1) // seq_len` windows, tail dropped.
  """

  def __init__(self, lengths, get_doc, seq_len: int, bos_id: int, eos_id: int, *,
               pack: bool = True, min_len: int = 0, cache_docs: int = 4):
    self.seq_len, self.pack = seq_len, pack
    self.bos, self.eos = bos_id, eos_id
    self.get_doc = get_doc
    lengths = np.asarray(lengths, np.int64)
    self.docs = np.flatnonzero(lengths >= min_len)
    full = lengths[self.docs] + 2
    self.starts = np.concatenate([[0], np.cumsum(full)])  # offsets in the (virtual) stream
    if pack:
      self._len = max(0, int(self.starts[-1]) - 1) // seq_len
    else:
      per_doc = (full - 1) // seq_len
      self.first_window = np.concatenate([[0], np.cumsum(per_doc)])
      self._len = int(self.first_window[-1])
    if self._len == 0:
      raise ConfigError(f"no window of data.seq_len={seq_len} fits the data "
                        f"({len(self.docs)} documents with >= {min_len} tokens)")
    self._cache: dict[int, np.ndarray] = {}
    self._cache_size = cache_docs

  def __len__(self) -> int:
    return self._len

  def _full_doc(self, k: int) -> np.ndarray:
    """`[BOS] ids [EOS]` of the k-th used document (small LRU cache: long docs span windows)."""
    arr = self._cache.pop(k, None)
    if arr is None:
      ids = np.asarray(self.get_doc(int(self.docs[k])), np.int32)
      arr = np.concatenate([[self.bos], ids, [self.eos]]).astype(np.int32)
      while len(self._cache) >= self._cache_size:
        self._cache.pop(next(iter(self._cache)))
    self._cache[k] = arr
    return arr

  def _read(self, a: int, b: int) -> np.ndarray:
    k = int(np.searchsorted(self.starts, a, side="right")) - 1
    out = []
    while a < b:
      doc = self._full_doc(k)
      lo = a - int(self.starts[k])
      piece = doc[lo:lo + (b - a)]
      out.append(piece)
      a += len(piece)
      k += 1
    return np.concatenate(out)

  def __getitem__(self, i: int) -> dict[str, np.ndarray]:
    i, L = int(i), self.seq_len
    if self.pack:
      return {"tokens": self._read(i * L, i * L + L + 1)}
    k = int(np.searchsorted(self.first_window, i, side="right")) - 1
    start = int(self.starts[k]) + (i - int(self.first_window[k])) * L
    return {"tokens": self._read(start, start + L + 1)}

  def __getstate__(self):
    return {**self.__dict__, "_cache": {}}


def window_count(lengths, seq_len: int, *, pack: bool = True, min_len: int = 0) -> int:
  """Windows of `seq_len` (+1) tokens that documents of these lengths (no BOS/EOS) give; the
  count `WindowSource` / `DocumentWindows` produce."""
  lengths = np.asarray(lengths, np.int64)
  full = lengths[lengths >= min_len] + 2
  if pack:
    return max(0, int(full.sum()) - 1) // seq_len
  return int(((full - 1) // seq_len).sum())


def stack_windows(source, indices=None) -> np.ndarray:
  """Windows of a window source (`WindowSource`, `DocumentWindows`) as one int32 array
  [n, seq_len + 1], exactly what indexing the source gives; all of them unless `indices`."""
  indices = range(len(source)) if indices is None else indices
  rows = [source[int(i)]["tokens"] for i in indices]
  if not rows:
    return np.zeros((0, source.seq_len + 1), np.int32)
  return np.stack(rows).astype(np.int32)


def batched_windows(source, split: str, *, seed: int, shuffle: bool, batch_size: int,
                    process_index: int = 0, process_count: int = 1) -> grain.MapDataset:
  """A batched, infinitely repeated MapDataset of a window source's windows for this process.

  `batch_size` is the per-process batch. Processes read disjoint, interleaved windows.
  """
  ds = grain.MapDataset.source(source)
  if process_count > 1:
    ds = ds[process_index::process_count]
  if len(ds) < batch_size:
    raise ValueError(f"split {split!r} has {len(ds)} windows of data.seq_len={source.seq_len} "
                     f"per process, fewer than the batch size {batch_size}")
  if shuffle:  # a fresh permutation every epoch: each window once per epoch
    ds = ds.shuffle(seed=seed)
  ds = ds.repeat(None, reseed_each_epoch=True)
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
