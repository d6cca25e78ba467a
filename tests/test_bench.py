"""Smoke test of the benchmark: every section at toy sizes, the JSON and report it writes."""

from __future__ import annotations

import json
import os
import time

import numpy as np
import pytest

from ttt_jax.benchmarks import reproduce, training
from ttt_jax.benchmarks import run as bench_run
from ttt_jax.benchmarks.common import PRESETS, SECTIONS, interleaved, machine_info
from ttt_jax.benchmarks.report import NOTES_BEGIN, NOTES_END, write_report
from ttt_jax.benchmarks.reproduce_report import write_reproduction
from ttt_jax.config import ConfigError
from ttt_jax.train.flops import attended_keys

pytestmark = pytest.mark.extended  # the benchmark's own tests


@pytest.fixture(scope="module")
def bench(tmp_path_factory):
  out = str(tmp_path_factory.mktemp("bench"))
  args = bench_run.build_parser().parse_args([
      "--quick", "--out_dir", out, "--sections", ",".join(SECTIONS),
      "--kinds", "transformer,e2e-pretrain,e2e-meta", "--stream_kinds", "transformer,swa,e2e",
      "--ttt_layers", "ttt_linear"])
  results = bench_run.run(args, echo=lambda s: None)
  return out, results


def _positive(d: dict, *keys):
  for k in keys:
    assert d[k] > 0, (k, d)


def test_writes_json_markdown_and_figures(bench):
  out, results = bench
  with open(os.path.join(out, "benchmarks.md")) as f:
    md = f.read()
  for title in ("Matmul ceiling", "Training step", "dual vs primal", "remat through time",
                "Prefill latency", "Decode latency", "Peak memory"):
    assert title in md
  # each kind's row of the training table shows that kind's measured throughput
  (entry,) = results["machines"].values()
  table = md.split("### Training step", 1)[1].split("###", 1)[0]
  rows = {line.split("|")[1].strip(): line for line in table.splitlines() if line.startswith("| ")}
  for kind, r in entry["sections"]["train"]["kinds"].items():
    assert f"| {r['tokens_per_s']:,.0f} |" in rows[kind], (kind, rows[kind])
  pngs = [n for n in os.listdir(out) if n.endswith(".png")]
  assert {p.rsplit("_", 1)[1] for p in pngs} >= {"train.png", "prefill.png", "decode.png",
                                                 "memory.png"}


def test_report_from_the_json_keeps_notes_block(bench):
  """The JSON on disk holds everything the report shows (--merge and hand re-renders start from
  it): the report rendered from the file read back is the one written, plus the notes kept."""
  out, _ = bench
  path = os.path.join(out, "benchmarks.md")
  with open(path) as f:
    before = f.read()
  notes = NOTES_BEGIN + "\nbefore/after: 2x\n"
  with open(path, "w") as f:
    f.write(before.replace(NOTES_BEGIN + "\n", notes))
  with open(os.path.join(out, "benchmarks.json")) as f:
    write_report(json.load(f), out)
  with open(path) as f:
    text = f.read()
  assert f"{NOTES_BEGIN}\nbefore/after: 2x\n{NOTES_END}" in text
  assert text.replace(notes, NOTES_BEGIN + "\n") == before
  assert text.count("## cpu-") + text.count("## gpu") + text.count("## cuda") >= 1


def test_sections_have_positive_numbers(bench):
  _, results = bench
  (entry,) = results["machines"].values()
  assert entry["machine"]["cores"] > 0 and entry["machine"]["jax"]
  sec = entry["sections"]
  for r in sec["matmul"].values():
    _positive(r, "median_s", "flops_per_s")
  for r in sec["train"]["kinds"].values():
    _positive(r, "params", "tokens_per_s", "mfu", "median_s", "model_flops_per_token")
    _positive(r["memory"], "peak_bytes", "temp_bytes")
  kinds = sec["train"]["kinds"]
  quick = PRESETS["quick"]
  for r in kinds.values():
    assert r["tokens_per_step"] == quick.batch * quick.seq_len
  # the meta step really runs the inner loop (second order) and pretrain really does not: XLA
  # counts more work (a deterministic compile-time count; the two used to be the same program).
  # XLA counts a scan body once, not per chunk, so the ratio understates the real one.
  assert kinds["e2e-meta"]["xla_flops_per_step"] > 1.1 * kinds["e2e-pretrain"]["xla_flops_per_step"]
  # the counted matmul FLOPs take every chunk: the meta step's second-order work shows as fully
  # as in XLA's own count of the whole program, elementwise work included (measured 1.6667
  # against XLA's 1.6669 at the quick preset: the same to 1e-3);
  # no kind does less than its model FLOPs (6N per token + attention: the least work a step is)
  counted = {k: r["counted_flops_per_step"] for k, r in kinds.items()}
  counted_ratio = counted["e2e-meta"] / counted["e2e-pretrain"]
  assert counted_ratio > 1.5 and counted_ratio >= 0.999 * (
      kinds["e2e-meta"]["xla_flops_per_step"] / kinds["e2e-pretrain"]["xla_flops_per_step"])
  for k, r in kinds.items():
    assert counted[k] >= r["model_flops_per_token"] * r["tokens_per_step"], k
  impls = sec["ttt_impl"]["impls"]
  for r in impls.values():
    _positive(r, "median_s")
  (primal,) = [r for k, r in impls.items() if "primal" in k]
  (dual,) = [r for k, r in impls.items() if "dual" in k]
  # two different programs are timed: the primal form forms a W per token, more FLOPs
  assert primal["xla_flops"] > 1.1 * dual["xla_flops"]
  mem = sec["ttt_memory"]["layers"]["ttt_linear"]
  for row in mem.values():
    _positive(row["remat"], "peak_bytes")
    _positive(row["no_remat"], "peak_bytes")
  # Remat through time keeps fewer per-mini-batch residuals than a plain scan.
  longest = mem[str(max(int(t) for t in mem))]
  assert longest["remat"]["peak_bytes"] < longest["no_remat"]["peak_bytes"]
  stream = sec["streaming"]
  for kind, r in stream["kinds"].items():
    for n in stream["lengths"]:
      _positive(r[str(n)]["prefill"], "per_token_s")
      _positive(r[str(n)]["decode"], "per_token_s")
      _positive(r[str(n)]["memory"], "peak_bytes", "cache_bytes")
    assert stream["ratios"]["prefill"][kind]["longest_over_shortest"] > 0
  # Carried state: full attention's KV grows with the context, the others' state does not.
  lo, hi = (str(n) for n in stream["lengths"])
  mem = {k: (r[lo]["memory"]["cache_bytes"], r[hi]["memory"]["cache_bytes"])
         for k, r in stream["kinds"].items()}
  # full attention: K and V rows (float32) of every layer for each token added to the context
  # (+ at most 8 bytes of bookkeeping per token); counted from the model's sizes
  per_token = (mem["transformer"][1] - mem["transformer"][0]) / (int(hi) - int(lo))
  kv = 2 * quick.num_layers * quick.d_model * 4
  assert kv <= per_token <= kv + 8, (per_token, kv)
  for kind in ("swa", "e2e"):
    assert mem[kind][0] == mem[kind][1]


def test_attended_keys_matches_counting():
  for t, w in ((10, None), (10, 3), (7, 7), (9, 20)):
    count = sum(min(i + 1, w or t) for i in range(t)) / t
    assert attended_keys(t, w) == pytest.approx(count)


def test_interleaved_times_until_the_result_is_ready():
  """A jitted call returns before its result exists (asynchronous dispatch): the timer must wait
  for the result, so one that becomes ready 30 ms after the call returns times >= 30 ms."""
  class Pending:
    def block_until_ready(self):
      time.sleep(0.03)
      return self

  times = interleaved({"pending": Pending, "ready": lambda: None}, repeats=2, warmup=0,
                      echo=lambda s: None)
  assert times["pending"]["min_s"] >= 0.03
  assert times["ready"]["max_s"] < 0.03


def test_interleaved_runs_round_robin():
  calls = []
  times = interleaved({"a": lambda: calls.append("a"), "b": lambda: calls.append("b")},
                      repeats=3, warmup=1, echo=lambda s: None)
  assert calls == ["a", "b"] * 4
  assert times["a"]["runs"] == 3 and times["b"]["median_s"] >= 0


def test_bad_flags_fail_with_one_line():
  parse = bench_run.build_parser().parse_args
  with pytest.raises(ConfigError, match="--sections"):
    bench_run.resolve(parse(["--quick", "--sections", "train,bogus"]))
  with pytest.raises(ConfigError, match="multiples"):
    bench_run.resolve(parse(["--quick", "--lengths", "100"]))


# -- small-scale E2E reproduction (benchmarks/reproduce.py) ------------------------------------
def _repro_args(tmp, *extra):
  return reproduce.build_parser().parse_args([
      "--ctx", "128", "--eval_ctx", "64,128", "--batch_size", "2", "--eval_docs", "2",
      "--workdir", os.path.join(tmp, "runs"), "--out", os.path.join(tmp, "e2e_small.md"),
      *extra])


def test_reproduction_models_match_parameter_count(tmp_path):
  configs = reproduce.configs_for(_repro_args(str(tmp_path)), steps=10)
  counts = {k: reproduce.count_params_of(c) for k, c in configs.items()}
  for kind, n in counts.items():
    assert abs(n / counts["transformer"] - 1) < 0.02, counts
    assert configs[kind].data.seq_len == 128 and configs[kind].seed == 0


def test_reproduction_stops_at_a_preempted_model(tmp_path, monkeypatch):
  """SIGTERM during one model's training (train_and_evaluate returns preempted) ends the whole
  reproduction in one line naming that model; the next model is not started."""
  started = []

  def fake_train(config, workdir, echo=print):
    started.append(os.path.basename(workdir))
    return {"preempted": True}

  monkeypatch.setattr(reproduce, "train_and_evaluate", fake_train)
  args = _repro_args(str(tmp_path), "--steps", "2", "--kinds", "swa,e2e")
  with pytest.raises(SystemExit, match="stopped by SIGTERM while training swa .*--resume"):
    reproduce.run(args)
  assert started == ["swa"]


def test_reproduction_report_from_results(tmp_path):
  rng = np.random.default_rng(1)
  results = {}
  for kind in ("transformer", "swa", "e2e"):
    per = rng.uniform(1.0, 3.0, 128)
    results[kind] = {"params": 1000, "intermediate_size": 64, "train_loss": 2.0,
                     "train_seconds": 1.0, "per_position": per.tolist(),
                     "loss_at_ctx": {str(n): float(per[:n].mean()) for n in (64, 128)}}
  report = {"args": {"seed": 0, "ctx": "128"}, "steps": 5, "batch_size": 2, "train_ctx": 128,
            "tokens_per_model": 1280, "window": 32, "e2e_mini_batch": 32, "eval_ctx": [64, 128],
            "eval_docs": ["a", "b"], "results": results, "machine": machine_info(),
            "wall_seconds": 1.0}
  md_path = write_reproduction(report, str(tmp_path / "r.md"))
  md = open(md_path).read()
  d = results["e2e"]["loss_at_ctx"]["128"] - results["transformer"]["loss_at_ctx"]["128"]
  assert f"({d:+.4f})" in md
  d_swa = results["e2e"]["loss_at_ctx"]["128"] - results["swa"]["loss_at_ctx"]["128"]
  assert f"{abs(d_swa):.4f} nats/token {'lower' if d_swa < 0 else 'higher'} than SWA" in md
  assert (tmp_path / "r.png").stat().st_size > 0 and (tmp_path / "r.json").exists()
  # hand-written notes survive a regeneration
  open(md_path, "w").write(md.replace(NOTES_BEGIN + "\n", NOTES_BEGIN + "\nE2E note\n"))
  write_reproduction(report, md_path)
  assert f"{NOTES_BEGIN}\nE2E note\n" in open(md_path).read()


@pytest.mark.slow
def test_reproduction_end_to_end(tmp_path):
  args = _repro_args(str(tmp_path), "--steps", "2", "--kinds", "transformer,e2e")
  report = reproduce.run(args, echo=lambda s: None)
  for r in report["results"].values():
    assert r["loss_at_ctx"]["128"] > 0 and len(r["per_position"]) == 128
    # loss at 128 is the mean of the per-position losses
    assert r["loss_at_ctx"]["128"] == pytest.approx(np.mean(r["per_position"]))
  assert (tmp_path / "e2e_small.md").exists() and (tmp_path / "e2e_small.png").exists()


def test_compile_only_train_memory():
  """The memory section's compile-only path (no allocation) works for a plain and an E2E kind."""
  out = training.train_memory(PRESETS["quick"], ["transformer", "e2e-meta"], echo=print)
  for r in out.values():
    _positive(r, "argument_bytes", "temp_bytes", "peak_bytes")


def test_merge_keeps_the_sections_not_run_again(bench, tmp_path):
  out, results = bench
  merged_dir = tmp_path / "m"
  merged_dir.mkdir()
  (key, before), = results["machines"].items()
  older = json.loads(json.dumps(results))
  older["machines"][key]["machine"]["date"] = "2000-01-01 00:00 UTC"
  older["machines"][key].pop("section_dates", None)  # as written before --merge existed
  with open(merged_dir / "benchmarks.json", "w") as f:
    json.dump(older, f)
  args = bench_run.build_parser().parse_args(
      ["--quick", "--out_dir", str(merged_dir), "--sections", "matmul", "--merge"])
  after = bench_run.run(args, echo=lambda s: None)["machines"][key]
  assert set(after["sections"]) == set(before["sections"])
  assert after["sections"]["train"] == before["sections"]["train"]  # kept as it was
  assert after["sections"]["matmul"] != before["sections"]["matmul"]  # measured again
  assert set(after["section_dates"]) == set(before["sections"])
  assert after["section_dates"]["train"] == "2000-01-01 00:00 UTC"
  md = (merged_dir / "benchmarks.md").read_text()
  assert "kept from earlier runs:" in md and "train 2000-01-01 00:00 UTC" in md
  replaced = bench_run.run(bench_run.build_parser().parse_args(
      ["--quick", "--out_dir", str(merged_dir), "--sections", "matmul"]),
      echo=lambda s: None)["machines"][key]
  assert set(replaced["sections"]) == {"matmul"}
