"""`make gpu-check` on a machine without a GPU (one line, exit 0), its task plan, and its summary
of results (numbers, errors and skipped tasks each reported)."""

from __future__ import annotations

import functools
import json
import os
import re
import subprocess
import sys

import pytest

from ttt_jax.benchmarks import gpu_check, gpu_report, gpu_tasks, gpu_variants
from ttt_jax.benchmarks.common import PRESETS, model_config
from ttt_jax.models import config as models_config
from ttt_jax.models.e2e import inner_attention_block

pytestmark = pytest.mark.extended  # the GPU check's own tests


def test_without_a_gpu_one_line_and_exit_0(tmp_path):
  proc = subprocess.run([sys.executable, "scripts/gpu_check.py", "--out_dir", str(tmp_path)],
                        capture_output=True, text=True, timeout=120,
                        env=dict(os.environ, JAX_PLATFORMS="cpu"))
  assert proc.returncode == 0, proc.stderr
  assert proc.stdout.strip().splitlines() == [
      "gpu-check: no GPU here (JAX backend cpu); nothing to check"]
  assert not list(tmp_path.iterdir())


def test_plan_order_and_filter():
  names = [n for n, _ in gpu_check.plan([])]
  assert names[:4] == ["env", "attention", "pallas", "e2e"]  # correctness before timings
  assert {f"train:{k}" for k in gpu_check.TRAIN} <= set(names)
  assert {"cache_attention", "stream:e2e/transformer/transformer-masked"} <= set(names)
  assert [n for n, _ in gpu_check.plan(["train:ttt_linear"])] == [
      "train:ttt_linear", "train:ttt_linear-dual", "train:ttt_linear+rematkernels",
      "train:ttt_linear+xlaout", "train:ttt_linear+noremat", "train:ttt_linear+cmdbuf",
      "train:ttt_linear+scan", "train:ttt_linear+grouped"]
  # the dual TTT-MLP step (the GPU default) with its while loops as CUDA graphs
  assert "train:ttt_mlp+cmdbuf" in names
  assert [n for n, _ in gpu_check.plan(["train:ttt_linear$", "learn"])] == [
      "learn", "train:ttt_linear"]
  variants = ("", *gpu_check.VARIANTS, *gpu_variants.CONFIG_VARIANTS, *gpu_variants.TUNING_VARIANTS)
  assert all(n.partition("+")[2] in variants for n in names)
  # every variant the census counts is also timed, once
  assert {f"train:{k}" for k in gpu_variants.RUN_VARIANTS} <= set(names)
  assert len(names) == len(set(names))


def test_train_kinds_and_their_variants():
  assert gpu_variants.train_kind("ttt_linear-dual+rematkernels") == (
      "ttt_linear", {"ttt.impl": "dual", "remat": "kernels"})
  assert gpu_variants.train_kind("e2e-meta+chunkdots") == (
      "e2e-meta", {"e2e.remat_chunks_policy": "dots"})
  assert gpu_variants.train_kind("e2e-meta+suffixremat") == (
      "e2e-meta", {"e2e.suffix_remat": "full"})
  assert gpu_variants.train_kind("transformer+cmdbuf") == ("transformer", {})  # XLA flags only
  for kind in gpu_variants.RUN_VARIANTS:  # each override reaches the validated config
    base, overrides = gpu_variants.train_kind(kind)
    c = model_config(base, PRESETS["gpu"], overrides=overrides)
    for key, value in overrides.items():
      node = c if key.startswith("train.") else c.model  # 'train.K': the train section's K
      assert functools.reduce(lambda node, k: node[k], key.split("."), node) == value, (kind, key)


def test_the_125m_preset_takes_config_variants():
  """train125m:K+V: the `125m` preset of model kind K with variant V's model overrides."""
  assert not gpu_variants.pretrain_config("e2e+list").model.scan_layers
  plain = gpu_variants.pretrain_config("e2e")  # the paper-scale presets stack their blocks
  assert plain.model.scan_layers and plain.data.seq_len == 8192
  assert plain.model.compute_dtype == "bfloat16" and plain.data.batch_size == 8
  # the inner loop's attention: rematerialised query blocks (auto, on at 1024 x 9216 scores per
  # head), or one dense call per chunk, the program before them
  assert inner_attention_block(models_config.model_config(plain.model)) == 256
  dense = gpu_variants.pretrain_config("e2e+innerdense")
  assert inner_attention_block(models_config.model_config(dense.model)) == 0
  larger = gpu_variants.pretrain_config("e2e", "350m")  # gpu_census's 350m:e2e
  assert (larger.model.d_model, larger.data.seq_len) == (1024, 8192)


def test_a_125m_task_keeps_its_variant(monkeypatch):
  # `train125m:K+V` runs the 125m preset of K with V (e.g. +list, +innerdense), not plain K
  seen = []
  monkeypatch.setattr(gpu_tasks, "task_train_125m", lambda kind: seen.append(kind) or {})
  for name in ("train125m:e2e+list", "train125m:e2e+innerdense", "train125m:transformer"):
    gpu_tasks.run_task(name)
  assert seen == ["e2e+list", "e2e+innerdense", "transformer"]
  assert not gpu_variants.pretrain_config("ttt_mlp+list").model.scan_layers


def test_tuning_variant_reaches_the_traced_step():
  """`+xlaout`: no model override, a launch setting the train step is traced under (the
  CUDA-lowered TTT-Linear step then holds the W-chain kernels)."""
  from ttt_jax.benchmarks import lowering  # noqa: PLC0415
  from ttt_jax.layers import ttt_pallas  # noqa: PLC0415

  assert gpu_variants.train_kind("ttt_linear+xlaout") == ("ttt_linear", {})
  assert gpu_variants.variant_tuning("ttt_linear+xlaout") == {"linear_output": "xla"}
  assert gpu_variants.variant_tuning("ttt_linear+rematkernels") == {}
  # +unrolled: TTT-MLP's hidden blocks written out, at the block width they had then
  assert gpu_variants.train_kind("ttt_mlp-pallas+unrolled") == ("ttt_mlp", {"ttt.impl": "pallas"})
  with ttt_pallas.tuning(**gpu_variants.variant_tuning("ttt_mlp-pallas+unrolled")):
    tune = ttt_pallas.current_tuning()
    assert (tune.mlp_unroll, tune.mlp_block) == (True, 64) != (
        ttt_pallas.Tuning().mlp_unroll, ttt_pallas.Tuning().mlp_block)
  with ttt_pallas.tuning(**gpu_variants.variant_tuning("ttt_linear+xlaout")):
    text = lowering.lower_train_step("ttt_linear").mlir_module()
  assert 'name = "_chain_fwd_kernel"' in text and "_linear_fwd_kernel" not in text


def test_summary_reports_numbers_errors_and_skips(tmp_path):
  step = {"compile_s": 3.0, "tokens_per_step": 16384, "model_flops_per_token": 1e8}
  results = {
      "env": {"device": "NVIDIA H200", "versions": {"jax": "0.11.2"},
              "bf16_matmul_flops_per_s": 7.5e14, "task_s": 9},
      "attention": {"window=None": {"cudnn": {"value_rel_err": 1e-3, "grad_rel_err": 2e-3,
                                              "fwd_bwd_s": 1.4e-3},
                                    "xla": {"error": "XlaRuntimeError: out of memory"}}},
      "pallas": {"error": "timed out after 120 s"},
      "train:transformer": dict(step, median_s=0.016, counted_flops_per_step=4.8e12),
      "train:ttt_linear": dict(step, median_s=0.032, losses=[5.6, 4.1], nonfinite_steps=0,
                               profile=PROFILE, counted_flops_per_step=3.6e12),
      "train:transformer+noremat": dict(step, median_s=0.012, profile={"error": "E: no trace"}),
      "train:e2e-meta": {"skipped": "out of the time budget"},
      "train125m:transformer": dict(step, median_s=0.1),
      "train125m:e2e": dict(step, median_s=0.15),
      "stream:e2e": {"8192": {"compile_s": 2.0, "prefill": {"per_token_s": 6e-5},
                              "decode": {"per_token_s": 2e-3}}},
      "stream:transformer/transformer-masked": {
          "kinds": {"transformer": {"8192": {"compile_s": 1.0, "prefill": {"per_token_s": 3e-5}}},
                    "transformer-masked": {"error": "XlaRuntimeError: out of memory"}},
          "ratios": {"prefill": {"transformer": {"speedup_over_full_attention_at_longest": 1.0},
                                 "e2e": {"speedup_over_full_attention_at_longest": 2.5}}}},
      "cache_attention": {"prefill at 65536": {
          "kernel": {"rel_err": 4e-3, "median_s": 2e-3, "tflops_per_s": 140.0},
          "cudnn, masked": {"error": "ValueError: no"}}},
  }
  text = open(gpu_report.write_markdown(results, str(tmp_path / "g.md"))).read()
  assert "NVIDIA H200" in text and "750 TFLOP/s" in text
  assert "| window=None | cudnn | 1.0e-03 | 2.0e-03 | 1.40 ms |" in text
  assert "error (XlaRuntimeError: out of memory)" in text
  assert "Pallas TTT kernels: error (timed out after 120 s)" in text
  # counted FLOPs against the transformer's and over the step time (4.8e12 / 16 ms = 300)
  assert "| ttt_linear | 3.0 s | 32.00 ms | 2.00x | 0.75x, 112 |" in text
  assert "| transformer | 3.0 s | 16.00 ms | 1.00x | 1.00x, 300 |" in text
  assert "| transformer+noremat | 3.0 s | 12.00 ms | 0.75x |  |" in text  # none counted
  assert "| 5.600 -> 4.100 (0) |" in text
  assert "| e2e-meta | skipped (out of the time budget) |" in text
  assert "| e2e (125m, 8K) | 3.0 s | 150.00 ms | 1.50x |" in text
  assert "| e2e | 8K | 2.0 s | 60.0 us | 2.00 ms |" in text
  assert "| transformer | 8K | 1.0 s | 30.0 us |  |" in text  # from a several-kinds task
  assert "| transformer-masked | error (XlaRuntimeError: out of memory) |" in text
  assert "same process: transformer 1.00x, e2e 2.50x" in text
  assert "| prefill at 65536 | kernel | 2.00 ms | 140.0 | 4.0e-03 |" in text
  assert "| prefill at 65536 | cudnn, masked | error (ValueError: no) |" in text
  assert ("| ttt_linear | 30.00 ms | 25.00 ms | 28.00 ms | 2100 | 120.0 | pallas 50%, matmul "
          "30%, fusion 20% | ttt_inner 50%, mlp 20%, other 10% |") in text
  assert "| transformer+noremat | error (E: no trace) |" in text
  assert "| _linear_fwd.3 | pallas | ttt_inner | forward | 8.000 | 8 |  |" in text  # not counted
  assert "| dot.4 | matmul | mlp | backward | 4.000 | 16 | 250.0 |" in text
  assert "- counted 3360.0 GFLOP per call (matmuls, fused attention) at 120.0 TFLOP/s" in text


PROFILE = {"calls": 3, "launches": 2100.0, "kernels_ms": 28.0, "busy_ms": 25.0, "wall_ms": 30.0,
           "unmatched_ms": 0.0, "by_kind": {"pallas": 14.0, "matmul": 8.4, "fusion": 5.6},
           "by_scope": {"ttt_inner": 14.0, "mlp": 5.6, "other": 2.8, "mixer": 2.8, "head": 2.8},
           "by_phase": {"backward": 16.0, "forward": 12.0},
           "flops": 3.36e12, "tflops": 120.0, "tflops_by_phase": {"backward": 150.0},
           "top": [{"op": "_linear_fwd.3", "kind": "pallas", "scope": "ttt_inner",
                    "phase": "forward", "ms": 8.0, "launches": 8.0, "tflops": 0.0},
                   {"op": "dot.4", "kind": "matmul", "scope": "mlp", "phase": "backward",
                    "ms": 4.0, "launches": 16.0, "tflops": 250.0}]}


def test_each_task_is_told_where_its_trace_goes(tmp_path, monkeypatch):
  """gpu-check (on a GPU) hands every task process its own raw-trace path when asked to keep
  the traces (--traces), and none otherwise."""
  import jax  # noqa: PLC0415

  from ttt_jax.benchmarks import kernel_profile  # noqa: PLC0415

  seen = []

  def fake_run(cmd, env=None, **kw):
    seen.append((cmd[-1], env.get(kernel_profile.PROFILE_ENV)))
    return subprocess.CompletedProcess(cmd, 0, stdout="RESULT " + json.dumps(
        {"median_s": 0.01, "compile_s": 1.0, "tokens_per_step": 8, "model_flops_per_token": 1}),
                                       stderr="")

  monkeypatch.setattr(jax, "default_backend", lambda: "gpu")
  monkeypatch.setattr(gpu_check.subprocess, "run", fake_run)
  assert gpu_check.main(["--out_dir", str(tmp_path), "--only", "train:e2e-meta$"]) == 0
  assert seen == [("train:e2e-meta", None)]  # no trace asked for: none kept
  seen.clear()
  assert gpu_check.main(["--out_dir", str(tmp_path), "--only", "train:e2e-meta", "--traces"]) == 0
  assert seen == [(name, str(tmp_path / "profiles" / f"{file}.xplane.pb")) for name, file in (
      ("train:e2e-meta", "train_e2e-meta"),
      ("train:e2e-meta+chunkdots", "train_e2e-meta_chunkdots"),
      ("train:e2e-meta+before", "train_e2e-meta_before"),
      ("train:e2e-meta+suffixremat", "train_e2e-meta_suffixremat"),
      ("train:e2e-meta+windows", "train_e2e-meta_windows"),
      ("train:e2e-meta+cmdbuf", "train_e2e-meta_cmdbuf"),
      ("train:e2e-meta+innerblockwise", "train_e2e-meta_innerblockwise"),
      ("train:e2e-meta+scan", "train_e2e-meta_scan"),
      ("train:e2e-meta+groups", "train_e2e-meta_groups"),
      ("train:e2e-meta+nofusiontune", "train_e2e-meta_nofusiontune"),
      ("train:e2e-meta+grouped", "train_e2e-meta_grouped"))]


def test_pallas_task_runs_on_cpu():
  """Both kernels (interpreted) against the dual form (TTT-Linear's also as a streaming call),
  and the layer timings, at the toy preset."""
  out = gpu_tasks.task_pallas(preset="quick")
  for kind in ("linear", "mlp", "linear-xla", "linear-stream", "linear-hd80", "mlp-hd80"):
    assert 0 <= out[kind]["value_rel_err"] < 1e-5 and 0 < out[kind]["grad_rel_err"] < 1e-5
  for name in ("ttt_linear/dual", "ttt_linear/pallas", "ttt_linear/pallas-xla", "ttt_mlp/dual",
               "ttt_mlp/pallas"):
    assert out[name]["fwd_bwd_s"] > 0, name


def test_pallas_rows_report_each_kernel_on_its_own(tmp_path):
  """One kernel failing on the GPU leaves the other's correctness and timing rows."""
  results = {"pallas": {
      "linear": {"value_rel_err": 1e-7, "grad_rel_err": 4e-7},
      "mlp": {"error": "XlaRuntimeError: launch failed"},
      "linear-hd80": {"value_rel_err": 2e-7, "grad_rel_err": 5e-7},
      "ttt_linear/pallas": {"compile_s": 2.0, "fwd_bwd_s": 3.2e-3},
      "ttt_linear/pallas-xla": {"compile_s": 2.5, "fwd_bwd_s": 2.1e-3},
      "ttt_mlp/pallas": {"error": "XlaRuntimeError: launch failed"}},
      "env": {"device": "NVIDIA H200", "bf16_matmul_flops_per_s": 7e14,
              "versions": {"jax": "0.11.2", "jax-cuda12-plugin": None,
                           "jax-cuda13-plugin": "0.11.2"}}}
  text = open(gpu_report.write_markdown(results, str(tmp_path / "g.md"))).read()
  assert "| ttt_linear | pallas-xla | 2.5 s | 2.10 ms |" in text
  assert "jax 0.11.2, jax-cuda13-plugin 0.11.2;" in text and "cuda12" not in text
  assert "- TTT-Linear: value 1.0e-07, gradients 4.0e-07" in text
  assert "- TTT-MLP: error (XlaRuntimeError: launch failed)" in text
  assert "- TTT-Linear, head dim 80 (run padded): value 2.0e-07, gradients 5.0e-07" in text
  assert "| ttt_linear | pallas | 2.0 s | 3.20 ms |" in text
  assert "| ttt_mlp | pallas | error (XlaRuntimeError: launch failed) | |" in text


def test_a_gpu_that_this_jax_cannot_use_is_an_error(monkeypatch, capsys):
  """`make gpu-check` with a CPU-only JAX (e.g. .venv) on a GPU machine must not pass silently."""
  monkeypatch.setattr(gpu_check, "_nvidia_gpu_present", lambda: True)
  assert gpu_check.main(["--out_dir", "unused"]) == 1
  assert "has an NVIDIA GPU but the JAX of" in capsys.readouterr().out


def test_cache_attention_benchmark_runs_on_cpu(monkeypatch):
  """The kernel interpreted at a small cache: its error against fp32 and its time are recorded,
  and masked cuDNN (no GPU here) becomes an error row, not a crash."""
  from ttt_jax.benchmarks import streaming  # noqa: PLC0415

  monkeypatch.setattr(streaming, "KERNEL_SETTINGS", {"kernel": {"interpret": True}})
  rows = streaming.bench_cache_attention(256, 32, 2, 16, fills=(0.5,), repeats=1,
                                         echo=lambda s: None)
  assert list(rows) == ["prefill at 128", "decode at 128"]
  for row in rows.values():
    assert 0 < row["kernel"]["rel_err"] < 2e-2 and row["kernel"]["median_s"] > 0  # bf16
    assert "error" in row["cudnn, masked"]


def test_each_tune_sweep_starts_at_the_kernels_defaults():
  """The first launch setting a tune task times is `ttt_pallas.Tuning()`'s, the others differ."""
  from ttt_jax.layers import ttt_pallas  # noqa: PLC0415

  default = ttt_pallas.Tuning()
  for layer, fields in gpu_variants.TUNE_FIELDS.items():
    cases = gpu_variants.TUNE_CASES[layer]
    assert cases[0] == tuple(getattr(default, field) for field, _ in fields), layer
    assert len(set(cases)) == len(cases), layer


def test_learn_and_tune_tasks_run_and_are_reported(monkeypatch, tmp_path):
  """The two diagnostic tasks at the toy preset on CPU (the Pallas kernels interpreted; cuDNN
  is refused here and that is recorded), then their rows in the summary."""
  monkeypatch.setattr(gpu_tasks, "LEARN_CASES", (
      ("transformer/cudnn", {"attention_impl": "cudnn"}, "full"),
      ("transformer/xla", {"attention_impl": "xla"}, "none")))
  monkeypatch.setattr(gpu_tasks, "PADDED_HEAD_DIM", 24)  # run as 32: small on CPU
  monkeypatch.setattr(gpu_variants, "TUNE_CASES", {"ttt_linear": ((4, 1, "kernel"), (2, 2, "xla")),
                                                "ttt_mlp": ((4, 16, True),)})
  learn = gpu_tasks.task_learn(steps=3, preset="quick")
  assert "needs a GPU" in learn["transformer/cudnn"]["error"]
  xla = learn["transformer/xla"]
  assert xla["finite"] == [1.0, 1.0, 1.0] and xla["loss"][-1] < xla["loss"][0]
  tune = gpu_tasks.task_tune(preset="quick")
  assert list(tune) == ["dual/highest", "pallas/highest/w4s1-kernel", "dual/default",
                        "pallas/default/w4s1-kernel", "pallas/default/w2s2-xla",
                        "dual/highest/hd24", "dual/default/hd24", "pallas/default/hd24"]
  assert tune["dual/highest"]["rel_err_vs_ieee_dual"] == 0.0
  assert tune["dual/highest/hd24"]["rel_err_vs_ieee_dual"] == 0.0  # its own width's reference
  assert all(0 < r["rel_err_vs_ieee_dual"] < 1e-4 for k, r in tune.items() if "pallas" in k)
  tune_mlp = gpu_tasks.task_tune("quick", "ttt_mlp")
  assert list(tune_mlp) == ["dual/highest", "pallas/highest/w4b16-unrolled", "dual/default",
                            "pallas/default/w4b16-unrolled", "dual/highest/hd24",
                            "dual/default/hd24", "pallas/default/hd24"]
  assert all(0 < r["rel_err_vs_ieee_dual"] < 1e-4 for k, r in tune_mlp.items() if "pallas" in k)
  learn["task_s"], tune["task_s"], tune_mlp["task_s"] = 30.0, 40.0, 50.0  # as the orchestrator
  text = open(gpu_report.write_markdown({"learn": learn, "tune": tune, "tune_mlp": tune_mlp},
                                        str(tmp_path / "g.md"))).read()
  assert "| transformer/cudnn | error (ConfigError: model.attention_impl='cudnn'" in text
  losses = " ".join(f"{x:.3f}" for x in xla["loss"])
  assert f"| transformer/xla | {xla['compile_s']:.1f} s | {losses} |" in text
  assert "| pallas/default/w2s2-xla |" in text
  assert "## TTT-MLP layer fwd+bwd" in text and "| pallas/default/w4b16-unrolled |" in text


def test_a_train_task_that_times_out_while_profiling_keeps_its_timing(tmp_path, monkeypatch):
  """A train task prints its timing before it profiles: if the profile then runs past the
  task's limit, the timing is kept and the profile reads as timed out."""
  import jax  # noqa: PLC0415

  def fake_run(cmd, **kw):
    timing = {"median_s": 0.02, "compile_s": 1.0, "tokens_per_step": 8,
              "model_flops_per_token": 1}
    out = "RESULT " + json.dumps(timing) if cmd[-1].startswith("train:") else None
    raise subprocess.TimeoutExpired(cmd, kw["timeout"], output=out)

  monkeypatch.setattr(jax, "default_backend", lambda: "gpu")
  monkeypatch.setattr(gpu_check.subprocess, "run", fake_run)
  assert gpu_check.main(["--out_dir", str(tmp_path), "--only", "train:swa$,env"]) == 0
  rows = [json.loads(ln) for ln in (tmp_path / "gpu_check.jsonl").read_text().splitlines()]
  assert rows[0]["task"] == "env" and rows[0]["error"].startswith("timed out after")
  assert rows[1]["task"] == "train:swa" and rows[1]["median_s"] == 0.02
  assert rows[1]["profile"]["error"].startswith("timed out after")
  assert "| swa | 1.0 s | 20.00 ms |" in (tmp_path / "gpu_check.md").read_text()


def test_tasks_share_one_autotuning_cache_unless_cold(tmp_path, monkeypatch):
  """Every task process of a run gets the same autotuning-cache directory (alive while the
  tasks run, removed after), on top of its variant's XLA flags and the caller's; with
  --cold_compile none gets one. The summary says which."""
  import jax  # noqa: PLC0415

  seen = []

  def fake_run(cmd, env=None, **kw):
    flags = env.get("XLA_FLAGS", "").split()
    dirs = [f.split("=", 1)[1] for f in flags if f.startswith(gpu_check.AUTOTUNE_FLAG + "=")]
    seen.append((cmd[-1], flags, dirs, [os.path.isdir(d) for d in dirs]))
    return subprocess.CompletedProcess(cmd, 0, stdout="RESULT " + json.dumps(
        {"median_s": 0.01, "compile_s": 1.0, "tokens_per_step": 8, "model_flops_per_token": 1}),
                                       stderr="")

  monkeypatch.setattr(jax, "default_backend", lambda: "gpu")
  monkeypatch.setattr(gpu_check.subprocess, "run", fake_run)
  monkeypatch.setenv("XLA_FLAGS", "--xla_dump_to=/nowhere")
  only = "train:transformer$,train:ttt_linear+cmdbuf"
  assert gpu_check.main(["--out_dir", str(tmp_path), "--only", only]) == 0
  (t1, f1, d1, alive1), (t2, f2, d2, alive2) = seen
  assert (t1, t2) == ("train:transformer", "train:ttt_linear+cmdbuf")
  assert len(d1) == 1 and d1 == d2 and alive1 == alive2 == [True]
  assert not os.path.exists(d1[0])  # removed after the run
  assert f1[0] == f2[0] == "--xla_dump_to=/nowhere"
  assert gpu_variants.VARIANTS["cmdbuf"] in f2 and gpu_variants.VARIANTS["cmdbuf"] not in f1
  text = (tmp_path / "gpu_check.md").read_text()
  assert "the tasks shared one XLA autotuning cache" in text
  seen.clear()
  assert gpu_check.main(["--out_dir", str(tmp_path), "--only", only, "--cold_compile"]) == 0
  assert [d for _, _, d, _ in seen] == [[], []]
  assert [f for _, f, _, _ in seen][1][-1] == gpu_variants.VARIANTS["cmdbuf"]
  assert "each task autotuned its own fusions" in (tmp_path / "gpu_check.md").read_text()


def test_this_jaxlib_knows_every_flag_the_tasks_are_given(tmp_path):
  """XLA aborts a process at backend start on a flag it does not know (jaxlib 0.11 did so for a
  flag 0.10 had): the autotuning cache's and every variant's flags start a backend here."""
  flags = [f"{gpu_check.AUTOTUNE_FLAG}={tmp_path}", *gpu_variants.VARIANTS.values()]
  proc = subprocess.run([sys.executable, "-c", "import jax; print(jax.numpy.arange(3).sum())"],
                        capture_output=True, text=True, timeout=120,
                        env=dict(os.environ, JAX_PLATFORMS="cpu", XLA_FLAGS=" ".join(flags)))
  assert proc.returncode == 0, proc.stderr[-800:]
  assert proc.stdout.strip() == "3"


def test_named_selections_expand_and_bad_items_are_refused():
  first = gpu_check.selection("@first")
  names = [n for n, _ in gpu_check.plan(first)]
  assert names == ["env", "pallas", "train:transformer", "train:ttt_linear",
                   "train:ttt_mlp-pallas", "train:e2e-pretrain", "train:e2e-meta",
                   "train:ttt_linear+xlaout"]
  assert all(gpu_check.plan([item]) for item in first)  # every item names a task
  assert gpu_check.selection("learn,@first") == ["learn", *first]
  for only, message in (("@frist", "--only @frist: no such selection (known: @first)"),
                        ("learn,train:transfomer", "--only train:transfomer: names no task")):
    with pytest.raises(SystemExit, match=re.escape(message)):
      gpu_check.main(["--only", only])  # refused before looking for a GPU


def test_pallas_layer_timings_trace_each_row_under_its_tuning(monkeypatch):
  """The `pallas-xla` row's layer is traced and compiled with TTT-Linear's output made by XLA,
  every other row with the kernels' defaults."""
  from ttt_jax.benchmarks import training  # noqa: PLC0415
  from ttt_jax.layers import ttt_pallas  # noqa: PLC0415

  seen = []

  class Fake:  # stands in for jit(...): .lower(...).compile() -> a callable
    def lower(self, *a):
      seen[-1] += (ttt_pallas.current_tuning().linear_output,)
      return self

    def compile(self):
      return lambda *a: None

  def fake_fwd_bwd(layer, size, impl, x):
    seen.append((layer, impl, ttt_pallas.current_tuning().linear_output))
    return Fake(), None

  monkeypatch.setattr(training, "_ttt_fwd_bwd", fake_fwd_bwd)
  monkeypatch.setattr(gpu_tasks, "_median_time", lambda fn: 1.0)
  out = gpu_tasks.task_pallas(preset="quick")
  assert seen == [("ttt_linear", "dual", "kernel", "kernel"),
                  ("ttt_linear", "pallas", "kernel", "kernel"),
                  ("ttt_linear", "pallas", "xla", "xla"),
                  ("ttt_mlp", "dual", "kernel", "kernel"),
                  ("ttt_mlp", "pallas", "kernel", "kernel")]
  assert out["ttt_linear/pallas-xla"]["fwd_bwd_s"] == 1.0
  assert ttt_pallas.current_tuning().linear_output == "kernel"


def test_env_task_records_versions_and_the_cuda_plugin():
  """The versions row names JAX's CUDA plugin where one is installed (None where not), so runs
  on CUDA 12 and CUDA 13 images can be told apart; the ceiling is a positive rate."""
  import importlib.metadata as md  # noqa: PLC0415

  import jax  # noqa: PLC0415

  out = gpu_tasks.task_env(n=64)
  assert out["versions"]["jax"] == jax.__version__
  for plugin in ("jax-cuda12-plugin", "jax-cuda13-plugin"):
    try:
      want = md.version(plugin)
    except md.PackageNotFoundError:
      want = None
    assert out["versions"][plugin] == want
  assert out["bf16_matmul_flops_per_s"] > 0 and out["platform"] == jax.default_backend()
  assert out["rng_kernel_same_bits"] is True  # CPU: the setting changes nothing


def test_a_tune_row_without_its_ieee_reference_has_no_error_figure(monkeypatch):
  """Where the IEEE dual row fails, the other rows at its width report NaN, not their error
  against whichever row came first."""
  import jax  # noqa: PLC0415
  import numpy as np  # noqa: PLC0415

  from ttt_jax.benchmarks import training  # noqa: PLC0415

  class Fake:  # stands in for jit(...); the IEEE dual's compile fails
    def __init__(self, fails):
      self.fails = fails

    def lower(self, *a):
      return self

    def compile(self):
      if self.fails:
        raise RuntimeError("no IEEE dual here")
      return lambda *a: {"y": np.full(3, 2.0)}

  def fake_fwd_bwd(layer, size, impl, x):
    return Fake(impl == "dual" and jax.config.jax_default_matmul_precision == "highest"), None

  monkeypatch.setattr(training, "_ttt_fwd_bwd", fake_fwd_bwd)
  monkeypatch.setattr(gpu_tasks, "_median_time", lambda fn: 1.0)
  monkeypatch.setattr(gpu_variants, "TUNE_CASES", {"ttt_linear": ((4, 3, "kernel"),)})
  out = gpu_tasks.task_tune(preset="quick")
  assert "no IEEE dual here" in out["dual/highest"]["error"]
  assert "no IEEE dual here" in out["dual/highest/hd80"]["error"]
  for name in ("pallas/highest/w4s3-kernel", "dual/default", "pallas/default/hd80"):
    assert np.isnan(out[name]["rel_err_vs_ieee_dual"]) and out[name]["fwd_bwd_s"] == 1.0, name
