"""Reading curves: equal to the bucketed one-shot NLL for every mixer, constant state for
SWA / TTT / E2E (a fixed KV capacity for full attention, documents truncated to it), documents
below --min_len reported, the slope, and scripts/read.py end to end on a trained run."""

from __future__ import annotations

import json
import math
import pathlib

import jax
import numpy as np
import pytest
from flax import nnx

from ttt_jax.config import ConfigError
from ttt_jax.data.dataset import Dataset
from ttt_jax.eval import perplexity as P
from ttt_jax.eval import reading as R
from ttt_jax.eval import stream as S
from ttt_jax.models import build_model
from ttt_jax.runs.load import Run

from ..repo_files import load_file

FIRST = 8


def script(name: str):
  """scripts/<name>.py as a module (scripts/ is not a package)."""
  return load_file(f"scripts/{name}.py")


@pytest.fixture
def random_run(run_config, texts, tmp_path):
  """`random_run(kind)`: a `Run` of `texts` with random tiny weights (no checkpoint), inner
  mini-batches of 8 (TTT) / 16 (E2E)."""
  return lambda kind: make_random_run(run_config(texts, kind), str(tmp_path / kind))


def make_random_run(c, workdir: str) -> Run:
  kind = c.model.kind
  m = c.model
  m.init_std, m.ttt.mini_batch_size = 0.2, 8
  if kind == "e2e":
    m.num_layers = 2
    m.e2e.mini_batch_size, m.e2e.suffix_len, m.e2e.prime_intermediate_size = 16, 1, 64
    m.e2e.ilr_init = m.e2e.inner_lr = 0.5  # a visible inner step while reading
  graphdef, state = nnx.split(build_model(m, seed=1))
  return Run(workdir, 0, c, graphdef, nnx.to_pure_dict(state), Dataset.from_config(c.data))


def reference_buckets(graphdef, params, docs, first):
  """Per-bucket mean of the one-shot NLL over documents of different lengths. Each document is
  padded with random tokens to a multiple of 16 (whole TTT / E2E mini-batches) and only its own
  positions are kept, so the padding must not matter (causality)."""
  longest = max(len(t) - 1 for t in docs)
  edges = P.bucket_edges(longest, first)
  sums, counts = np.zeros(len(edges) - 1), np.zeros(len(edges) - 1)
  rng = np.random.default_rng(5)
  for tokens in docs:
    n = len(tokens) - 1
    pad = rng.integers(0, 256, -(-n // 16) * 16 - n)
    nll = P.one_shot_nll(graphdef, params, np.concatenate([tokens, pad])[None])[0, :n]
    for k, (lo, hi) in enumerate(zip(edges[:-1], edges[1:], strict=True)):
      sums[k] += nll[lo:hi].astype(np.float64).sum()
      counts[k] += max(0, min(hi, n) - lo)
  return sums / counts, counts


@pytest.mark.parametrize("kind", ["swa", "ttt_linear", "e2e", "transformer"])
def test_reading_curve_equals_bucketed_one_shot_nll(kind, random_run):
  run = random_run(kind)
  rng = np.random.default_rng(0)
  docs = [np.concatenate([[256], rng.integers(0, 256, n)]).astype(np.int32) for n in (100, 71)]
  out = R.read_documents(run.graphdef, run.params, run.config.model,
                         [(f"d{i}", d) for i, d in enumerate(docs)], chunk=32,
                         first_bucket=FIRST, progress=False)
  means, counts = reference_buckets(run.graphdef, run.params, docs, FIRST)
  got = np.array([b["mean_nll"] for b in out["buckets"]])
  assert [b["tokens"] for b in out["buckets"]] == counts.tolist()
  assert [(b["start"], b["end"]) for b in out["buckets"]] == [(0, 8), (8, 16), (16, 32),
                                                             (32, 64), (64, 100)]
  assert [b["docs"] for b in out["buckets"]] == [2, 2, 2, 2, 2]
  assert np.abs(got - means).max() / np.abs(means).max() < 1e-5, kind
  assert out["tokens"] == 171 and [d["tokens"] for d in out["documents"]] == [100, 71]
  assert out["kv_capacity"] == (128 if kind == "transformer" else None)  # 100 -> 4 chunks


def test_state_does_not_grow_with_the_document(random_run, monkeypatch):
  """Every document's cache has the same bytes (SWA / TTT / E2E: whatever their length; full
  attention: the fixed KV capacity), the state of SWA / TTT / E2E does not grow with the capacity
  asked for (full attention's does); what is kept across positions is O(buckets)."""
  made = []

  def recording_init_cache(graphdef, params, batch, capacity, **kw):
    cache = init_cache(graphdef, params, batch, capacity, **kw)
    made.append(sum(x.nbytes for x in jax.tree.leaves(cache)))
    return cache

  init_cache = S.init_cache
  monkeypatch.setattr(S, "init_cache", recording_init_cache)
  rng = np.random.default_rng(1)
  docs = [(f"d{n}", np.concatenate([[256], rng.integers(0, 256, n)]).astype(np.int32))
          for n in (64, 2048)]
  for kind in ("swa", "ttt_linear", "e2e", "transformer"):
    made.clear()
    run = random_run(kind)
    out = R.read_documents(run.graphdef, run.params, run.config.model, docs, chunk=64,
                           first_bucket=FIRST, capacity=2048, progress=False)
    assert len(made) == 2 and made[0] == made[1], (kind, made)
    assert all(set(d) == {"name", "tokens", "mean_nll"} for d in out["documents"])
    # the state itself: the same bytes at a capacity of 64 tokens and of 1M (full attention's
    # KV cache grows with it); shapes only, nothing allocated
    nbytes = [sum(x.size * x.dtype.itemsize for x in jax.tree.leaves(jax.eval_shape(
        lambda p, c=cap, g=run.graphdef: nnx.merge(g, p).init_cache(1, c), run.params)))
        for cap in (64, 1 << 20)]
    assert (nbytes[0] == nbytes[1]) == (kind != "transformer"), (kind, nbytes)
    assert nbytes[0] > 0
  sums = R.PositionSums(P.bucket_edges(1 << 20, FIRST))  # a 1M-token document: 18 buckets
  assert sums.nll.shape == sums.tokens.shape == sums.docs.shape == (18,)


def test_full_attention_truncates_to_capacity_and_short_documents_are_reported(
    random_run, texts, text_docs):
  """The run reads `texts` (--data, split all); book.txt is its first long document."""
  run = random_run("transformer")
  lines = []
  res = R.read_run(run, data=str(texts), min_len=500, capacity=1000, progress=False,
                   echo=lines.append)
  lengths = {n: len(t.encode()) + 1 for n, t in text_docs.items()}  # positions: text + EOS
  short = [v for v in lengths.values() if v < 500]
  assert (res["source"], res["split"]) == (str(texts), "all")
  assert res["skipped_short"] == len(short) and res["longest_skipped"] == max(short)
  assert res["docs"] == min(4, sum(v >= 500 for v in lengths.values()))  # eval.max_docs 4
  assert res["documents"][0] == {**res["documents"][0], "name": "book.txt", "tokens": 1000}
  assert res["truncated_to_capacity"] == 1 and res["kv_capacity"] == 1024
  assert any("truncated to the KV capacity 1,000" in s for s in lines), lines
  assert any(f"skipped {len(short)} documents shorter than 500" in s for s in lines), lines
  longest = lengths["book.txt"]
  with pytest.raises(ConfigError, match=f"none of the documents .* longest has {longest}"):
    R.read_run(run, data=str(texts), min_len=10_000, progress=False, echo=None)
  res = R.read_run(run, data=str(texts), min_len=500, max_len=100, capacity=1000,
                   progress=False, echo=None)
  assert res["docs"] == min(4, sum(v >= 500 for v in lengths.values()))  # selected by min_len
  assert {d["tokens"] for d in res["documents"]} == {100} and res["truncated_to_capacity"] == 0


def test_reading_slope_and_lengths():
  buckets = [{"start": 0, "end": 8, "mean_nll": 9.0}]
  assert R.reading_slope(buckets) is None
  for lo in (8, 16, 32, 64):
    buckets.append({"start": lo, "end": 2 * lo, "mean_nll": 3.0 - 0.25 * math.log2(lo)})
  assert R.reading_slope(buckets) == pytest.approx(-0.25)
  assert [R.parse_length(x) for x in ("4096", "64k", "1m")] == [4096, 65536, 1 << 20]
  with pytest.raises(Exception, match="expected a length"):
    R.parse_length("lots")


def test_read_script_end_to_end(trained_run, texts, text_docs, capsys):
  """scripts/read.py on a trained run: the book of the folder, its table, JSON and PNGs, and the
  overlay of --compare."""
  read = script("read")
  read.main(["--workdir", trained_run, "--data", str(texts), "--min_len", "1k", "--no_progress",
             "--compare", trained_run])
  out = capsys.readouterr().out
  assert f"1 document of {texts} (all)" in out and "reading slope:" in out
  eval_dir = pathlib.Path(trained_run) / "eval"
  res = json.loads((eval_dir / "reading.json").read_text())
  assert res["docs"] == 1 and res["documents"][0]["name"] == "book.txt"
  book = len(text_docs["book.txt"]) + 1
  assert res["skipped_short"] == len(text_docs) - 1 and res["tokens"] == book
  assert res["buckets"][-1]["end"] == book and np.isfinite(res["mean_nll"])
  assert isinstance(res["reading_slope"], float)
  both = json.loads((eval_dir / "compare_reading.json").read_text())
  assert len(both) == 2 and both[0]["buckets"] == both[1]["buckets"]
  for png in ("reading.png", "compare_reading.png"):
    assert (eval_dir / png).stat().st_size > 1000
