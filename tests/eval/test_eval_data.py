"""Evaluation on any text (`--data`): every source kind through `Dataset.with_source` with the
run's tokenizer, the 'all' split, a prepared folder of another tokenizer refused in one line,
documents too short reported, and scripts/evaluate.py --data end to end on a trained run."""

from __future__ import annotations

import json
import pathlib

import numpy as np
import pytest

from ttt_jax.config import ConfigError
from ttt_jax.data import prepare
from ttt_jax.data.dataset import Dataset
from ttt_jax.data.pipeline import TokenStream
from ttt_jax.data.tokenizers import ByteTokenizer
from ttt_jax.eval import perplexity as P
from ttt_jax.eval import plots
from ttt_jax.runs.load import load_run

from ..repo_files import load_file


@pytest.fixture(scope="module")
def run_data(run_config, tmp_path_factory) -> Dataset:
  """The resolved data of a run trained on other text (its own folder)."""
  own = tmp_path_factory.mktemp("own")
  (own / "a.txt").write_text("x " * 100)
  return Dataset.from_config(run_config(own).data)


def by_name(stream) -> dict[str, np.ndarray]:
  starts, lengths = stream.doc_starts, stream.doc_lengths
  return {n: stream.tokens[s:s + k] for n, s, k in zip(stream.names, starts, lengths,
                                                          strict=True)}


def test_every_source_kind_with_the_run_tokenizer(run_data, texts, text_docs, tmp_path):
  """folder, .jsonl, prepared and embedded sources give the documents' byte tokens; 'all' is
  train + validation (split by the run's data.val_fraction)."""
  tok = ByteTokenizer()
  folder = run_data.with_source(str(texts))
  assert (folder.kind, folder.flag, folder.tokenizer) == ("folder", "--data", run_data.tokenizer)
  every = by_name(folder.stream("all"))
  assert sorted(every) == sorted(text_docs)
  for name, text in text_docs.items():
    np.testing.assert_array_equal(every[name][1:-1], tok.encode(text))
  parts = [set(folder.stream(s).names) for s in ("train", "validation")]
  assert parts[0] | parts[1] == set(every) and not parts[0] & parts[1] and parts[1]

  jsonl = tmp_path / "docs.jsonl"
  jsonl.write_text("".join(json.dumps({"text": text_docs[n]}) + "\n" for n in sorted(text_docs)))
  lines = run_data.with_source(str(jsonl))
  assert lines.kind == "jsonl"
  assert sorted(map(len, by_name(lines.stream("all")).values())) == sorted(map(len, every.values()))

  prep = tmp_path / "prep"
  prepare.prepare(str(texts), str(prep), val_fraction=0.3, num_shards=2, echo=lambda s: None)
  prepared = run_data.with_source(str(prep))
  assert prepared.kind == "prepared"
  got = by_name(prepared.stream("all"))
  assert sorted(got) == sorted(every)
  for name in every:
    np.testing.assert_array_equal(got[name], every[name])
  assert len(prepared.doc_lengths("all")) == len(every)

  embedded = run_data.with_source("embedded")
  assert embedded.kind == "embedded" and len(embedded.stream("validation").names) > 5


def test_prepared_folder_of_another_tokenizer_is_refused(run_data, texts, tmp_path):
  prep = tmp_path / "bpe"
  prepare.prepare(str(texts), str(prep), val_fraction=0.3, num_shards=1, train_tokenizer="bpe",
                  vocab_size=300, echo=lambda s: None)
  with pytest.raises(ConfigError) as err:
    run_data.with_source(str(prep))
  message = str(err.value)
  assert "\n" not in message and f"--data {str(prep)!r} was prepared with the tokenizer" in message
  assert "not the run's 'bytes'" in message


def test_bad_sources_name_data(run_data, tmp_path):
  with pytest.raises(ConfigError, match="--data=.*no such file or folder"):
    run_data.with_source(str(tmp_path / "nope"))
  (tmp_path / "notes.csv").write_text("a,b\n")
  with pytest.raises(ConfigError, match="--data=.*is a file that is not .jsonl"):
    run_data.with_source(str(tmp_path / "notes.csv"))
  (tmp_path / "empty").mkdir()
  (tmp_path / "empty" / "x.txt").write_text("   ")
  with pytest.raises(ConfigError, match=r"--data .* has no non-empty documents \(a folder is read "
                     r"for .txt/.md/.py/.rst files below it\)$"):
    run_data.with_source(str(tmp_path / "empty")).stream("all")
  (tmp_path / "licences").mkdir()  # files without a text suffix are not read
  (tmp_path / "licences" / "Apache-2.0").write_text("Licensed under the Apache License")
  with pytest.raises(ConfigError, match=r"has no non-empty documents \(a folder is read for"):
    run_data.with_source(str(tmp_path / "licences")).stream("all")
  (tmp_path / "one").mkdir()
  (tmp_path / "one" / "note00.txt").write_text("only a train document")
  with pytest.raises(ConfigError, match="has no validation documents; --split all reads every"):
    run_data.with_source(str(tmp_path / "one")).stream("validation")


def test_short_documents_are_reported():
  stream = TokenStream(np.arange(10 + 40 + 25 + 70, dtype=np.int32),
                         np.array([0, 10, 50, 75]), ("a", "b", "c", "d"))
  docs = P.select_documents(stream, 32, 8)
  assert docs.names == ("b", "d") and (docs.skipped_short, docs.longest_skipped) == (2, 25)
  # only the short documents the selection passed over: not "c", after the one selected
  docs = P.select_documents(stream, 32, 1)
  assert docs.names == ("b",) and (docs.skipped_short, docs.longest_skipped) == (1, 10)
  with pytest.raises(ConfigError, match=r"no document of --data x \(--split all\) has 101"):
    P.select_documents(stream, 100, 8, "--data x (--split all)")


def test_evaluate_script_with_data(trained_run, texts, text_docs, capsys):
  """scripts/evaluate.py --data on a trained run: the folder's documents (all of them by default,
  the run's validation ones with --split validation), source and split recorded and printed, and
  --compare over the same source."""
  evaluate = load_file("scripts/evaluate.py")
  own = pathlib.Path(trained_run) / "eval"
  own_before = (own / "results.json").read_text() if (own / "results.json").exists() else None
  evaluate.main(["--workdir", trained_run, "--data", str(texts), "--ctx", "32,64",
                 "--max_docs", "30", "--no_progress", "--compare", trained_run])
  out = capsys.readouterr().out
  folder = own / f"data-{texts.name}-all"  # other text never replaces the run's own results
  res = json.loads((folder / "results.json").read_text())
  own_after = (own / "results.json").read_text() if (own / "results.json").exists() else None
  assert (folder / "ppl_vs_ctx.png").exists() and own_after == own_before
  lengths = {n: len(t.encode()) + 2 for n, t in text_docs.items()}  # BOS text EOS
  long_enough = sorted(n for n, v in lengths.items() if v >= 65)
  short = [v for v in lengths.values() if v < 65]
  assert (res["source"], res["split"], res["tokenizer"]) == (str(texts), "all", "bytes")
  assert res["documents"] == long_enough
  assert (res["skipped_short"], res["longest_skipped"]) == (len(short), max(short))
  assert f"on {texts} (all)" in out and f"documents of {texts} (all) with >= 65 tokens" in out
  assert f"skipped {len(short)} document{'s' * (len(short) > 1)} shorter than 65" in out
  assert "loss delta vs" in out and "different tokenizers" not in out
  compared = json.loads((folder / "compare.json").read_text())
  assert [r["documents"] for r in compared] == [long_enough, long_enough]

  evaluate.main(["--workdir", trained_run, "--data", str(texts), "--split", "validation",
                 "--ctx", "32", "--no_progress"])
  res = json.loads((own / f"data-{texts.name}-validation" / "results.json").read_text())
  assert json.loads((folder / "results.json").read_text())["split"] == "all"  # kept
  run = load_run(trained_run)
  val = run.data.with_source(str(texts)).stream("validation")
  assert res["split"] == "validation" and set(res["documents"]) <= set(val.names)
  assert "book.txt" not in res["documents"]


def test_compare_warns_about_different_tokenizers():
  runs = [{"workdir": "a", "kind": "swa", "tokenizer": "bytes", "contexts": []},
          {"workdir": "b", "kind": "swa", "tokenizer": "bpe:x", "contexts": []}]
  assert "different tokenizers (bpe:x, bytes)" in plots.tokenizer_warning(runs)
  assert plots.tokenizer_warning(runs[:1]) is None


def test_the_comparison_baseline_is_the_full_attention_run():
  """Asked of the mixer registry (a state that grows with the context), not of a mixer name;
  E2E (an SWA mixer) and unknown mixers are never the baseline."""
  from ttt_jax.eval.plots import baseline_index  # noqa: PLC0415

  runs = [{"kind": "swa", "mixer": "swa"}, {"kind": "e2e", "mixer": "swa"},
          {"kind": "transformer", "mixer": "full"}, {"kind": "ttt_linear", "mixer": "ttt_linear"}]
  assert baseline_index(runs) == 2
  assert baseline_index([runs[0], runs[3]]) == 0  # none: the first run
  assert baseline_index([{"kind": "x", "mixer": "unknown"}, runs[2]]) == 1
