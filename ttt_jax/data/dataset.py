"""The data of a run, resolved once from `config.data`: source, tokenizer, splits, windowing.

`Dataset.from_config(config.data)` decides what `data.source` is (`sources.source_kind`), opens
a prepared folder (its metadata, and its own tokenizer checked against `data.tokenizer`) or loads
the tokenizer `data.tokenizer` names, and keeps the knobs that say how documents become windows
(`data.pack_docs`, `data.min_doc_len`). Every entry point receives this one object: training
(`workdir.check_run` builds it, the `Trainer` reads its windows), evaluation, generation and TLM
(`runs.load_run` puts it in the `Run`). Nothing else looks at the data config again.
Evaluation on other text (`--data`) swaps only the source: `Dataset.with_source`.

Token streams of raw sources are tokenized on first use and cached per process (a few streams),
so the start-up check (`check_splits`) and the run that follows read the same arrays.
"""

from __future__ import annotations

import dataclasses
import functools
import os
import sys
from collections.abc import Callable

import grain
import ml_collections
import numpy as np

from ttt_jax.config import BYTE_VOCAB, ConfigError
from ttt_jax.data import pipeline, sources
from ttt_jax.data.pipeline import TokenStream
from ttt_jax.data.prepared import PreparedData, check_tokenizer
from ttt_jax.data.tokenizers import Tokenizer, get_tokenizer

ALL = "all"  # the split of every document (no train/validation filter): evaluation on any text


@dataclasses.dataclass(frozen=True, eq=False)
class Dataset:
  """A resolved data config (see the module docstring); build it with `from_config`."""

  source: str  # data.source as given
  kind: str  # 'embedded' | 'folder' | 'jsonl' | 'tfds' | 'prepared'
  tokenizer: Tokenizer
  val_fraction: float = 0.05
  text_field: str = "text"
  tfds_data_dir: str = ""
  pack_docs: bool = True
  min_doc_len: int = 0
  prepared: PreparedData | None = None  # the opened folder when kind == 'prepared'
  flag: str = "data.source"  # the option the source came from, named in error messages
  unavailable: str = ""  # why the source cannot be read (a run opened without its data folder)

  @classmethod
  def from_config(cls, data_cfg: ml_collections.ConfigDict,
                  saved_tokenizer: Callable[[], Tokenizer | None] | None = None) -> Dataset:
    """Resolves `data.source` and `data.tokenizer` (one-line ConfigError if either is wrong).

    `saved_tokenizer` reads a run's own copy of the tokenizer it trained with (a run opened
    read-only; None when it has none); it is called only where they cannot be resolved: the
    tokenizer is then the copy, and a source that cannot be opened (e.g. a data folder moved
    away) fails in one line only when its documents are read, saying that --data chooses other
    data.
    """
    knobs = {"val_fraction": data_cfg.val_fraction,
             "text_field": data_cfg.get("text_field", "text"),
             "tfds_data_dir": data_cfg.get("tfds_data_dir", ""),
             "pack_docs": data_cfg.get("pack_docs", True),
             "min_doc_len": data_cfg.get("min_doc_len", 0)}
    source = data_cfg.source
    try:
      kind = sources.source_kind(source)
      prepared = PreparedData(source) if kind == "prepared" else None
    except ConfigError as e:
      copy = saved_tokenizer() if saved_tokenizer else None
      if copy is None:
        raise
      gone = not source.startswith("tfds:") and not os.path.exists(os.path.expanduser(source))
      return cls(source, "unavailable", copy, unavailable=(
          f"data.source={source!r}, the data this run trained on, cannot be read "
          f"({'no such file or folder' if gone else e}); --data chooses other data "
          "(e.g. --data embedded)"), **knobs)
    try:
      spec = data_cfg.tokenizer if prepared is None else check_tokenizer(prepared,
                                                                          data_cfg.tokenizer)
      tokenizer = get_tokenizer(spec)
    except ConfigError:
      tokenizer = saved_tokenizer() if saved_tokenizer else None
      if tokenizer is None:
        raise
    return cls(source, kind, tokenizer, prepared=prepared, **knobs)

  def with_source(self, source: str, flag: str = "--data") -> Dataset:
    """The same tokenizer and knobs reading `source` instead: evaluation on any text.

    Raw text is tokenized with this run's tokenizer, as a model can only score its own ids. A
    prepared folder holds ids already, so it must have been prepared with the very same
    tokenizer (compared by fingerprint: a run trained on prepared data uses the folder's
    tokenizer whatever `data.tokenizer` says).
    """
    kind = sources.source_kind(source, flag)
    prepared = None
    if kind == "prepared":
      prepared = PreparedData(source)
      theirs = prepared.meta["tokenizer"]
      if theirs["fingerprint"] != self.tokenizer.fingerprint():
        raise ConfigError(f"{flag} {source!r} was prepared with the tokenizer {theirs['name']!r}, "
                          f"not the run's {self.tokenizer.name!r}; give the raw text instead "
                          "(it is tokenized with the run's tokenizer)")
    return dataclasses.replace(self, source=source, kind=kind, prepared=prepared, flag=flag,
                               unavailable="")

  @property
  def vocab_size(self) -> int:
    return self.tokenizer.vocab_size

  def sync_vocab(self, config: ml_collections.ConfigDict) -> None:
    """Sets `model.vocab_size` from the tokenizer (an explicit different value is an error)."""
    v = config.model.vocab_size
    if v != self.vocab_size:
      if v != BYTE_VOCAB:
        raise ConfigError(f"model.vocab_size={v} does not match data.tokenizer="
                          f"{self.tokenizer.name!r} (vocab {self.vocab_size}); leave "
                          "model.vocab_size unset")
      config.model.vocab_size = self.vocab_size

  # -- documents ---------------------------------------------------------------------------------
  def _check_available(self) -> None:
    if self.unavailable:
      raise ConfigError(self.unavailable)

  def stream(self, split: str) -> TokenStream:
    """The flat token stream `[BOS] doc [EOS] ...` of one split, or of every document with
    split 'all' (cached per process)."""
    self._check_available()
    try:
      if self.prepared is not None:
        return _prepared_stream(self.prepared, self.tokenizer, split)
      return _raw_stream(self.source, self.kind, self.tokenizer, None if split == ALL else split,
                         self.val_fraction, self.text_field, self.tfds_data_dir)
    except pipeline.NoDocuments:
      raise ConfigError(self.empty_split_message(split)) from None

  def doc_lengths(self, split: str) -> np.ndarray:
    """Token counts (no BOS/EOS) of the split's documents; ConfigError if it has none."""
    self._check_available()
    if self.prepared is not None:
      lengths = np.concatenate([self.prepared.split(s).lengths for s in _parts(split)])
      if not len(lengths):
        raise ConfigError(self.empty_split_message(split))
      return lengths
    return self.stream(split).doc_lengths - 2

  def empty_split_message(self, split: str) -> str:
    """Why a split has no documents, naming the knob that changes it."""
    source, val_fraction = self.source, self.val_fraction
    folder = " (a folder is read for .txt/.md/.py/.rst files below it)" if self.kind == "folder" \
        else ""
    if self.flag != "data.source":
      which = "non-empty" if split == ALL else split
      return (f"{self.flag} {source!r} has no {which} documents"
              f"{folder if split == ALL else f'; --split {ALL} reads every document'}")
    if self.prepared is not None:
      meta = self.prepared.meta
      return (f"prepared data {source!r} has 0 {split} documents (prepared with --val_fraction="
              f"{meta.get('val_fraction')}); prepare it again with scripts/prepare_data.py "
              f"--force and a {'larger' if split == 'validation' else 'smaller'} --val_fraction")
    if self.kind == "tfds" and sources.parse_tfds(source)[1] is None:
      return f"data.source={source!r}: the dataset's {split} split has no non-empty documents"
    if split == "validation":
      hint = (f"raise data.val_fraction, e.g. --config.data.val_fraction="
              f"{max(2 * val_fraction, 0.05):g}" if val_fraction < 0.25
              else "add documents to data.source")
      return (f"data.source={source!r} has no validation documents at data.val_fraction="
              f"{val_fraction} (documents are assigned by a hash of their name); {hint}")
    if val_fraction >= 1:
      return (f"data.val_fraction={val_fraction} puts every document of data.source={source!r} "
              "in the validation split; use a fraction below 1, e.g. 0.05")
    what = folder or (" (every line's data.text_field is empty)" if self.kind == "jsonl" else "")
    return f"data.source={source!r} has no non-empty documents for the train split{what}"

  # -- windows -----------------------------------------------------------------------------------
  def window_source(self, split: str, seq_len: int, *, pack: bool | None = None,
                    min_len: int | None = None):
    """The grain source of `seq_len` (+1) token windows of one split (`pipeline`'s windowing;
    `pack` / `min_len` default to data.pack_docs / data.min_doc_len)."""
    self._check_available()
    pack = self.pack_docs if pack is None else pack
    min_len = self.min_doc_len if min_len is None else min_len
    tok = self.tokenizer
    if self.prepared is not None:
      part = self.prepared.split(split)
      return pipeline.DocumentWindows(part.lengths, part.__getitem__, seq_len, tok.bos_id,
                                      tok.eos_id, pack=pack, min_len=min_len)
    stream = self.stream(split)
    if pack and min_len == 0:
      return pipeline.WindowSource(stream.tokens, seq_len)
    starts, lengths = stream.doc_starts, stream.doc_lengths - 2
    return pipeline.DocumentWindows(
        lengths, lambda d: stream.tokens[starts[d] + 1:starts[d] + 1 + lengths[d]], seq_len,
        tok.bos_id, tok.eos_id, pack=pack, min_len=min_len)

  def windows(self, split: str, seq_len: int, *, seed: int, shuffle: bool, batch_size: int,
              process_index: int = 0, process_count: int = 1) -> grain.MapDataset:
    """Batched, infinitely repeated windows of one split for this process (`batch_size` per
    process; processes read disjoint, interleaved windows)."""
    return pipeline.batched_windows(self.window_source(split, seq_len), split, seed=seed,
                                    shuffle=shuffle, batch_size=batch_size,
                                    process_index=process_index, process_count=process_count)

  def samples(self, split: str, seq_len: int) -> np.ndarray:
    """Every packed window of `seq_len` (+1) tokens of a split, in order: int32
    [S, seq_len + 1] (S = 0 when the split is shorter than one window)."""
    if not pipeline.window_count(self.doc_lengths(split), seq_len):
      return np.zeros((0, seq_len + 1), np.int32)
    return pipeline.stack_windows(self.window_source(split, seq_len, pack=True, min_len=0))

  def check_splits(self, seq_len: int, batch_size: int, process_count: int = 1) -> dict[str, int]:
    """Start-up check that the train and validation splits each fill one batch of windows.

    `batch_size` is the global batch. Raises ConfigError naming the knob to change (data.source,
    data.val_fraction, data.seq_len, data.min_doc_len, data.pack_docs, data.batch_size); returns
    the number of windows per split (per process).
    """
    if batch_size % process_count:
      raise ConfigError(f"data.batch_size={batch_size} must be divisible by the process count "
                        f"{process_count}")
    if self.prepared is not None:
      self.prepared.check()  # a folder damaged since it was prepared: named here, in one line
    local, out = batch_size // process_count, {}
    pack, min_len = self.pack_docs, self.min_doc_len
    all_lengths = {s: self.doc_lengths(s) for s in sources.SPLITS}  # an empty split fails first
    for split, lengths in all_lengths.items():
      n = pipeline.window_count(lengths, seq_len, pack=pack, min_len=min_len) // process_count
      out[split] = n
      if n < local:
        why = self._too_few_windows(split, lengths, n, seq_len, batch_size, process_count)
        raise ConfigError(f"data.source={self.source!r}: {why}")
    return out

  def _too_few_windows(self, split, lengths, n, seq_len, batch_size, process_count) -> str:
    """The reason (and the knob) when a split gives fewer windows than one batch."""
    local = batch_size // process_count
    more = ""
    if split == "validation":
      more = (" or prepare the data again with a larger --val_fraction"
              if self.prepared is not None else f" or raise data.val_fraction={self.val_fraction}")
    used = lengths[lengths >= self.min_doc_len]
    longest = int(lengths.max())
    if not len(used):
      return (f"no {split} document has >= data.min_doc_len={self.min_doc_len} tokens (longest: "
              f"{longest}); lower data.min_doc_len")
    if n == 0 and self.pack_docs:
      return (f"data.seq_len={seq_len} is longer than the whole {split} split ({int(used.sum())} "
              f"tokens in {len(used)} document{'s' * (len(used) != 1)}); lower "
              f"data.seq_len{more}")
    if n == 0:
      return (f"no {split} document fills one window of data.seq_len={seq_len} with "
              f"data.pack_docs=False (longest: {longest} tokens); lower data.seq_len or set "
              "data.pack_docs=True")
    per = " per process" if process_count > 1 else ""
    return (f"the {split} split gives {n} windows of data.seq_len={seq_len}{per}, fewer than "
            f"data.batch_size={batch_size}{f' ({local}{per})' if per else ''}; lower "
            f"data.batch_size or data.seq_len{more}")


@functools.lru_cache(maxsize=8)
def _raw_stream(source: str, kind: str, tokenizer: Tokenizer, split: str, val_fraction: float,
                text_field: str, tfds_data_dir: str) -> TokenStream:
  """A raw source's split, tokenized (cached by what the data config resolved to). Documents
  that are not valid UTF-8 (binary files named like text) are read with U+FFFD in place of the
  bad bytes, and one warning on stderr counts them."""
  stats = sources.DecodeStats()
  docs = sources.get_documents(source, split, val_fraction, text_field=text_field,
                               tfds_data_dir=tfds_data_dir, kind=kind, stats=stats)
  stream = pipeline.build_stream(docs, tokenizer)
  if stats.bad_docs:
    part = "" if split is None else f" ({split} split)"
    print(f"warning: data.source={source!r}: {stats.bad_docs} of {len(stream.doc_lengths)} "
          f"documents{part} are not valid UTF-8 ({stats.bad_bytes:,} bytes replaced by U+FFFD): "
          "binary files?", file=sys.stderr)
  return stream


@functools.lru_cache(maxsize=8)
def _prepared_stream(data: PreparedData, tokenizer: Tokenizer, split: str) -> TokenStream:
  """A prepared split (or 'all': train then validation) read from its shards into one stream
  (cached per opened folder)."""
  parts = [data.split(s) for s in _parts(split)]
  return pipeline.build_stream_from_arrays((p[i] for p in parts for i in range(len(p))),
                                           [n for p in parts for n in p.names], tokenizer)


def _parts(split: str) -> tuple[str, ...]:
  """The splits that make up `split` ('all' is every one)."""
  return sources.SPLITS if split == ALL else (split,)
