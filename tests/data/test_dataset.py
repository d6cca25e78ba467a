"""`Dataset`: config.data resolved once and handed to every entry point (train, evaluate,
generate, adapt); its windows and samples are the pipeline's windows."""

import collections
import json

import numpy as np
import pytest

from ttt_jax.config import ConfigError, build_config
from ttt_jax.data import dataset as dataset_lib
from ttt_jax.data import pipeline, prepare, sources
from ttt_jax.data.dataset import Dataset
from ttt_jax.data.tokenizers import ByteTokenizer
from ttt_jax.eval import perplexity, tlm_run
from ttt_jax.eval.generate import generate_text
from ttt_jax.eval.tlm import default_config as tlm_default_config
from ttt_jax.runs.load import load_run
from ttt_jax.train.loop import train_and_evaluate


@pytest.fixture(scope="module")
def folders(tmp_path_factory):
  """(raw folder, the same folder prepared): 40 documents of 60-400 bytes."""
  root = tmp_path_factory.mktemp("docs")
  raw = root / "raw"
  raw.mkdir()
  for i in range(40):
    (raw / f"d{i:02d}.txt").write_text(" ".join(f"word{i}_{j}" for j in range(6 + 5 * i)))
  prep = root / "prep"
  prepare.prepare(str(raw), str(prep), val_fraction=0.3, num_shards=2, echo=lambda s: None)
  return raw, prep


def data_config(source, seq_len=32, **kw):
  c = build_config(f"model=swa,scale=tiny,ctx={seq_len}").data
  c.source, c.val_fraction = str(source), 0.3
  for k, v in kw.items():
    c[k] = v
  return c


def test_from_config_resolves_source_and_tokenizer(folders):
  raw, prep = folders
  r, p = Dataset.from_config(data_config(raw)), Dataset.from_config(data_config(prep))
  assert (r.kind, r.prepared) == ("folder", None) and isinstance(r.tokenizer, ByteTokenizer)
  assert p.kind == "prepared" and p.prepared.root == str(prep) and p.vocab_size == 259
  assert Dataset.from_config(data_config("embedded")).kind == "embedded"
  with pytest.raises(ConfigError, match="no such file or folder"):
    Dataset.from_config(data_config(raw / "missing"))
  with pytest.raises(ConfigError, match="data.tokenizer='nope'"):
    Dataset.from_config(data_config(raw, tokenizer="nope"))


def test_prepared_and_raw_give_the_same_windows_and_samples(folders):
  raw, prep = folders
  r, p = Dataset.from_config(data_config(raw)), Dataset.from_config(data_config(prep))
  for split in sources.SPLITS:
    assert sorted(r.stream(split).names) == sorted(p.stream(split).names)
    np.testing.assert_array_equal(np.sort(r.doc_lengths(split)), np.sort(p.doc_lengths(split)))
    samples = r.samples(split, 32)
    src = r.window_source(split, 32)
    assert samples.dtype == np.int32 and samples.shape == (len(src), 33)
    for i in (0, len(src) - 1):
      np.testing.assert_array_equal(samples[i], src[i]["tokens"])
    # windows tile the stream: sample i is stream[32 i : 32 i + 33]
    tokens = r.stream(split).tokens
    np.testing.assert_array_equal(samples[1], tokens[32:65])
  assert p.samples("validation", 10_000).shape == (0, 10_001)  # shorter than one window


def test_streams_are_shared_by_what_they_resolve_to(folders):
  raw, prep = folders
  a, b = Dataset.from_config(data_config(raw)), Dataset.from_config(data_config(raw, seq_len=64))
  assert a.stream("train") is b.stream("train")  # one tokenization per process
  assert Dataset.from_config(data_config(raw, val_fraction=0.5)).stream("train") is not \
      a.stream("train")


def tiny_run_config(source, steps=2):
  c = build_config("model=swa,scale=tiny,ctx=32")
  c.model.num_layers, c.model.d_model, c.model.num_heads = 1, 32, 2
  c.model.intermediate_size, c.model.window = 64, 16
  c.data.source, c.data.val_fraction, c.data.batch_size = str(source), 0.3, 2
  c.train.steps, c.train.warmup_steps, c.train.eval_every, c.train.eval_batches = steps, 1, steps, 1
  c.eval.chunk, c.eval.max_docs = 32, 2
  return c


def test_every_entry_point_resolves_the_data_config_once(folders, tmp_path, monkeypatch):
  """A training run, then evaluate / generate / adapt on its checkpoint: each looks at the
  source (folder kind, prepared metadata) and loads the tokenizer exactly once."""
  _, prep = folders
  calls = collections.Counter()

  def counted(name, fn):
    def wrapper(*args, **kwargs):
      calls[name] += 1
      return fn(*args, **kwargs)
    return wrapper

  monkeypatch.setattr(sources, "source_kind", counted("source_kind", sources.source_kind))
  monkeypatch.setattr(dataset_lib, "get_tokenizer",
                      counted("get_tokenizer", dataset_lib.get_tokenizer))
  monkeypatch.setattr(dataset_lib, "PreparedData",
                      counted("PreparedData", dataset_lib.PreparedData))
  workdir = str(tmp_path / "run")
  out = train_and_evaluate(tiny_run_config(prep), workdir, echo=lambda s: None)
  assert out["trainer"].data.prepared is not None and np.isfinite(out["val"]["loss"])
  assert calls == {"source_kind": 1, "get_tokenizer": 1, "PreparedData": 1}, calls

  calls.clear()
  run = load_run(workdir)
  res = perplexity.evaluate_run(run, [32], progress=False, echo=None)
  text = generate_text(run, "word1", 5, progress=False)
  assert res["contexts"][0]["docs"] >= 1 and isinstance(text, str)
  assert calls == {"source_kind": 1, "get_tokenizer": 1, "PreparedData": 1}, calls

  calls.clear()
  (tmp_path / "new.txt").write_text(" ".join(f"novel{j}" for j in range(200)))
  report = tlm_run.adapt_workdir(workdir, str(tmp_path / "new.txt"), tlm_run_config(),
                                 echo=lambda s: None)
  assert report["num_original_samples"] > 0
  assert calls == {"source_kind": 1, "get_tokenizer": 1, "PreparedData": 1}, calls


def tlm_run_config():
  c = tlm_default_config()
  c.seq_len, c.steps, c.original_samples, c.eval_batch_size = 32, 1, 2, 2
  c.log_p0 = 0.0
  return c


def test_window_helpers_are_the_pipeline_s():
  tokens = np.arange(100, dtype=np.int32)
  src = pipeline.WindowSource(tokens, 16)
  stacked = pipeline.stack_windows(src)
  assert stacked.shape == (6, 17)
  np.testing.assert_array_equal(stacked[2], tokens[32:49])
  np.testing.assert_array_equal(pipeline.stack_windows(src, [5, 0]), stacked[[5, 0]])
  docs = [("a", "x" * 40), ("b", "y" * 50)]
  samples = tlm_run.text_samples(docs, ByteTokenizer(), 16)
  stream = pipeline.build_stream(docs, ByteTokenizer())
  np.testing.assert_array_equal(samples, pipeline.stack_windows(
      pipeline.WindowSource(stream.tokens, 16)))


def test_binary_files_in_a_text_folder_are_counted_in_one_warning(tmp_path, capsys):
  """A folder whose .txt files are binary trains on U+FFFD text: one warning on stderr says how
  many documents were not UTF-8; a clean folder (and the embedded corpus) says nothing."""
  rng = np.random.default_rng()
  for i in range(3):
    (tmp_path / f"blob{i}.txt").write_bytes(bytes(rng.integers(128, 256, 400, dtype=np.uint8)))
  (tmp_path / "ok.txt").write_text("plain text " * 50)
  c = build_config("model=swa,ctx=64")
  c.data.source = str(tmp_path)
  Dataset.from_config(c.data).stream("all")
  err = capsys.readouterr().err
  assert err.count("\n") == 1 and "3 of 4 documents are not valid UTF-8" in err, err
  c.data.source = "embedded"
  Dataset.from_config(c.data).stream("train")
  assert capsys.readouterr().err == ""


def test_no_validation_documents_suggests_a_larger_fraction(tmp_path):
  """The hint raises data.val_fraction from the value set (doubled, at least 0.05), never
  repeating it; from 0.25 up it asks for more documents instead."""
  (tmp_path / "d.jsonl").write_text("\n".join(json.dumps({"text": f"doc {i} " * 50})
                                              for i in range(2)) + "\n")
  c = build_config("model=swa,scale=tiny,ctx=64")
  c.data.source = str(tmp_path / "d.jsonl")
  for given, hint in ((0.001, "e.g. --config.data.val_fraction=0.05"),
                      (0.1, "e.g. --config.data.val_fraction=0.2"),
                      (0.25, "add documents to data.source")):
    c.data.val_fraction = given
    message = Dataset.from_config(c.data).empty_split_message("validation")
    assert f"at data.val_fraction={given} " in message and message.endswith(hint), message
  c.data.val_fraction = 0.001  # how the check reports it
  with pytest.raises(ConfigError, match=r"e.g. --config.data.val_fraction=0.05$"):
    Dataset.from_config(c.data).check_splits(c.data.seq_len, c.data.batch_size)
