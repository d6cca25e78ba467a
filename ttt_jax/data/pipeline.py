"""grain pipeline: documents -> one flat token stream -> fixed-length windows -> batches.

Each split is one flat stream `[BOS] doc0 [EOS] [BOS] doc1 [EOS] ...` with a document index.
Window i is `stream[i*L : i*L + L + 1]` (inputs plus the shifted targets), so the same data can be
re-read at any context length L and the position in the data is a pure function of the index.
Documents shorter than L are packed with their neighbours; attention is *not* masked at document
boundaries (the model sees BOS/EOS and learns to reset), which is what the papers' pretraining does.

The grain iterator's state is small (the next index) and is checkpointed for exact resume.
Prepared folders (`ttt_jax.data.prepare`) are read document by document from ArrayRecord shards
through the same windowing (`DocumentWindows`); `data.pack_docs=False` keeps every window inside
one document and `data.min_doc_len` drops shorter documents (long-context evaluation).
"""

from __future__ import annotations

import dataclasses
import functools

import grain
import numpy as np

from ttt_jax.config import BYTE_VOCAB, ConfigError
from ttt_jax.data import prepare, sources
from ttt_jax.data.tokenizers import Tokenizer, get_tokenizer


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


@functools.lru_cache(maxsize=8)
def load_stream(source: str, tokenizer: str, split: str, val_fraction: float, *,
                text_field: str = "text", tfds_data_dir: str = "") -> TokenStream:
  """The token stream of one split (cached per process). Prepared folders are read from shards."""
  try:
    if sources.source_kind(source) == "prepared":
      data = prepare.PreparedData(source)
      tok = get_tokenizer(prepare.check_tokenizer(data, tokenizer))
      part = data.split(split)
      return build_stream_from_arrays((part[i] for i in range(len(part))), part.names, tok)
    docs = sources.get_documents(source, split, val_fraction, text_field=text_field,
                                 tfds_data_dir=tfds_data_dir)
    return build_stream(docs, get_tokenizer(tokenizer))
  except NoDocuments:
    raise ConfigError(empty_split_message(source, split, val_fraction)) from None


def split_stream(data_cfg, split: str) -> TokenStream:
  """`load_stream` for a data config (passes the TFDS / jsonl options along)."""
  return load_stream(data_cfg.source, data_cfg.tokenizer, split, data_cfg.val_fraction,
                     text_field=data_cfg.get("text_field", "text"),
                     tfds_data_dir=data_cfg.get("tfds_data_dir", ""))


def empty_split_message(source: str, split: str, val_fraction: float) -> str:
  """Why a split of `source` has no documents, naming the knob that changes it."""
  kind = sources.source_kind(source)
  if kind == "prepared":
    meta = prepare.PreparedData(source).meta
    return (f"prepared data {source!r} has 0 {split} documents (prepared with --val_fraction="
            f"{meta.get('val_fraction')}); prepare it again with scripts/prepare_data.py "
            f"--force and a {'larger' if split == 'validation' else 'smaller'} --val_fraction")
  if kind == "tfds" and sources.parse_tfds(source)[1] is None:
    return f"data.source={source!r}: the dataset's {split} split has no non-empty documents"
  if split == "validation":
    return (f"data.source={source!r} has no validation documents at data.val_fraction="
            f"{val_fraction} (documents are assigned by a hash of their name); raise "
            "data.val_fraction, e.g. --config.data.val_fraction=0.05")
  if val_fraction >= 1:
    return (f"data.val_fraction={val_fraction} puts every document of data.source={source!r} in "
            "the validation split; use a fraction below 1, e.g. 0.05")
  what = {"folder": " (a folder is read for .txt/.md/.py/.rst files below it)",
          "jsonl": " (every line's data.text_field is empty)"}.get(kind, "")
  return f"data.source={source!r} has no non-empty documents for the train split{what}"


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


def data_tokenizer(data_cfg) -> Tokenizer:
  """The tokenizer a data config reads with (a prepared folder brings its own)."""
  if sources.source_kind(data_cfg.source) == "prepared":
    return get_tokenizer(prepare.check_tokenizer(prepare.PreparedData(data_cfg.source),
                                                 data_cfg.tokenizer))
  return get_tokenizer(data_cfg.tokenizer)


def sync_vocab(config) -> None:
  """Sets `model.vocab_size` from the data tokenizer (an explicit different value is an error)."""
  tok = data_tokenizer(config.data)
  v = config.model.vocab_size
  if v != tok.vocab_size:
    if v != BYTE_VOCAB:
      raise ConfigError(f"model.vocab_size={v} does not match data.tokenizer={tok.name!r} "
                        f"(vocab {tok.vocab_size}); leave model.vocab_size unset")
    config.model.vocab_size = tok.vocab_size


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
      raise ValueError(f"no window of data.seq_len={seq_len} fits the data "
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


def window_source(data_cfg, split: str):
  """The grain source of `data_cfg.seq_len` windows of one split, for any data source."""
  seq_len = data_cfg.seq_len
  pack, min_len = data_cfg.get("pack_docs", True), data_cfg.get("min_doc_len", 0)
  if sources.source_kind(data_cfg.source) == "prepared":
    data = prepare.PreparedData(data_cfg.source)
    tok = get_tokenizer(prepare.check_tokenizer(data, data_cfg.tokenizer))
    part = data.split(split)
    return DocumentWindows(part.lengths, part.__getitem__, seq_len, tok.bos_id, tok.eos_id,
                           pack=pack, min_len=min_len)
  stream = split_stream(data_cfg, split)
  if pack and min_len == 0:
    return WindowSource(stream.tokens, seq_len)
  tok = get_tokenizer(data_cfg.tokenizer)
  starts, lengths = stream.doc_starts, stream.doc_lengths - 2
  return DocumentWindows(lengths, lambda d: stream.tokens[starts[d] + 1:starts[d] + 1 +
                                                          lengths[d]],
                         seq_len, tok.bos_id, tok.eos_id, pack=pack, min_len=min_len)


def window_count(lengths, seq_len: int, *, pack: bool = True, min_len: int = 0) -> int:
  """Windows of `seq_len` (+1) tokens that documents of these lengths (no BOS/EOS) give; the
  count `WindowSource` / `DocumentWindows` produce."""
  lengths = np.asarray(lengths, np.int64)
  full = lengths[lengths >= min_len] + 2
  if pack:
    return max(0, int(full.sum()) - 1) // seq_len
  return int(((full - 1) // seq_len).sum())


def split_doc_lengths(data_cfg, split: str) -> np.ndarray:
  """Token counts (no BOS/EOS) of the split's documents; ConfigError if it has none."""
  if sources.source_kind(data_cfg.source) == "prepared":
    lengths = prepare.PreparedData(data_cfg.source).split(split).lengths
    if not len(lengths):
      raise ConfigError(empty_split_message(data_cfg.source, split, data_cfg.val_fraction))
    return lengths
  return split_stream(data_cfg, split).doc_lengths - 2


def check_splits(data_cfg, batch_size: int, process_count: int = 1) -> dict[str, int]:
  """Start-up check that the train and validation splits each fill one batch of windows.

  `batch_size` is the global batch. Raises ConfigError naming the knob to change (data.source,
  data.val_fraction, data.seq_len, data.min_doc_len, data.pack_docs, data.batch_size); returns
  the number of windows per split (per process).
  """
  if batch_size % process_count:
    raise ConfigError(f"data.batch_size={batch_size} must be divisible by the process count "
                      f"{process_count}")
  local, out = batch_size // process_count, {}
  seq_len, pack = data_cfg.seq_len, data_cfg.get("pack_docs", True)
  min_len = data_cfg.get("min_doc_len", 0)
  prepared = sources.source_kind(data_cfg.source) == "prepared"
  all_lengths = {s: split_doc_lengths(data_cfg, s) for s in sources.SPLITS}  # empty split first
  for split, lengths in all_lengths.items():
    n = window_count(lengths, seq_len, pack=pack, min_len=min_len) // process_count
    out[split] = n
    if n >= local:
      continue
    more = ""
    if split == "validation":
      more = (" or prepare the data again with a larger --val_fraction" if prepared else
              f" or raise data.val_fraction={data_cfg.val_fraction}")
    used = lengths[lengths >= min_len]
    longest = int(lengths.max())
    if not len(used):
      msg = (f"no {split} document has >= data.min_doc_len={min_len} tokens (longest: "
             f"{longest}); lower data.min_doc_len")
    elif n == 0 and pack:
      msg = (f"data.seq_len={seq_len} is longer than the whole {split} split ({int(used.sum())} "
             f"tokens in {len(used)} document{'s' * (len(used) != 1)}); lower data.seq_len{more}")
    elif n == 0:
      msg = (f"no {split} document fills one window of data.seq_len={seq_len} with "
             f"data.pack_docs=False (longest: {longest} tokens); lower data.seq_len or set "
             "data.pack_docs=True")
    else:
      per = " per process" if process_count > 1 else ""
      msg = (f"the {split} split gives {n} windows of data.seq_len={seq_len}{per}, fewer than "
             f"data.batch_size={batch_size}{f' ({local}{per})' if per else ''}; lower "
             f"data.batch_size or data.seq_len{more}")
    raise ConfigError(f"data.source={data_cfg.source!r}: {msg}")
  return out


def windows_dataset(data_cfg, split: str, *, seed: int, shuffle: bool, batch_size: int,
                    process_index: int = 0, process_count: int = 1) -> grain.MapDataset:
  """A batched, infinitely repeated MapDataset of windows for this process.

  `batch_size` is the per-process batch. Processes read disjoint, interleaved windows.
  """
  ds = grain.MapDataset.source(window_source(data_cfg, split))
  if process_count > 1:
    ds = ds[process_index::process_count]
  if len(ds) < batch_size:
    raise ValueError(f"split {split!r} has {len(ds)} windows of data.seq_len={data_cfg.seq_len} "
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
