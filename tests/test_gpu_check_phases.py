"""gpu-check splits each task's wall time by phase: the task marks each phase's end
(`gpu_tasks.mark`), the parent reads the marks (also from a task that ran out of time, whose
error then names the phase it was in) and the summary tabulates them."""

from __future__ import annotations

import json
import subprocess
import time

import pytest

from ttt_jax.benchmarks import gpu_check, gpu_report, gpu_tasks
from ttt_jax.benchmarks.gpu_variants import setup_train_kind

pytestmark = pytest.mark.extended  # the GPU check's own tests


def _marks(text: str) -> list[str]:
  return list(gpu_check.phases(text, 0.0))


def test_a_train_task_marks_its_phases_in_order(monkeypatch, capsys):
  """Set-up, lowering and compiling are marked by the real set-up, timing and profiling by the
  real step loop, each once and in that order; compile_s still spans lowering and compiling."""
  seen = []
  compiled, state, batch, info = setup_train_kind(
      "transformer", preset="quick", mark=lambda p: seen.append((p, time.perf_counter())))
  assert [p for p, _ in seen] == ["set up", "lowered", "compiled"]
  assert 0 < info["compile_s"] <= seen[2][1] - seen[0][1] + 1e-3
  monkeypatch.setattr("ttt_jax.benchmarks.kernel_profile.profile_or_error",
                      lambda run, hlo: {"busy_ms": 1.0})
  capsys.readouterr()
  out = gpu_tasks._time_steps(compiled, state, batch, info)  # noqa: SLF001
  assert out["profile"] == {"busy_ms": 1.0}
  assert _marks(capsys.readouterr().out) == ["timed", "profiled"]


def test_the_child_marks_its_start_before_its_task(monkeypatch, capsys):
  monkeypatch.setattr(gpu_check, "run_task", lambda name: {"task": name})
  assert gpu_check.main(["--task", "env"]) == 0
  lines = capsys.readouterr().out.splitlines()
  assert lines[0].startswith("PHASE started ") and lines[1] == 'RESULT {"task": "env"}'


def test_phases_are_seconds_from_the_spawn():
  text = ("noise\nPHASE started 103.250\nPHASE set up 110.000\nRESULT {}\n"
          "PHASE compiled 131.040\n")
  assert gpu_check.phases(text, 100.0) == {"started": 3.2, "set up": 10.0, "compiled": 31.0}
  assert gpu_check.phases("RESULT {}", 100.0) == {}
  # the last line cut short as the task was killed
  assert gpu_check.phases("PHASE set up 110.000\nPHASE compiled 13", 100.0) == {"set up": 10.0}
  assert gpu_check.phases("PHASE set up 110.000\nPHASE compi", 100.0) == {"set up": 10.0}


def _fake_child(timeout_after: str | None):
  """A fake `subprocess.run` whose train task reaches each phase a few seconds apart (in the
  stamps it prints) and, with `timeout_after`, runs out of time after that phase."""
  names = ["started", "backend up", "set up", "lowered", "compiled", "timed", "profiled"]

  def run(cmd, **kw):
    now, lines = time.time(), []
    for i, name in enumerate(names):
      lines.append(f"PHASE {name} {now + 2.0 * (i + 1):.3f}")
      if name == "timed":
        lines.append("RESULT " + json.dumps({"median_s": 0.02, "compile_s": 2.0,
                                             "tokens_per_step": 8, "model_flops_per_token": 1}))
      if name == timeout_after:
        raise subprocess.TimeoutExpired(cmd, kw["timeout"], output="\n".join(lines))
    return subprocess.CompletedProcess(cmd, 0, "\n".join(lines), "")

  return run


def _run_with(tmp_path, monkeypatch, only, run):
  import jax  # noqa: PLC0415

  monkeypatch.setattr(jax, "default_backend", lambda: "gpu")
  monkeypatch.setattr(gpu_check.subprocess, "run", run)
  assert gpu_check.main(["--out_dir", str(tmp_path), "--only", only]) == 0
  return (json.loads((tmp_path / "gpu_check.jsonl").read_text()),
          (tmp_path / "gpu_check.md").read_text())


def test_each_phase_is_recorded_and_tabulated(tmp_path, monkeypatch):
  row, md = _run_with(tmp_path, monkeypatch, "train:swa$", _fake_child(None))
  assert list(row["phases"]) == ["started", "backend up", "set up", "lowered", "compiled",
                                 "timed", "profiled"]
  assert [round(b - a, 1) for a, b in zip([0, *row["phases"].values()],
                                          row["phases"].values(), strict=False)][1:] == [2.0] * 6
  assert ("| task | wall | started | backend up | set up | lowered | compiled | timed | profiled "
          "| rest |") in md
  assert "| 2.0 | 2.0 | 2.0 | 2.0 | 2.0 | 2.0 |" in md.split("| train:swa | ")[1]


def test_a_task_that_runs_out_of_time_says_in_which_phase(tmp_path, monkeypatch):
  """Run out of time after lowering: the error says the compile was under way (what ran past
  the limit was whatever follows 'lowered'), and the phases reached are kept."""
  row, md = _run_with(tmp_path, monkeypatch, "train:swa$", _fake_child("lowered"))
  assert list(row["phases"]) == ["started", "backend up", "set up", "lowered"]
  at = row["phases"]["lowered"]
  assert row["error"] == (f"timed out after 100 s, {100 - at:.0f} s after 'lowered' ended "
                          f"(at {at:.0f} s)")
  assert "| train:swa (timed out) |" in md
  # a task with no marks (it never started) reads as before
  assert gpu_check._timeout_message(100, {}) == "timed out after 100 s"  # noqa: SLF001


def test_a_timed_out_task_names_the_last_progress_it_printed():
  """A task that prints its progress (the stream task: each kind and length) says where it was
  beyond its phase marks; marks and results are not progress."""
  out = "PHASE started 5.000\nprefill e2e at 8192: 6.2 us/token\nprefill e2e at 32768\n\n"
  msg = gpu_check._timeout_message(300, {"started": 5.0}, out)  # noqa: SLF001
  assert msg == ("timed out after 300 s, 295 s after 'started' ended (at 5 s); its last output: "
                 "'prefill e2e at 32768'")
  assert gpu_check._timeout_message(60, {}, "PHASE started 1.000\nRESULT {}") == (  # noqa: SLF001
      "timed out after 60 s")


def test_the_summary_has_no_phase_table_without_phases():
  assert gpu_report._phases({"env": {"task_s": 3.0}}) == []  # noqa: SLF001


def test_phase_marks_leave_every_section_of_the_summary_as_it_was(tmp_path):
  """gpu_check records each task's wall time and phases beside its result; the sections that
  read a task's result row by row (attention, Pallas, learn, tune, cache attention, streaming,
  train) show the same text with them as without, and the phase table follows."""
  step = {"compile_s": 3.0, "tokens_per_step": 16384, "model_flops_per_token": 1e8}
  rows = {"value_rel_err": 1e-3, "grad_rel_err": 2e-3, "fwd_bwd_s": 1e-3}
  results = {
      "attention": {"window=None": {"cudnn": rows}},
      "pallas": {"linear": rows, "ttt_linear/pallas": {"compile_s": 2.0, "fwd_bwd_s": 3e-3}},
      "learn": {"transformer/xla": {"compile_s": 1.0, "loss": [5.6, 5.5], "grad_norm": [2.0, 1.0],
                                    "finite": [1.0, 1.0]}},
      "tune": {"pallas/default": {"compile_s": 1.0, "fwd_bwd_s": 3e-3,
                                  "rel_err_vs_ieee_dual": 9e-3}},
      "cache_attention": {"prefill at 131072": {"kernel": {"rel_err": 4e-3, "median_s": 2e-3,
                                                           "tflops_per_s": 140.0}}},
      "stream:e2e": {"8192": {"compile_s": 2.0, "prefill": {"per_token_s": 6e-5}}},
      "train:transformer": dict(step, median_s=0.016),
  }
  bare = gpu_report.write_markdown(results, str(tmp_path / "bare.md"))
  marked = {k: dict(r, task_s=40.0, phases={"started": 2.0, "set up": 9.0})
            for k, r in results.items()}
  full = gpu_report.write_markdown(marked, str(tmp_path / "full.md"))
  bare, full = open(bare).read(), open(full).read()
  sections = bare.split("Task wall times")[0]
  assert "| transformer/xla | 1.0 s | 5.600 5.500 |" in sections  # every section rendered
  assert full.split("Task wall times")[0] == sections
  assert "## Where each task's time went" in full and "## Where each task's time went" not in bare
  assert "| learn | 40 s | 2.0 | 7.0 | 31.0 |" in full


def test_a_several_part_task_prints_its_rows_as_it_finishes_them(monkeypatch, capsys):
  """`learn` (as `attention`, `pallas` and `tune`) prints its result after each case, so the
  cases it finished survive a time limit that stops it in a later one."""
  monkeypatch.setattr(gpu_tasks, "LEARN_CASES", (
      ("transformer/cudnn", {"attention_impl": "cudnn"}, "full"),
      ("transformer/xla", {"attention_impl": "xla"}, "none")))
  learn = gpu_tasks.task_learn(steps=2, preset="quick")
  printed = [json.loads(ln[len("RESULT "):]) for ln in capsys.readouterr().out.splitlines()
             if ln.startswith("RESULT ")]
  assert [list(r) for r in printed] == [["transformer/cudnn"],
                                        ["transformer/cudnn", "transformer/xla"]]
  assert printed[-1] == json.loads(json.dumps(learn))


def test_the_rows_a_timed_out_task_finished_are_kept_and_reported(tmp_path, monkeypatch):
  done = {"transformer/xla": {"compile_s": 1.0, "loss": [5.6, 5.5], "grad_norm": [2.0, 1.0],
                              "finite": [1.0, 1.0]}}

  def run(cmd, **kw):
    out = f"PHASE started {time.time() + 1:.3f}\nRESULT {json.dumps(done)}\ncase 2 of 3"
    raise subprocess.TimeoutExpired(cmd, kw["timeout"], output=out)

  row, md = _run_with(tmp_path, monkeypatch, "learn", run)
  assert row["transformer/xla"] == done["transformer/xla"] and "error" not in row
  assert row["cut_short"].startswith("timed out after 200 s, ")
  assert row["cut_short"].endswith("its last output: 'case 2 of 3'")
  assert "| transformer/xla | 1.0 s | 5.600 5.500 |" in md
  assert ("Cut short by their time limit or a crash (the rows above are those they finished): "
          f"learn ({row['cut_short']}).") in md
  assert "| learn (timed out) |" in md


def test_a_task_that_crashes_after_some_rows_is_not_reported_as_finished(tmp_path, monkeypatch):
  """A non-zero exit after a partial result keeps the rows and says the task was cut short,
  with its exit code and last words; the last `RESULT` line, cut off, is passed over."""
  first = {"window=None": {"cudnn": {"value_rel_err": 1e-3, "grad_rel_err": 2e-3,
                                     "fwd_bwd_s": 1e-3}}}
  out = f'RESULT {json.dumps(first)}\nRESULT {{"window=None": {{"cud'

  def run(cmd, **kw):
    return subprocess.CompletedProcess(cmd, 134, out, "F0000 cuda_executor.cc] out of memory\n")

  row, md = _run_with(tmp_path, monkeypatch, "attention", run)
  assert row["window=None"] == first["window=None"] and "error" not in row
  assert row["cut_short"] == "exit 134: F0000 cuda_executor.cc] out of memory"
  assert "| window=None | cudnn | 1.0e-03 | 2.0e-03 | 1.00 ms |" in md
  assert "attention (exit 134: F0000 cuda_executor.cc] out of memory)." in md


def test_a_train_task_stopped_while_profiling_keeps_its_timing(tmp_path, monkeypatch):
  """Stopped after 'timed' (the output as bytes, as a real child's): the timing stays, the
  profile and the run's records say why it stopped."""
  timing = {"median_s": 0.02, "compile_s": 2.0, "tokens_per_step": 8, "model_flops_per_token": 1}

  def run(cmd, **kw):
    out = f"PHASE timed {time.time() + 30:.3f}\nRESULT {json.dumps(timing)}\n".encode()
    raise subprocess.TimeoutExpired(cmd, kw["timeout"], output=out)

  row, md = _run_with(tmp_path, monkeypatch, "train:swa$", run)
  assert row["median_s"] == 0.02 and list(row["phases"]) == ["timed"]
  assert row["profile"]["error"] == row["cut_short"]
  assert row["cut_short"].startswith("timed out after 100 s, 70 s after 'timed' ended")
  assert "| swa | 2.0 s | 20.00 ms |" in md and "| train:swa (timed out) |" in md
  # a train task that printed its profile keeps it, whatever stopped it after
  assert gpu_check._cut_short("train:swa", {"profile": {"busy_ms": 1.0}}, "exit 1: x") == (  # noqa: SLF001
      {"profile": {"busy_ms": 1.0}, "cut_short": "exit 1: x"})


def test_both_train_tasks_mark_the_backend_then_pass_the_marks_on(monkeypatch, capsys):
  """`train:` and `train125m:` tasks mark the GPU's set-up before anything else and hand `mark`
  to the set-up, which marks the rest (test_a_train_task_marks_its_phases_in_order)."""
  from ttt_jax.benchmarks import training  # noqa: PLC0415

  handed = []
  monkeypatch.setattr(gpu_tasks, "setup_train_kind",
                      lambda kind, mark: handed.append(mark) or (None, None, None, {}))
  monkeypatch.setattr(gpu_tasks, "pretrain_config",
                      lambda kind: type("Cfg", (), {"data": type("D", (), {"seq_len": 8})}))
  monkeypatch.setattr(training, "train_setup_from_config",
                      lambda cfg, mark: handed.append(mark) or (cfg, None, None, None, {}))
  monkeypatch.setattr(gpu_tasks, "_time_steps", lambda *a: {})
  capsys.readouterr()
  gpu_tasks.run_task("train:swa")
  gpu_tasks.run_task("train125m:e2e")
  lines = [ln for ln in capsys.readouterr().out.splitlines() if ln.startswith("PHASE ")]
  assert [ln.rpartition(" ")[0] for ln in lines] == ["PHASE backend up"] * 2
  assert handed == [gpu_tasks.mark, gpu_tasks.mark]


def test_pallas_cut_short_before_its_timings_shows_no_empty_timing_table(tmp_path):
  rows = {"linear": {"value_rel_err": 1e-7, "grad_rel_err": 4e-7}}
  md = open(gpu_report.write_markdown({"pallas": dict(rows, cut_short="timed out after 150 s")},
                                      str(tmp_path / "g.md"))).read()
  assert "- TTT-Linear: value 1.0e-07, gradients 4.0e-07" in md
  assert "One TTT layer fwd+bwd" not in md
  rows["ttt_linear/pallas"] = {"compile_s": 2.0, "fwd_bwd_s": 3e-3}
  md = open(gpu_report.write_markdown({"pallas": rows}, str(tmp_path / "g.md"))).read()
  assert "One TTT layer fwd+bwd" in md and "| ttt_linear | pallas | 2.0 s | 3.00 ms |" in md
