"""A tokenizer written into a folder of its own and read back exactly: a run keeps the tokenizer it
trains with in `<workdir>/tokenizer/`, so the run opens read-only (evaluation on other text,
generation, export) after the data folder that held the tokenizer's files moved away.

The folder holds `tokenizer.json` (a Hugging Face `tokenizers` file) or `tokenizer.model` (a
SentencePiece model), nothing for the byte tokenizer, and `saved.json`: the tokenizer's name (the
spec it was loaded from), its kind and fingerprint, and the special tokens its files declared.
Read back, it has the same ids, special tokens, name and fingerprint.
"""

from __future__ import annotations

import dataclasses
import json
import os
import shutil

import tokenizers

from ttt_jax.data.special_tokens import DeclaredSpecials
from ttt_jax.data.tokenizers import (
  ByteTokenizer,
  HFTokenizer,
  SentencePieceTokenizer,
  Tokenizer,
)

RECORD = "saved.json"
FILES = {"hf": "tokenizer.json", "sp": "tokenizer.model"}


def _record(folder: str) -> dict | None:
  try:
    with open(os.path.join(folder, RECORD), encoding="utf-8") as f:
      record = json.load(f)
  except (OSError, ValueError):
    return None
  return record if isinstance(record, dict) else None


def save_tokenizer(tokenizer: Tokenizer, folder: str) -> None:
  """Writes `tokenizer` into `folder` (replacing another one; nothing to do when it holds this
  one). Written beside it first and renamed, so the folder is whole or absent."""
  if (_record(folder) or {}).get("fingerprint") == tokenizer.fingerprint():
    return
  tmp = f"{folder}.tmp-{os.getpid()}"
  shutil.rmtree(tmp, ignore_errors=True)
  os.makedirs(tmp)
  declared = getattr(tokenizer, "declared", None)
  if tokenizer.kind == "hf":
    with open(os.path.join(tmp, FILES["hf"]), "w", encoding="utf-8") as f:
      f.write(tokenizer.to_str())
  elif tokenizer.kind == "sp":
    with open(os.path.join(tmp, FILES["sp"]), "wb") as f:
      f.write(tokenizer.model_bytes)
  record = {"name": tokenizer.name, "kind": tokenizer.kind,
            "fingerprint": tokenizer.fingerprint(),
            "declared": None if declared is None else dataclasses.asdict(declared)}
  with open(os.path.join(tmp, RECORD), "w", encoding="utf-8") as f:
    json.dump(record, f, indent=2, ensure_ascii=False)
  if os.path.isdir(folder):
    shutil.rmtree(folder)
  os.rename(tmp, folder)


def load_saved_tokenizer(folder: str) -> Tokenizer | None:
  """The tokenizer `save_tokenizer` wrote into `folder`; None when there is none (a run trained
  before runs kept their tokenizer) or it does not read back as the one saved."""
  record = _record(folder)
  if record is None:
    return None
  try:
    kind, name = record["kind"], record["name"]
    if kind == "bytes":
      tokenizer = ByteTokenizer()
    elif kind == "hf":
      tk = tokenizers.Tokenizer.from_file(os.path.join(folder, FILES["hf"]))
      d = record["declared"]
      declared = None if d is None else DeclaredSpecials(**{**d, "eos": tuple(d["eos"])})
      tokenizer = HFTokenizer(tk, name, declared)
    else:
      tokenizer = SentencePieceTokenizer(os.path.join(folder, FILES["sp"]), name)
  except Exception:  # noqa: BLE001 (a damaged copy is no copy; the caller reports the original)
    return None
  return tokenizer if tokenizer.fingerprint() == record.get("fingerprint") else None
