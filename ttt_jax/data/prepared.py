"""Prepared data read back: a folder `prepare.prepare()` wrote, checked before a run uses it.

A prepared folder holds, per split (`train`, `validation`):
  {split}-SSSSS-of-NNNNN.array_record   one record per document: its token ids (no BOS/EOS), as
                                        little-endian uint16 (vocab <= 65536) or int32
  {split}.lengths.npy                   document lengths in record order (the document index)
  {split}.names.txt                     document names, one JSON string per line
plus `tokenizer/` and `metadata.json` (data/prepare.py writes them). Documents are dealt
round-robin to the shards; record order is shard-major.

A folder damaged after it was prepared (a file deleted, emptied, truncated or overwritten,
metadata.json or a lengths file that does not parse) is named in one line (`ConfigError`:
which file, what is wrong, prepare it again with --force). Opening checks metadata.json and, per
split, the lengths file and that every file exists; `PreparedData.check()` (the training
start-up check, `Dataset.check_splits`) also opens every shard, compares its record count with
the lengths and reads its first and last record. A record damaged in the middle of a shard,
which only reading every byte would find, fails in the same one line when it is read.
"""

from __future__ import annotations

import json
import os

import grain
import numpy as np

from ttt_jax.config import ConfigError
from ttt_jax.data.tokenizers import Tokenizer, get_tokenizer

FORMAT_VERSION = 1
METADATA = "metadata.json"


def _damaged(root: str, what: str, err: BaseException | None = None) -> ConfigError:
  why = ""
  if err is not None:
    why = f" ({(str(err).strip().splitlines() or [type(err).__name__])[0][:200]})"
  return ConfigError(f"prepared data {root!r} is damaged: {what}{why}; prepare it again with "
                     "scripts/prepare_data.py --force")


def _shard_sizes(shards: list[str], documents: int) -> list[int]:
  """Records per shard: documents are dealt round-robin to the NNNNN shards of the name."""
  if not shards:
    return []
  total = int(shards[0].rsplit("-of-", 1)[1].split(".")[0])
  return [len(range(s, documents, total)) for s in range(len(shards))]


class PreparedSplit:
  """Random access to the documents of one prepared split (token arrays without BOS/EOS)."""

  def __init__(self, root: str, split: str, meta: dict):
    info = meta["splits"].get(split)
    if info is None:
      raise ConfigError(f"prepared data {root!r} has no split {split!r}")
    self.root, self.split = root, split
    self.dtype = np.dtype(meta["dtype"])
    self.lengths = self._load_lengths(info["documents"])
    self._paths = [os.path.join(root, s) for s in info["shards"]]
    for path in [*self._paths, os.path.join(root, f"{split}.names.txt")]:
      if not os.path.isfile(path):
        raise _damaged(root, f"{os.path.basename(path)} is missing")
    self.shard_sizes = _shard_sizes(info["shards"], len(self.lengths))
    self._source = None

  def _load_lengths(self, documents: int) -> np.ndarray:
    name = f"{self.split}.lengths.npy"
    try:
      lengths = np.load(os.path.join(self.root, name))
    except FileNotFoundError:
      raise _damaged(self.root, f"{name} is missing") from None
    except (OSError, ValueError, EOFError) as e:
      raise _damaged(self.root, f"{name} cannot be read", e) from None
    if lengths.ndim != 1 or lengths.dtype.kind not in "iu" or len(lengths) != documents:
      raise _damaged(self.root, f"{name} holds {lengths.dtype} {lengths.shape}, not the "
                     f"{documents} document lengths {METADATA} counts")
    return lengths

  @property
  def source(self):
    if self._source is None and self._paths:
      try:
        self._source = grain.sources.ArrayRecordDataSource(self._paths)
      except Exception as e:  # noqa: BLE001 (a shard that is no ArrayRecord file any more)
        raise _damaged(self.root, f"a shard of the {self.split} split cannot be opened", e
                       ) from None
    return self._source

  def check(self) -> None:
    """Opens every shard on its own: its record count and its first and last record's size
    must match the lengths (ConfigError naming the shard otherwise)."""
    first = 0
    for path, expected in zip(self._paths, self.shard_sizes, strict=True):
      name = os.path.basename(path)
      try:
        shard = grain.sources.ArrayRecordDataSource([path])
        if len(shard) != expected:
          raise _damaged(self.root, f"{name} holds {len(shard)} documents, {expected} expected")
        for j in sorted({0, expected - 1}):
          size = len(shard[j])
          if size != self.lengths[first + j] * self.dtype.itemsize:
            raise _damaged(self.root, f"document {j} of {name} has {size} bytes, "
                           f"{self.lengths[first + j] * self.dtype.itemsize} expected")
      except ConfigError:
        raise
      except Exception as e:  # noqa: BLE001 (any read error of the library names the damage)
        raise _damaged(self.root, f"{name} cannot be read", e) from None
      first += expected

  @property
  def names(self) -> tuple[str, ...]:
    with open(os.path.join(self.root, f"{self.split}.names.txt"), encoding="utf-8") as f:
      return tuple(json.loads(line) for line in f)

  def __len__(self) -> int:
    return len(self.lengths)

  def __getitem__(self, i: int) -> np.ndarray:
    try:
      return np.frombuffer(self.source[int(i)], self.dtype).astype(np.int32)
    except ConfigError:
      raise
    except Exception as e:  # noqa: BLE001 (a record damaged inside its shard)
      shard = self._paths[int(np.searchsorted(np.cumsum(self.shard_sizes), i, side="right"))]
      raise _damaged(self.root, f"document {int(i)} of the {self.split} split (in "
                     f"{os.path.basename(shard)}) cannot be read", e) from None

  def __getstate__(self):  # grain may pickle sources into worker processes
    return {**self.__dict__, "_source": None}


def _check_metadata(root: str, meta) -> None:
  """ConfigError unless `meta` has the fields a reader needs."""
  if not isinstance(meta, dict):
    raise _damaged(root, f"{METADATA} holds {type(meta).__name__}, not an object")
  if meta.get("format") != FORMAT_VERSION:
    raise ConfigError(f"{root!r}: prepared-data format {meta.get('format')} unsupported "
                      f"(expected {FORMAT_VERSION}); prepare it again with --force")
  try:
    np.dtype(meta["dtype"])
    kind = meta["tokenizer"]["kind"]
    if kind != "bytes":
      meta["tokenizer"]["file"]
    ok = isinstance(kind, str) and isinstance(meta["splits"], dict) and all(
        isinstance(s["documents"], int) and isinstance(s["shards"], list)
        for s in meta["splits"].values())
  except KeyError as e:
    raise _damaged(root, f"{METADATA} has no field {e.args[0]!r}") from None
  except TypeError:
    ok = False
  if not ok:
    raise _damaged(root, f"{METADATA} has a field of the wrong type")


class PreparedData:
  """A folder written by `prepare()`."""

  def __init__(self, root: str):
    root = os.path.expanduser(root)
    path = os.path.join(root, METADATA)
    if not os.path.isfile(path):
      raise ConfigError(f"{root!r} is not a prepared data folder (no {METADATA}); "
                        "make one with scripts/prepare_data.py")
    try:
      with open(path, encoding="utf-8") as f:
        self.meta = json.load(f)
    except (OSError, ValueError) as e:
      raise _damaged(root, f"{METADATA} cannot be read", e) from None
    _check_metadata(root, self.meta)
    self.root = root

  @property
  def tokenizer_spec(self) -> str:
    t = self.meta["tokenizer"]
    if t["kind"] == "bytes":
      return "bytes"
    return f"{t['kind']}:{os.path.join(self.root, t['file'])}"

  def tokenizer(self) -> Tokenizer:
    return get_tokenizer(self.tokenizer_spec)

  def split(self, split: str) -> PreparedSplit:
    return PreparedSplit(self.root, split, self.meta)

  def check(self) -> None:
    """Every split opened and its shards read at both ends (see `PreparedSplit.check`)."""
    for split in self.meta["splits"]:
      self.split(split).check()


def check_tokenizer(data: PreparedData, spec: str) -> str:
  """The tokenizer spec to use with prepared data: its own, unless `spec` names another one."""
  if spec == "bytes" or spec == data.tokenizer_spec:
    return data.tokenizer_spec
  want = data.meta["tokenizer"]["fingerprint"]
  if get_tokenizer(spec).fingerprint() != want:
    raise ConfigError(f"data.tokenizer={spec!r} differs from the tokenizer {data.root!r} was "
                      f"prepared with ({data.meta['tokenizer']['name']!r}); leave data.tokenizer "
                      "at 'bytes' to use the folder's own")
  return data.tokenizer_spec
