"""Every tokenizer kind round-trips unicode text; a BPE trained on the corpus beats bytes."""

import itertools

import numpy as np
import pytest
import sentencepiece as spm

from ttt_jax.config import ConfigError
from ttt_jax.data import sources
from ttt_jax.data.tokenizers import ByteTokenizer, check_vocab, get_tokenizer, train_bpe

TEXT = ("Grüße aus Köln — naïve café, 東京タワー, emoji 🚀🔥, Ελληνικά, עברית, русский.\n"
        "  indented line\twith tab\n\nmath: ∀x∈ℝ, x² ≥ 0; def f(x):\n    return x**2\n")


def _corpus(n_docs: int):
  return [t for _, t in itertools.islice(sources.embedded_documents("train"), n_docs)]


@pytest.fixture(scope="module")
def bpe_dir(tmp_path_factory):
  out = tmp_path_factory.mktemp("bpe")
  train_bpe(_corpus(40) + [TEXT], 600, str(out))
  return out


@pytest.fixture(scope="module")
def sp_model(tmp_path_factory):
  out = tmp_path_factory.mktemp("sp")
  text = "\n".join(t[:4000] for t in _corpus(30)) + "\n" + TEXT
  spm.SentencePieceTrainer.train(
      sentence_iterator=iter(text.splitlines()), model_prefix=str(out / "m"), vocab_size=400,
      model_type="bpe", byte_fallback=True, normalization_rule_name="identity",
      remove_extra_whitespaces=False, character_coverage=1.0, pad_id=3, minloglevel=2)
  return out / "m.model"


def _round_trip(tok, text):
  ids = tok.encode(text)
  assert ids.dtype == np.int32 and len(ids) > 0
  assert ids.max() < tok.vocab_size and ids.min() >= 0
  assert tok.decode(ids) == text
  # specials are never part of the decoded text
  assert tok.decode(np.concatenate([[tok.bos_id], ids, [tok.eos_id, tok.pad_id]])) == text
  assert len({tok.bos_id, tok.eos_id, tok.pad_id}) == 3
  assert max(tok.bos_id, tok.eos_id, tok.pad_id) < tok.vocab_size


def test_bytes_round_trip():
  tok = get_tokenizer("bytes")
  _round_trip(tok, TEXT)
  assert len(tok.encode(TEXT)) == len(TEXT.encode("utf-8"))


def test_hf_bpe_round_trip_and_specs(bpe_dir):
  for spec in (f"hf:{bpe_dir}/tokenizer.json", f"hf:{bpe_dir}", f"bpe:{bpe_dir}"):
    tok = get_tokenizer(spec)
    _round_trip(tok, TEXT)
    assert tok.vocab_size == 600
    assert (tok.bos_id, tok.eos_id, tok.pad_id) == (0, 1, 2)


def test_hf_tokenizer_without_specials_gets_extra_ids(tmp_path, word_tokenizer):
  path = word_tokenizer(tmp_path, [*"abcdefghijklmnopqrstuvwxyz", "[UNK]"], "[UNK]")
  tok = get_tokenizer(f"hf:{path}")
  assert tok.vocab_size == 27 + 3
  assert sorted((tok.bos_id, tok.eos_id, tok.pad_id)) == [27, 28, 29]


def test_sentencepiece_round_trip(sp_model):
  tok = get_tokenizer(f"sp:{sp_model}")
  _round_trip(tok, TEXT.strip())
  assert tok.vocab_size == 400
  assert "🚀" in tok.decode(tok.encode("🚀"))  # byte fallback


def test_bpe_compresses_embedded_corpus_better_than_bytes(bpe_dir):
  held_out = [t for _, t in itertools.islice(sources.embedded_documents("validation"), 5)]
  bpe, byt = get_tokenizer(f"bpe:{bpe_dir}"), ByteTokenizer()
  n_bpe = sum(len(bpe.encode(t)) for t in held_out)
  n_bytes = sum(len(byt.encode(t)) for t in held_out)
  assert n_bpe < 0.7 * n_bytes


def test_bad_specs_fail_with_one_line(tmp_path):
  for spec in ("gpt9", f"hf:{tmp_path}/missing.json", f"sp:{tmp_path}/missing.model"):
    with pytest.raises(ConfigError) as e:
      get_tokenizer(spec)
    assert "data.tokenizer" in str(e.value) and "\n" not in str(e.value)
  (tmp_path / "bad.model").write_bytes(b"not a model")
  with pytest.raises(ConfigError, match="not a SentencePiece model"):
    get_tokenizer(f"sp:{tmp_path}/bad.model")
  with pytest.raises(ConfigError, match="vocab size 512"):
    check_vocab(ByteTokenizer(), 512, "checkpoint /ckpt")
