"""The `eval` section's keys are the defaults of a loaded run's evaluation: with no argument
given, `strided.evaluate_run` (what scripts/evaluate.py calls) streams with eval.chunk and
eval.batch_size, selects eval.max_docs documents, buckets positions from eval.first_bucket and
adds the strided perplexity when eval.stride > 0; an argument given overrides the key. eval.ctx is
scripts/evaluate.py's default list of context lengths."""

from __future__ import annotations

import json

import pytest

from ttt_jax.eval import perplexity as P
from ttt_jax.eval import strided
from ttt_jax.runs.load import load_run

from ..repo_files import load_file


@pytest.fixture(scope="module")
def calls(trained_run, monkeypatch_module):
  """Loads the tiny trained run; records the keyword arguments of every evaluate_model call."""
  seen: list[dict] = []
  real = P.evaluate_model

  def recording(*args, **kwargs):
    seen.append(kwargs)
    return real(*args, **kwargs)

  monkeypatch_module.setattr(P, "evaluate_model", recording)
  return load_run(trained_run), seen


@pytest.fixture(scope="module")
def monkeypatch_module():
  with pytest.MonkeyPatch.context() as mp:
    yield mp


def test_the_eval_keys_are_the_defaults_and_arguments_override_them(calls):
  run, seen = calls
  ev = run.config.eval
  ev.chunk, ev.batch_size, ev.max_docs, ev.first_bucket, ev.stride = 16, 3, 2, 4, 0
  res = strided.evaluate_run(run, [32, 64], progress=False, echo=None)
  assert (res["chunk"], res["max_docs"]) == (16, 2) and "strided" not in res
  assert (seen[-1]["chunk"], seen[-1]["batch_size"], seen[-1]["first_bucket"]) == (16, 3, 4)
  edges = [b["start"] for b in res["position_buckets"]["buckets"]]
  assert edges[:3] == P.bucket_edges(64, 4)[:3] == [0, 4, 8], edges
  # eval.stride > 0: the strided perplexity is added at each length
  ev.stride = 16
  res = strided.evaluate_run(run, [32, 64], progress=False, echo=None)
  assert [c["ctx"] for c in res["strided"]["contexts"]] == [32, 64]
  assert res["strided"]["stride"] == 16
  # arguments win over the keys
  ev.stride = 0
  res = strided.evaluate_run(run, [32, 64], chunk=32, batch_size=2, max_docs=3, progress=False,
                             echo=None)
  assert (res["chunk"], res["max_docs"]) == (32, 3)
  assert (seen[-1]["chunk"], seen[-1]["batch_size"]) == (32, 2)


def test_eval_ctx_is_the_evaluate_scripts_default_lengths(trained_run, tmp_path):
  """Without --ctx, evaluate.py measures the run's eval.ctx lengths (the tiny run's "32,64");
  --ctx replaces them."""
  module = load_file("scripts/evaluate.py")
  assert load_run(trained_run).config.eval.ctx == "32,64"
  for argv, want in (([], [32, 64]), (["--ctx", "64"], [64])):
    out = tmp_path / "_".join(argv or ["default"])
    module.main(["--workdir", trained_run, "--out", str(out), "--no_progress", *argv])
    res = json.loads((out / "results.json").read_text())
    assert [c["ctx"] for c in res["contexts"]] == want
