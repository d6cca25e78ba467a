"""Document sources. A document is `(name, text)`.

Source specs (`data.source` / `prepare_data.py --source`):
  embedded               the CPython standard library's own .py files (exists on every machine)
  PATH/                  a folder: every .txt/.md/.py/.rst file below it, sorted by path
  PATH.jsonl             one JSON object per line; its `data.text_field` is the text
  tfds:NAME[/CONFIG][:SPLIT]   a TFDS dataset already prepared in `data.tfds_data_dir` (offline)
  a prepared folder      (holds metadata.json) is read by `ttt_jax.data.prepare`, not here

Train/validation split is a deterministic hash of the document name (for TFDS without :SPLIT,
the dataset's own train/validation|test splits). Bytes that are not valid UTF-8 are replaced by
U+FFFD and counted (`DecodeStats`).
"""

from __future__ import annotations

import codecs
import dataclasses
import hashlib
import json
import os
import sysconfig
from collections.abc import Iterator

from ttt_jax.config import ConfigError

EXCLUDED_DIRS = {"test", "tests", "idle_test", "site-packages", "dist-packages", "__pycache__",
                 "lib2to3", "turtledemo", "idlelib"}
SPLITS = ("train", "validation")
TEXT_SUFFIXES = (".txt", ".md", ".py", ".rst")
SOURCE_HELP = ("embedded, a folder of .txt/.md/.py/.rst files, a .jsonl file, "
               "tfds:NAME[/CONFIG][:SPLIT], or a folder made by scripts/prepare_data.py")


# -- decoding with a count of bad bytes ---------------------------------------------------------
_bad_bytes = [0]


def _count_and_replace(err: UnicodeDecodeError):
  _bad_bytes[0] += err.end - err.start
  return "\ufffd", err.end


codecs.register_error("ttt_jax_count_replace", _count_and_replace)


def decode_utf8(data: bytes) -> tuple[str, int]:
  """(text, number of undecodable bytes, each run replaced by U+FFFD)."""
  try:
    return data.decode("utf-8"), 0
  except UnicodeDecodeError:
    _bad_bytes[0] = 0
    text = data.decode("utf-8", errors="ttt_jax_count_replace")
    return text, _bad_bytes[0]


@dataclasses.dataclass
class DecodeStats:
  """Undecodable input seen while reading a source."""

  bad_bytes: int = 0
  bad_docs: int = 0

  def add(self, n: int) -> None:
    if n:
      self.bad_bytes += n
      self.bad_docs += 1


# -- the embedded corpus ------------------------------------------------------------------------
def stdlib_dir() -> str:
  return sysconfig.get_paths()["stdlib"]


def embedded_files() -> list[str]:
  """Sorted relative paths of the CPython stdlib .py files (test folders excluded)."""
  root = stdlib_dir()
  out = []
  for dirpath, dirnames, filenames in os.walk(root):
    dirnames[:] = sorted(d for d in dirnames if d not in EXCLUDED_DIRS and not d.startswith("test"))
    for f in filenames:
      if f.endswith(".py"):
        out.append(os.path.relpath(os.path.join(dirpath, f), root))
  return sorted(out)


def split_of(name: str, val_fraction: float) -> str:
  """'train' or 'validation', a pure function of the document name."""
  h = int.from_bytes(hashlib.sha256(name.encode("utf-8")).digest()[:8], "big")
  return "validation" if (h / 2**64) < val_fraction else "train"


def _check_split(split: str) -> None:
  if split not in SPLITS:
    raise ValueError(f"split={split!r} unknown; allowed: {', '.join(SPLITS)}")


def embedded_documents(split: str, val_fraction: float = 0.05,
                       stats: DecodeStats | None = None) -> Iterator[tuple[str, str]]:
  """Yields (relative path, text) of the embedded corpus for one split, in sorted order."""
  _check_split(split)
  yield from _file_documents(stdlib_dir(), embedded_files(), split, val_fraction, stats)


def _file_documents(root, rels, split, val_fraction, stats) -> Iterator[tuple[str, str]]:
  for rel in rels:
    if split is not None and split_of(rel, val_fraction) != split:
      continue
    with open(os.path.join(root, rel), "rb") as f:
      text, bad = decode_utf8(f.read())
    if stats is not None:
      stats.add(bad)
    if text.strip():
      yield rel, text


# -- local folders and jsonl --------------------------------------------------------------------
def folder_files(root: str) -> list[str]:
  """Sorted relative paths of the text files below `root` (hidden folders skipped)."""
  out = []
  for dirpath, dirnames, filenames in os.walk(root):
    dirnames[:] = sorted(d for d in dirnames if not d.startswith("."))
    for f in filenames:
      if f.endswith(TEXT_SUFFIXES) and not f.startswith("."):
        out.append(os.path.relpath(os.path.join(dirpath, f), root))
  return sorted(out)


def jsonl_documents(path: str, split: str | None, val_fraction: float, text_field: str,
                    stats: DecodeStats | None = None) -> Iterator[tuple[str, str]]:
  base = os.path.basename(path)
  with open(path, "rb") as f:
    for lineno, raw in enumerate(f, 1):
      if not raw.strip():
        continue
      name = f"{base}:{lineno}"
      if split is not None and split_of(name, val_fraction) != split:
        continue
      line, bad = decode_utf8(raw)
      if stats is not None:
        stats.add(bad)
      try:
        rec = json.loads(line)
      except json.JSONDecodeError as e:
        raise ConfigError(f"{path}:{lineno}: not valid JSON ({e.msg})") from None
      if not isinstance(rec, dict) or not isinstance(rec.get(text_field), str):
        raise ConfigError(f"{path}:{lineno}: no string field {text_field!r} "
                          "(set data.text_field / --text_field)")
      if rec[text_field].strip():
        yield name, rec[text_field]


# -- tensorflow-datasets ------------------------------------------------------------------------
def parse_tfds(spec: str) -> tuple[str, str | None]:
  """'tfds:NAME/CONFIG:SPLIT' -> ('NAME/CONFIG', 'SPLIT' or None)."""
  body = spec[len("tfds:"):]
  name, _, split = body.partition(":")
  if not name:
    raise ConfigError(f"data.source={spec!r}: expected tfds:NAME[/CONFIG][:SPLIT]")
  return name, split or None


def _tfds():
  """The tensorflow_datasets module (an optional dependency, `.[tfds]`); one line if missing."""
  try:
    import tensorflow_datasets as tfds  # optional dependency (.[tfds])
  except ImportError:
    raise ConfigError("data.source=tfds:... needs tensorflow-datasets: "
                      "pip install -e '.[tfds]'") from None
  return tfds


def _tfds_failed(where: str, data_dir: str, e: Exception) -> ConfigError:
  """TFDS's error as one line naming the source (`where`: NAME or NAME:SPLIT)."""
  msg = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
  return ConfigError(f"data.source=tfds:{where} (data.tfds_data_dir={data_dir!r}): {msg[:300]}")


def tfds_source(name: str, split: str, data_dir: str):
  """A random-access ArrayRecord source for a TFDS split prepared in `data_dir` (no network)."""
  tfds = _tfds()
  try:
    return tfds.data_source(name, split=split, data_dir=data_dir or None, download=False)
  except Exception as e:
    raise _tfds_failed(f"{name}:{split}", data_dir, e) from None


def _tfds_splits(name: str, data_dir: str):
  """The split names of a prepared TFDS dataset; one line naming the source otherwise."""
  tfds = _tfds()
  try:
    return list(tfds.builder(name, data_dir=data_dir or None).info.splits)
  except Exception as e:
    raise _tfds_failed(name, data_dir, e) from None


def _held_out(splits) -> str | None:
  """A TFDS dataset's held-out split: validation, else test (None without either)."""
  return next((c for c in ("validation", "test") if c in splits), None)


def _tfds_split_name(name: str, split: str, data_dir: str) -> str:
  if split == "train":
    return "train"
  held = _held_out(_tfds_splits(name, data_dir))
  if held is None:
    raise ConfigError(f"data.source=tfds:{name} has no validation or test split; "
                      "name one split (tfds:NAME:SPLIT) to split it by document hash")
  return held


def tfds_all_splits(name: str, splits) -> list[str]:
  """The splits that hold every document of a TFDS dataset whose splits are `splits`: train and
  its held-out split (validation, else test), whichever of them exist."""
  out = [s for s in ("train", _held_out(splits)) if s is not None and s in splits]
  if not out:
    raise ConfigError(f"data.source=tfds:{name} has no train, validation or test split (splits: "
                      f"{', '.join(sorted(splits))}); name one: tfds:NAME:SPLIT")
  return out


def tfds_documents(spec: str, split: str | None, val_fraction: float, text_field: str,
                   data_dir: str, stats: DecodeStats | None = None) -> Iterator[tuple[str, str]]:
  name, tsplit = parse_tfds(spec)
  hashed = tsplit is not None
  if tsplit is None and split is None:  # every document: the dataset's train + held-out split
    for part in tfds_all_splits(name, _tfds_splits(name, data_dir)):
      yield from tfds_documents(f"tfds:{name}:{part}", None, val_fraction, text_field, data_dir,
                                stats)
    return
  if tsplit is None:
    tsplit = _tfds_split_name(name, split or "train", data_dir)
  src = tfds_source(name, tsplit, data_dir)
  for i in range(len(src)):
    doc_name = f"{name}:{tsplit}:{i}"
    if hashed and split is not None and split_of(doc_name, val_fraction) != split:
      continue
    rec = src[i]
    if text_field not in rec:
      raise ConfigError(f"data.source={spec!r}: examples have no field {text_field!r} "
                        f"(fields: {', '.join(rec)}); set data.text_field")
    value = rec[text_field]
    if isinstance(value, bytes):
      value, bad = decode_utf8(value)
      if stats is not None:
        stats.add(bad)
    if value.strip():
      yield doc_name, value


# -- dispatch -----------------------------------------------------------------------------------
def source_kind(source: str, flag: str = "data.source") -> str:
  """'embedded' | 'tfds' | 'prepared' | 'folder' | 'jsonl'; one clear line (naming `flag`, the
  option the source came from) if none fits."""
  if source == "embedded":
    return "embedded"
  if source.startswith("tfds:"):
    return "tfds"
  path = os.path.expanduser(source)
  if os.path.isdir(path):
    return "prepared" if os.path.exists(os.path.join(path, "metadata.json")) else "folder"
  if os.path.isfile(path) and path.endswith(".jsonl"):
    return "jsonl"
  if os.path.exists(path):
    raise ConfigError(f"{flag}={source!r} is a file that is not .jsonl; allowed: {SOURCE_HELP}")
  raise ConfigError(f"{flag}={source!r}: no such file or folder; allowed: {SOURCE_HELP}")


def get_documents(source: str, split: str | None, val_fraction: float = 0.05, *,
                  text_field: str = "text", tfds_data_dir: str = "",
                  stats: DecodeStats | None = None,
                  kind: str | None = None) -> Iterator[tuple[str, str]]:
  """(name, text) of one split (`None`: every document) of a raw-text source, in a fixed order.

  `kind`: the source's `source_kind`, when the caller has resolved it already.
  """
  if split is not None:
    _check_split(split)
  kind = source_kind(source) if kind is None else kind
  if kind == "embedded":
    return _file_documents(stdlib_dir(), embedded_files(), split, val_fraction, stats)
  if kind == "folder":
    root = os.path.expanduser(source)
    return _file_documents(root, folder_files(root), split, val_fraction, stats)
  if kind == "jsonl":
    return jsonl_documents(os.path.expanduser(source), split, val_fraction, text_field, stats)
  if kind == "tfds":
    return tfds_documents(source, split, val_fraction, text_field, tfds_data_dir, stats)
  raise ConfigError(f"data.source={source!r} is a prepared folder; read it with "
                    "ttt_jax.data.prepared.PreparedData")
