"""A run's copy of its tokenizer reads back as the same tokenizer: ids, special tokens, name and
fingerprint (a Hugging Face file with declared specials, SentencePiece, bytes); a missing or
damaged copy is none."""

from __future__ import annotations

import json

import numpy as np
import sentencepiece as spm

from ttt_jax.data.saved_tokenizer import RECORD, load_saved_tokenizer, save_tokenizer
from ttt_jax.data.tokenizers import ByteTokenizer, get_tokenizer

TEXT = "some words here and there, again and again"


def same(a, b) -> None:
  assert (a.name, a.fingerprint(), a.vocab_size) == (b.name, b.fingerprint(), b.vocab_size)
  assert (a.bos_id, a.eos_id, a.pad_id, a.stop_ids, a.add_bos, a.chat_template) == (
      b.bos_id, b.eos_id, b.pad_id, b.stop_ids, b.add_bos, b.chat_template)
  assert np.array_equal(a.encode(TEXT), b.encode(TEXT))


def test_a_tokenizers_file_with_declared_specials_reads_back_the_same(tmp_path, word_tokenizer):
  src = tmp_path / "tok"
  src.mkdir()
  word_tokenizer(src, ["<unk>", "<s>", "</s>", *"abcdefghijklmnopqrstuvwxyz ,"], "<unk>")
  (src / "tokenizer_config.json").write_text(json.dumps(
      {"bos_token": "</s>", "eos_token": "<s>", "add_bos_token": False}))
  tok = get_tokenizer(f"hf:{src}")
  save_tokenizer(tok, str(tmp_path / "copy"))
  same(load_saved_tokenizer(str(tmp_path / "copy")), tok)


def test_sentencepiece_and_bytes_read_back_the_same(tmp_path):
  spm.SentencePieceTrainer.train(
      sentence_iterator=iter([TEXT] * 50), model_prefix=str(tmp_path / "m"), vocab_size=40,
      model_type="bpe", byte_fallback=False, minloglevel=2)
  tok = get_tokenizer(f"sp:{tmp_path / 'm.model'}")
  save_tokenizer(tok, str(tmp_path / "sp"))
  same(load_saved_tokenizer(str(tmp_path / "sp")), tok)
  save_tokenizer(ByteTokenizer(), str(tmp_path / "sp"))  # replaces the other one
  same(load_saved_tokenizer(str(tmp_path / "sp")), ByteTokenizer())


def test_a_missing_or_damaged_copy_is_none(tmp_path, word_tokenizer):
  assert load_saved_tokenizer(str(tmp_path / "none")) is None
  word_tokenizer(tmp_path, ["<unk>", *"abc"], "<unk>")
  save_tokenizer(get_tokenizer(f"hf:{tmp_path}/tokenizer.json"), str(tmp_path / "copy"))
  (tmp_path / "copy" / "tokenizer.json").write_text("{")
  assert load_saved_tokenizer(str(tmp_path / "copy")) is None
  (tmp_path / "copy" / RECORD).write_text("[]")
  assert load_saved_tokenizer(str(tmp_path / "copy")) is None
