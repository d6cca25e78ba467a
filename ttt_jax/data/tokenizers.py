"""Tokenizers behind one interface: encode / decode / vocab_size / bos_id / eos_id / pad_id, plus
stop_ids (every id that ends a generation), add_bos (whether a prompt starts with BOS) and
chat_template (Jinja text or None).

Spec strings (`data.tokenizer`):
  bytes                 UTF-8 bytes 0-255 + BOS 256, EOS 257, PAD 258 (default)
  hf:PATH               a HuggingFace `tokenizers` file (tokenizer.json), or a folder holding
                        tokenizer.json or a byte-level BPE pair (vocab.json|encoder.json +
                        merges.txt|vocab.bpe, e.g. GPT-2's)
  bpe:DIR               a byte-level BPE trained by `scripts/prepare_data.py` (DIR/tokenizer.json)
  sp:PATH               a SentencePiece model file (e.g. Llama-2's tokenizer.model)

A `tokenizers` file's specials come from the Hugging Face config files beside it
(data/special_tokens.py: tokenizer_config.json, generation_config.json, config.json), PAD being
EOS when they name none; without such files they are chosen by name. Special tokens neither way
finds get ids right after the vocabulary; `vocab_size` counts them, so every id a tokenizer emits
is `< vocab_size`. Nothing is ever fetched from a hub.
"""

from __future__ import annotations

import functools
import hashlib
import os
from collections.abc import Iterable
from typing import Protocol

import numpy as np
import sentencepiece as spm
import tokenizers
from tokenizers import decoders, models, pre_tokenizers, trainers

from ttt_jax.config import ConfigError
from ttt_jax.data.special_tokens import DeclaredSpecials, read_folder

BPE_SPECIALS = ("<s>", "</s>", "<pad>")
_BOS_NAMES = ("<|begin_of_text|>", "<s>", "<bos>", "[BOS]", "<|endoftext|>")
_EOS_NAMES = ("<|end_of_text|>", "</s>", "<eos>", "[EOS]", "<|endoftext|>")
_PAD_NAMES = ("<pad>", "[PAD]", "<|pad|>", "<|finetune_right_pad_id|>")


class Tokenizer(Protocol):
  vocab_size: int
  bos_id: int
  eos_id: int
  pad_id: int
  stop_ids: tuple[int, ...]
  add_bos: bool
  chat_template: str | None
  name: str

  def encode(self, text: str) -> np.ndarray: ...

  def decode(self, ids) -> str: ...


class TokenizerError(ConfigError):
  """A tokenizer spec or file that cannot be used; the message names it."""


class ByteTokenizer:
  """UTF-8 bytes (ids 0-255) plus BOS=256, EOS=257, PAD=258."""

  vocab_size = 259
  bos_id, eos_id, pad_id = 256, 257, 258
  stop_ids, add_bos, chat_template = (257,), True, None
  name = "bytes"
  kind = "bytes"

  def encode(self, text: str | bytes) -> np.ndarray:
    data = text if isinstance(text, bytes) else text.encode("utf-8", errors="replace")
    return np.frombuffer(data, dtype=np.uint8).astype(np.int32)

  def decode(self, ids) -> str:
    ids = np.asarray(ids)
    return bytes(ids[ids < 256].astype(np.uint8).tolist()).decode("utf-8", errors="replace")

  def fingerprint(self) -> str:
    return "bytes"


def _first_present(lookup, names) -> int | None:
  for n in names:
    i = lookup(n)
    if i is not None:
      return int(i)
  return None


class HFTokenizer:
  """A HuggingFace `tokenizers.Tokenizer` (BPE, WordPiece, Unigram, ...) from local files."""

  kind = "hf"

  def __init__(self, tk, name: str, declared: DeclaredSpecials | None = None):
    self.tk = tk
    self.name = name
    self.declared = declared
    base = tk.get_vocab_size(with_added_tokens=True)
    by_name = lambda names: _first_present(tk.token_to_id, names)  # noqa: E731
    d = declared or DeclaredSpecials()
    ids = [by_name(_BOS_NAMES) if d.bos is None else d.bos,
           d.eos[0] if d.eos else by_name(_EOS_NAMES),
           by_name(_PAD_NAMES) if declared is None else d.pad]
    extra = base
    for k in (0, 1) if declared else (0, 1, 2):
      if ids[k] is None:
        ids[k], extra = extra, extra + 1
    if ids[2] is None:  # the files name no PAD: EOS pads (never a new id the model could predict)
      ids[2] = ids[1]
    self.bos_id, self.eos_id, self.pad_id = ids
    self.stop_ids = tuple(dict.fromkeys([self.eos_id, *d.eos]))
    self.add_bos = True if d.add_bos is None else d.add_bos
    self.chat_template = d.chat_template
    self.base_size = base
    self.vocab_size = extra
    self._special = np.array(sorted(set(ids) | set(self.stop_ids)), np.int64)

  @classmethod
  def from_path(cls, path: str, name: str | None = None) -> HFTokenizer:
    name = name or f"hf:{path}"
    try:
      if os.path.isdir(path):
        if os.path.exists(os.path.join(path, "tokenizer.json")):
          tk = tokenizers.Tokenizer.from_file(os.path.join(path, "tokenizer.json"))
        else:
          vocab = _first_file(path, ("vocab.json", "encoder.json"))
          merges = _first_file(path, ("merges.txt", "vocab.bpe"))
          if vocab is None or merges is None:
            raise TokenizerError(f"data.tokenizer={name!r}: folder has no tokenizer.json nor "
                                 "vocab.json/encoder.json + merges.txt/vocab.bpe")
          tk = tokenizers.ByteLevelBPETokenizer(vocab, merges)._tokenizer
      elif os.path.isfile(path):
        tk = tokenizers.Tokenizer.from_file(path)
      else:
        raise TokenizerError(f"data.tokenizer={name!r}: no such file or folder {path!r}")
    except TokenizerError:
      raise
    except Exception as e:  # the tokenizers library raises plain Exceptions on bad files
      raise TokenizerError(f"data.tokenizer={name!r}: cannot load {path!r}: "
                           f"{str(e).splitlines()[0] if str(e) else type(e).__name__}") from None
    try:
      declared = read_folder(path if os.path.isdir(path) else os.path.dirname(path), tk)
    except (OSError, ValueError) as e:
      raise TokenizerError(f"data.tokenizer={name!r}: cannot read the config files beside "
                           f"{path!r}: {e}") from None
    return cls(tk, name, declared)

  def encode(self, text: str) -> np.ndarray:
    return np.asarray(self.tk.encode(text, add_special_tokens=False).ids, np.int32)

  def encode_batch(self, texts: list[str]) -> list[np.ndarray]:
    out = self.tk.encode_batch(texts, add_special_tokens=False)
    return [np.asarray(e.ids, np.int32) for e in out]

  def decode(self, ids) -> str:
    ids = np.asarray(ids, np.int64).reshape(-1)
    keep = ids[(ids < self.base_size) & ~np.isin(ids, self._special)]
    return self.tk.decode(keep.tolist(), skip_special_tokens=False)

  def to_str(self) -> str:
    return self.tk.to_str()

  def fingerprint(self) -> str:
    text = self.to_str() + ("" if self.declared is None else repr(self.declared))
    return "hf:" + hashlib.sha256(text.encode("utf-8")).hexdigest()[:16]


class SentencePieceTokenizer:
  """A SentencePiece model file (BPE or unigram; byte fallback if the model has it)."""

  kind = "sp"

  def __init__(self, path: str, name: str | None = None):
    self.name = name or f"sp:{path}"
    if not os.path.isfile(path):
      raise TokenizerError(f"data.tokenizer={self.name!r}: no such file {path!r}")
    with open(path, "rb") as f:
      self.model_bytes = f.read()
    try:
      self.sp = spm.SentencePieceProcessor(model_proto=self.model_bytes)
    except Exception as e:
      raise TokenizerError(f"data.tokenizer={self.name!r}: not a SentencePiece model "
                           f"({type(e).__name__})") from None
    base = self.sp.get_piece_size()
    ids = [self.sp.bos_id(), self.sp.eos_id(), self.sp.pad_id()]
    extra = base
    for k, i in enumerate(ids):
      if i < 0:
        ids[k], extra = extra, extra + 1
    self.bos_id, self.eos_id, self.pad_id = ids
    self.stop_ids, self.add_bos, self.chat_template = (self.eos_id,), True, None
    self.base_size = base
    self.vocab_size = extra

  def encode(self, text: str) -> np.ndarray:
    return np.asarray(self.sp.encode(text), np.int32)

  def decode(self, ids) -> str:
    ids = np.asarray(ids, np.int64).reshape(-1)
    ids = ids[(ids < self.base_size) & (ids >= 0)]
    return self.sp.decode([int(i) for i in ids if not self.sp.is_control(int(i))])

  def fingerprint(self) -> str:
    return "sp:" + hashlib.sha256(self.model_bytes).hexdigest()[:16]


def _first_file(folder: str, names) -> str | None:
  for n in names:
    p = os.path.join(folder, n)
    if os.path.isfile(p):
      return p
  return None


SPEC_HELP = "bytes, hf:PATH (tokenizer.json or folder), bpe:DIR, sp:PATH (SentencePiece .model)"


@functools.lru_cache(maxsize=16)
def get_tokenizer(spec: str) -> Tokenizer:
  """The tokenizer named by a spec string (cached per process); see the module docstring."""
  if spec == "bytes":
    return ByteTokenizer()
  kind, sep, path = spec.partition(":")
  if sep and path:
    path = os.path.expanduser(path)
    if kind == "hf":
      return HFTokenizer.from_path(path, spec)
    if kind == "bpe":
      return HFTokenizer.from_path(os.path.join(path, "tokenizer.json")
                                   if os.path.isdir(path) else path, spec)
    if kind == "sp":
      return SentencePieceTokenizer(path, spec)
  raise TokenizerError(f"data.tokenizer={spec!r} unknown; allowed: {SPEC_HELP}")


def train_bpe(texts: Iterable[str], vocab_size: int, out_dir: str,
              min_frequency: int = 2) -> HFTokenizer:
  """Trains a lossless byte-level BPE on `texts` and saves `out_dir/tokenizer.json`.

  BOS/EOS/PAD are `<s>`, `</s>`, `<pad>` (ids 0, 1, 2). Returns the loaded tokenizer.
  """
  if vocab_size < 256 + len(BPE_SPECIALS):
    raise TokenizerError(f"--vocab_size={vocab_size} must be >= {256 + len(BPE_SPECIALS)} "
                         "(256 byte symbols + BOS/EOS/PAD)")
  tk = tokenizers.Tokenizer(models.BPE())
  tk.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)
  tk.decoder = decoders.ByteLevel()
  trainer = trainers.BpeTrainer(
      vocab_size=vocab_size, min_frequency=min_frequency, special_tokens=list(BPE_SPECIALS),
      initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False)
  tk.train_from_iterator(texts, trainer=trainer)
  os.makedirs(out_dir, exist_ok=True)
  path = os.path.join(out_dir, "tokenizer.json")
  tk.save(path)
  return HFTokenizer(tk, f"bpe:{out_dir}")


def check_vocab(tokenizer: Tokenizer, vocab_size: int, where: str) -> None:
  """Raises one line when a model/checkpoint vocabulary does not fit the tokenizer."""
  if vocab_size != tokenizer.vocab_size:
    raise TokenizerError(f"{where} has vocab size {vocab_size} but data.tokenizer="
                         f"{tokenizer.name!r} has {tokenizer.vocab_size}; use the tokenizer it "
                         "was trained with")
