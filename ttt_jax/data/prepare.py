"""Prepared data: documents tokenized once into ArrayRecord shards (read back by data/prepared.py).

A prepared folder holds, per split (`train`, `validation`):
  {split}-SSSSS-of-NNNNN.array_record   one record per document: its token ids (no BOS/EOS), as
                                        little-endian uint16 (vocab <= 65536) or int32
  {split}.lengths.npy                   document lengths in record order (the document index)
  {split}.names.txt                     document names, one JSON string per line
plus `tokenizer/` (a copy of the tokenizer file, so the folder is self-contained) and
`metadata.json` (tokenizer, counts, length histogram, input fingerprint). Documents are dealt
round-robin to shards; record order is shard-major. Everything is written under a temporary
name and renamed at the end, so a folder with metadata.json is always complete.
"""

from __future__ import annotations

import hashlib
import json
import multiprocessing
import os
import shutil
import sys
import time
from collections.abc import Callable, Iterator

import numpy as np
from array_record.python.array_record_module import ArrayRecordWriter
from tqdm.auto import tqdm

from ttt_jax.config import ConfigError
from ttt_jax.data import sources, special_tokens
from ttt_jax.data.prepared import FORMAT_VERSION, METADATA
from ttt_jax.data.tokenizers import (
  ByteTokenizer,
  HFTokenizer,
  SentencePieceTokenizer,
  Tokenizer,
  get_tokenizer,
  train_bpe,
)

CHUNK_CHARS = 8 << 20  # characters read ahead per tokenization round (bounds memory)
CHUNK_DOCS = 1024


# -- writing ------------------------------------------------------------------------------------
_worker_tokenizer: Tokenizer | None = None


def _init_worker(spec: str) -> None:
  global _worker_tokenizer
  os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
  _worker_tokenizer = get_tokenizer(spec)


def _encode_texts(texts: list[str]) -> list[np.ndarray]:
  return [_worker_tokenizer.encode(t) for t in texts]


def _chunks(docs: Iterator[tuple[str, str]]) -> Iterator[list[tuple[str, str]]]:
  buf, chars = [], 0
  for doc in docs:
    buf.append(doc)
    chars += len(doc[1])
    if chars >= CHUNK_CHARS or len(buf) >= CHUNK_DOCS:
      yield buf
      buf, chars = [], 0
  if buf:
    yield buf


def _split_list(xs: list, n: int) -> list[list]:
  k = -(-len(xs) // n)
  return [xs[i:i + k] for i in range(0, len(xs), k)]


def _encoded(docs, spec: str, workers: int):
  """(name, token array) in document order; tokenizes the next chunk while one is written."""
  if workers <= 1:
    _init_worker(spec)
    for chunk in _chunks(docs):
      yield from zip((n for n, _ in chunk), _encode_texts([t for _, t in chunk]), strict=True)
    return
  ctx = multiprocessing.get_context("spawn")
  with ctx.Pool(workers, initializer=_init_worker, initargs=(spec,)) as pool:
    pending = None
    for chunk in _chunks(docs):
      job = (chunk, pool.map_async(_encode_texts, _split_list([t for _, t in chunk], workers * 4)))
      if pending is not None:
        yield from _collect(*pending)
      pending = job
    if pending is not None:
      yield from _collect(*pending)


def _collect(chunk, result):
  arrays = [a for part in result.get() for a in part]
  yield from zip((n for n, _ in chunk), arrays, strict=True)


def length_histogram(lengths: np.ndarray) -> dict:
  """Counts of document lengths in power-of-two bins [0,1), [1,2), [2,4), ... ."""
  top = int(lengths.max()) if len(lengths) else 0
  edges = [0, 1] + [2**k for k in range(1, max(1, top.bit_length()) + 1)]
  counts, _ = np.histogram(lengths, bins=edges + [edges[-1] * 2])
  return {"bin_starts": edges, "counts": counts.tolist()}


def _write_split(tmp: str, split: str, docs, spec: str, dtype, num_shards: int, workers: int,
                 echo: Callable) -> dict:
  writers: dict[int, ArrayRecordWriter] = {}
  per_shard_lengths: list[list[int]] = [[] for _ in range(num_shards)]
  per_shard_names: list[list[str]] = [[] for _ in range(num_shards)]
  shard_name = lambda s: f"{split}-{s:05d}-of-{num_shards:05d}.array_record"
  bar = tqdm(desc=f"tokenize {split}", unit="doc", file=sys.stderr, dynamic_ncols=True)
  tokens = 0
  try:
    for i, (name, ids) in enumerate(_encoded(docs, spec, workers)):
      s = i % num_shards
      if s not in writers:
        writers[s] = ArrayRecordWriter(os.path.join(tmp, shard_name(s)), "group_size:1")
      writers[s].write(np.ascontiguousarray(ids, dtype=dtype).tobytes())
      per_shard_lengths[s].append(len(ids))
      per_shard_names[s].append(name)
      tokens += len(ids)
      bar.update(1)
      if i % 64 == 0:
        bar.set_postfix(tokens=f"{tokens:,}")
  finally:
    bar.close()
    for w in writers.values():
      w.close()
  lengths = np.asarray([n for s in per_shard_lengths for n in s], np.int64)
  np.save(os.path.join(tmp, f"{split}.lengths.npy"), lengths)
  with open(os.path.join(tmp, f"{split}.names.txt"), "w", encoding="utf-8") as f:
    for name in (n for s in per_shard_names for n in s):
      f.write(json.dumps(name) + "\n")
  return {"shards": [shard_name(s) for s in sorted(writers)], "documents": len(lengths),
          "tokens": int(lengths.sum()), "max_length": int(lengths.max()) if len(lengths) else 0,
          "length_histogram": length_histogram(lengths)}


def input_fingerprint(source: str, text_field: str, tfds_data_dir: str,
                      kind: str | None = None) -> str:
  """Changes when the input files change (paths, sizes, modification times). `kind`: the
  source's `sources.source_kind` when already known."""
  h = hashlib.sha256(json.dumps([source, text_field, tfds_data_dir]).encode())
  kind = sources.source_kind(source) if kind is None else kind
  if kind in ("embedded", "folder"):
    root = sources.stdlib_dir() if kind == "embedded" else os.path.expanduser(source)
    files = sources.embedded_files() if kind == "embedded" else sources.folder_files(root)
    for rel in files:
      st = os.stat(os.path.join(root, rel))
      h.update(f"{rel}\0{st.st_size}\0{st.st_mtime_ns}\n".encode())
  elif kind == "jsonl":
    st = os.stat(os.path.expanduser(source))
    h.update(f"{st.st_size}\0{st.st_mtime_ns}".encode())
  elif kind == "prepared":
    raise ConfigError(f"--source={source!r} is already a prepared folder")
  return h.hexdigest()[:24]


def _tokenizer_record(tok: Tokenizer, tmp: str, name: str) -> dict:
  rec = {"name": name, "fingerprint": tok.fingerprint(), "vocab_size": tok.vocab_size,
         "bos_id": tok.bos_id, "eos_id": tok.eos_id, "pad_id": tok.pad_id}
  if isinstance(tok, ByteTokenizer):
    return {**rec, "kind": "bytes"}
  os.makedirs(os.path.join(tmp, "tokenizer"), exist_ok=True)
  if isinstance(tok, HFTokenizer):
    rel = "tokenizer/tokenizer.json"
    with open(os.path.join(tmp, rel), "w", encoding="utf-8") as f:
      f.write(tok.to_str())
    special_tokens.write_folder(os.path.join(tmp, "tokenizer"), tok)  # BOS/EOS/PAD as declared
    return {**rec, "kind": "hf", "file": rel}
  if isinstance(tok, SentencePieceTokenizer):
    rel = "tokenizer/tokenizer.model"
    with open(os.path.join(tmp, rel), "wb") as f:
      f.write(tok.model_bytes)
    return {**rec, "kind": "sp", "file": rel}
  raise ConfigError(f"tokenizer {name!r} cannot be stored in prepared data")


def _remove_leftovers(out_dir: str, echo: Callable[[str], None]) -> None:
  """Removes `OUT.tmp-PID` folders of earlier runs killed before their rename (SIGKILL: no
  cleanup ran) whose process no longer runs; a running one's is left alone."""
  parent, prefix = os.path.dirname(out_dir) or ".", os.path.basename(out_dir) + ".tmp-"
  for name in os.listdir(parent) if os.path.isdir(parent) else ():
    pid = name[len(prefix):]
    if not (name.startswith(prefix) and pid.isdigit()) or int(pid) == os.getpid():
      continue
    try:
      os.kill(int(pid), 0)
      continue  # still running (or another user's): not ours to remove
    except ProcessLookupError:
      pass
    except PermissionError:
      continue
    shutil.rmtree(os.path.join(parent, name), ignore_errors=True)
    echo(f"notice: removed {os.path.join(parent, name)}, left by a prepare_data run that was "
         "killed (its process no longer runs)")


def warn_empty_validation(meta: dict, out_dir: str, echo: Callable[[str], None]) -> None:
  """A loud warning when the prepared validation split holds no document."""
  if meta["splits"]["validation"]["documents"]:
    return
  echo(f"warning: the validation split is EMPTY: 0 of {meta['splits']['train']['documents']:,} "
       f"documents at --val_fraction={meta['val_fraction']}; training on {out_dir} stops at "
       "start-up and evaluation has nothing to read: prepare again with --force and a larger "
       "--val_fraction (e.g. 0.05)")


def prepare(source: str, out_dir: str, tokenizer: str = "bytes", *, val_fraction: float = 0.05,
            num_shards: int = 8, workers: int = 1, force: bool = False,
            text_field: str = "text", tfds_data_dir: str = "", train_tokenizer: str = "",
            vocab_size: int = 0, echo: Callable[[str], None] = print) -> dict:
  """Tokenizes `source` into ArrayRecord shards under `out_dir`; returns the metadata.

  A no-op when `out_dir` already holds this input prepared with these settings, unless `force`.
  `train_tokenizer='bpe'` first trains a byte-level BPE of `vocab_size` on the train split.
  """
  out_dir = os.path.abspath(os.path.expanduser(out_dir))
  if train_tokenizer not in ("", "bpe"):
    raise ConfigError(f"--train_tokenizer={train_tokenizer!r} not allowed; choose bpe")
  if train_tokenizer and tokenizer != "bytes":
    raise ConfigError("--train_tokenizer and --tokenizer exclude each other; pass one")
  if num_shards < 1:
    raise ConfigError(f"--num_shards={num_shards} must be >= 1")
  if not 0 <= val_fraction < 1:
    raise ConfigError(f"--val_fraction={val_fraction} must be in [0, 1), e.g. 0.05")
  # the tokenizer and the source are resolved once, here
  given = None if train_tokenizer else get_tokenizer(tokenizer)
  kind = sources.source_kind(source)
  tok_key = f"train:{train_tokenizer}:{vocab_size}" if given is None else given.fingerprint()
  settings = {"format": FORMAT_VERSION, "source": source,
              "input": input_fingerprint(source, text_field, tfds_data_dir, kind),
              "tokenizer": tok_key, "val_fraction": val_fraction, "num_shards": num_shards}
  fingerprint = hashlib.sha256(json.dumps(settings, sort_keys=True).encode()).hexdigest()[:24]
  meta_path = os.path.join(out_dir, METADATA)
  if os.path.exists(out_dir) and not os.path.isdir(out_dir):
    raise ConfigError(f"--out_dir={out_dir!r} is a file, not a folder; name a folder")
  if os.path.isfile(meta_path) and not force:
    with open(meta_path, encoding="utf-8") as f:
      old = json.load(f)
    if old.get("fingerprint") == fingerprint:
      echo(f"{out_dir}: already prepared from this input (pass --force to redo)")
      warn_empty_validation(old, out_dir, echo)
      return old
    raise ConfigError(f"--out_dir={out_dir!r} holds data prepared from other input or settings; "
                      "pass --force to replace it")
  if os.path.exists(out_dir) and not os.path.isfile(meta_path) and os.listdir(out_dir):
    raise ConfigError(f"--out_dir={out_dir!r} exists and is not a prepared data folder")

  stats = sources.DecodeStats()
  docs = lambda split: sources.get_documents(source, split, val_fraction, text_field=text_field,
                                             tfds_data_dir=tfds_data_dir, stats=stats, kind=kind)
  _remove_leftovers(out_dir, echo)
  tmp = f"{out_dir}.tmp-{os.getpid()}"
  shutil.rmtree(tmp, ignore_errors=True)
  try:
    os.makedirs(tmp)
  except OSError as e:
    raise ConfigError(f"--out_dir={out_dir!r}: cannot create a folder there ({e.strerror}: "
                      f"{e.filename})") from None
  t0 = time.perf_counter()
  try:
    if train_tokenizer:
      echo(f"training a byte-level BPE tokenizer (vocab {vocab_size}) on the train split")
      tok = train_bpe((t for _, t in docs("train")), vocab_size, os.path.join(tmp, "bpe"))
      name = f"bpe:{os.path.join(out_dir, 'tokenizer')}"
    else:
      tok, name = given, tokenizer
    tok_rec = _tokenizer_record(tok, tmp, name)
    # workers load the copy inside the folder: exactly what readers will use
    spec = "bytes" if tok_rec["kind"] == "bytes" else \
        f"{tok_rec['kind']}:{os.path.join(tmp, tok_rec['file'])}"
    shutil.rmtree(os.path.join(tmp, "bpe"), ignore_errors=True)
    dtype = np.uint16 if tok.vocab_size <= 65536 else np.int32
    stats.bad_bytes = stats.bad_docs = 0  # count each document once, in the tokenize pass
    splits = {}
    for split, n in (("train", num_shards), ("validation", max(1, round(num_shards *
                                                                         val_fraction)))):
      splits[split] = _write_split(tmp, split, docs(split), spec, dtype, n, workers, echo)
    if splits["train"]["documents"] == 0:
      raise ConfigError(f"--source={source!r} has no non-empty documents for the train split")
    meta = {"format": FORMAT_VERSION, "fingerprint": fingerprint, "settings": settings,
            "source": source, "tokenizer": tok_rec, "dtype": np.dtype(dtype).name,
            "val_fraction": val_fraction, "splits": splits,
            "undecodable": {"bytes": stats.bad_bytes, "documents": stats.bad_docs},
            "seconds": round(time.perf_counter() - t0, 2)}
    with open(os.path.join(tmp, METADATA), "w", encoding="utf-8") as f:
      json.dump(meta, f, indent=1)
    if os.path.exists(out_dir):
      shutil.rmtree(out_dir)
    os.rename(tmp, out_dir)
  except BaseException:
    shutil.rmtree(tmp, ignore_errors=True)
    raise
  tr, va = splits["train"], splits["validation"]
  echo(f"{out_dir}: train {tr['documents']:,} docs / {tr['tokens']:,} tokens in "
       f"{len(tr['shards'])} shards, validation {va['documents']:,} docs / {va['tokens']:,} "
       f"tokens; tokenizer {name} (vocab {tok.vocab_size}); {meta['seconds']:.1f} s")
  warn_empty_validation(meta, out_dir, echo)
  if stats.bad_bytes:
    echo(f"warning: {stats.bad_bytes:,} undecodable bytes in {stats.bad_docs:,} documents were "
         "replaced by U+FFFD")
  return meta
