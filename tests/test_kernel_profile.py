"""benchmarks/kernel_profile.py: op names read as scope and phase, the union of kernel intervals,
the per-call summary, and real traces of CPU train steps attributed to the model's scopes."""

from __future__ import annotations

import os
from types import SimpleNamespace

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from ttt_jax.benchmarks import gpu_tasks, kernel_profile
from ttt_jax.benchmarks.common import PRESETS
from ttt_jax.benchmarks.hlo_text import phase_of, scope_of
from ttt_jax.benchmarks.kernel_profile import Event
from ttt_jax.benchmarks.training import _train_setup

pytestmark = pytest.mark.extended  # the kernel profiler's own tests


def test_scope_and_phase_of_op_names():
  """Op names in the form XLA records them (taken from compiled train steps)."""
  cases = {
      "jit(_train_step)/jvp(vmap(mixer))/attention/reduce_sum": ("attention", "forward"),
      "jit(_train_step)/transpose(jvp(mlp))/dot_general": ("mlp", "backward"),
      "jit(_train_step)/transpose(jvp())/while/body/checkpoint/rematted_computation/"
      "vmap(jvp(prime_mlp))/mul": ("prime_mlp", "recompute"),
      "jit(_train_step)/jvp()/while/body/closed_call/vmap(transpose(jvp(vmap(jvp()))))/"
      "checkpoint/prime_mlp/dot_general": ("prime_mlp", "forward/inner-grad"),
      "jit(_train_step)/transpose(jvp())/while/body/closed_call/checkpoint/"
      "vmap(transpose(jvp(loss)))/select_n": ("loss", "backward/inner-grad"),
      "jit(_train_step)/vmap(jvp(head))/iota": ("head", "forward"),
      "jit(_train_step)/optimizer/mul": ("optimizer", "update"),
      "jit(_train_step)/jvp(vmap(mixer))/ttt_inner/while/body/dot_general": ("ttt_inner",
                                                                              "forward"),
      "jit(_train_step)/is_finite": ("other", "update"),
      "": ("other", "unattributed"),  # XLA's own instructions carry no op_name
  }
  for op_name, want in cases.items():
    assert (scope_of(op_name), phase_of(op_name)) == want, op_name


def test_busy_time_is_the_union_of_the_intervals():
  rng = np.random.default_rng()
  for _ in range(20):
    starts = rng.integers(0, 200, 30)
    durs = rng.integers(0, 25, 30)
    covered = set()
    for s, d in zip(starts, durs, strict=True):
      covered.update(range(s, s + d))
    events = [Event("m", f"op{i}", float(s), float(d))
              for i, (s, d) in enumerate(zip(starts, durs, strict=True))]
    assert kernel_profile.busy_ns(events) == len(covered)


def test_summary_per_call_by_kind_scope_and_phase():
  index = {"dot.1": ("matmul", "jit(f)/jvp(mlp)/dot_general", 3_000_000),
           "fusion.2": ("fusion", "jit(f)/transpose(jvp(mixer))/attention/exp", 500_000),
           "cc.3": ("pallas", "jit(f)/jvp(mixer)/ttt_inner/pallas_call", 0),
           "while.4": ("while", "jit(f)/jvp(mixer)/ttt_inner/while", 0)}
  events = [Event("jit_f", "dot.1", 0, 10), Event("jit_f", "fusion.2", 5, 10),
            Event("jit_f", "cc.3", 30, 20), Event("jit_f", "dot.1", 100, 10),
            Event("jit_f", "fusion.2", 110, 10), Event("jit_f", "cc.3", 130, 20),
            Event("jit_f", "copy.9", 200, 4),  # not in the index: counted as unmatched
            Event("jit_f", "while.4", 25, 30),  # spans cc.3: counted through its body's events
            Event("jit_other", "dot.1", 0, 1000)]  # another program: left out
  p = kernel_profile.summarize(events, "jit_f", index, calls=2, wall_s=1e-6)
  ns = 1e-6 / 2  # ns -> ms per call
  assert p["launches"] == 3.5
  assert p["kernels_ms"] == pytest.approx(84 * ns)
  assert p["busy_ms"] == pytest.approx(79 * ns)  # dot.1 and fusion.2 overlap by 5 ns once
  assert p["unmatched_ms"] == pytest.approx(4 * ns)
  assert p["wall_ms"] == pytest.approx(0.5e-3)
  assert p["by_kind"] == pytest.approx({"pallas": 40 * ns, "matmul": 20 * ns,
                                        "fusion": 20 * ns, "?": 4 * ns})
  assert p["by_scope"] == pytest.approx({"ttt_inner": 40 * ns, "mlp": 20 * ns,
                                         "attention": 20 * ns, "other": 4 * ns})
  assert p["by_phase"] == pytest.approx({"forward": 60 * ns, "backward": 20 * ns,
                                         "unattributed": 4 * ns})
  assert [r["op"] for r in p["top"]] == ["cc.3", "dot.1", "fusion.2", "copy.9"]
  assert p["top"][0] == {"op": "cc.3", "kind": "pallas", "scope": "ttt_inner",
                         "phase": "forward", "ms": pytest.approx(40 * ns), "launches": 1.0,
                         "tflops": 0.0}
  # FLOPs: dot.1 3e6 per launch, 2 launches in 20 ns (300 TFLOP/s); fusion.2 5e5, 2 in 20 ns
  assert p["flops"] == pytest.approx((6e6 + 1e6) / 2)
  assert p["tflops"] == pytest.approx(7e6 / 84 / 1e3)  # over all kernel time
  assert p["tflops_by_phase"] == pytest.approx({"forward": 6e6 / 60 / 1e3,
                                                "backward": 1e6 / 20 / 1e3})
  assert p["top"][1]["tflops"] == pytest.approx(300.0)


def test_flops_go_with_runs_not_with_events():
  """One launch of a library call can show as several kernel events (cuDNN's backward, a
  split-K GEMM and its reduction): its FLOPs are counted once per call of the program, as
  `instruction_index` gives them (runs per call x FLOPs per launch), whatever the events."""
  index = {"bwd.1": ("cudnn", "jit(f)/transpose(jvp(mixer))/attention/bwd", 4_000_000)}
  events = [Event("jit_f", "bwd.1", t, 10) for t in (0, 10, 20, 100, 110, 120)]  # 3 per call
  p = kernel_profile.summarize(events, "jit_f", index, calls=2)
  assert p["launches"] == 3.0 and p["flops"] == pytest.approx(4e6)
  assert p["tflops"] == pytest.approx(8e6 / 60 / 1e3)
  # the index: runs per call from the program's loops (a dot in a 3-trip scan runs 3 times)
  f = jax.jit(lambda x, w: jax.lax.scan(lambda c, _: (jnp.tanh(c @ w), None), x, None,
                                        length=3)[0])
  keys = jax.random.split(jax.random.key(7))
  text = f.lower(jax.random.normal(keys[0], (16, 32)),
                 jax.random.normal(keys[1], (32, 32))).compile().as_text()
  _, index = kernel_profile.instruction_index(text)
  assert sum(v[2] for v in index.values()) == 3 * 2 * 16 * 32 * 32


def _plane(name, lines):
  """A stand-in for a `jax.profiler.ProfileData` plane: lines of (name, [(op, start, dur)])."""
  ev = lambda op, s, d: SimpleNamespace(  # noqa: E731
      start_ns=s, duration_ns=d, stats=[("hlo_op", op), ("hlo_module", "jit_f")])
  return SimpleNamespace(name=name, lines=[SimpleNamespace(name=n, events=[ev(*e) for e in es])
                                           for n, es in lines])


def test_trace_events_read_the_first_gpus_streams_else_the_host():
  """A GPU trace: the first device's stream lines only (its other lines, e.g. 'XLA Ops', show
  the same kernels again; other GPUs and the host are left out). No GPU: the host's thunks."""
  host = _plane("/host:CPU", [("tf_XLA", [("host.1", 0, 5)])])
  gpu0 = _plane("/device:GPU:0", [("Stream #7(Compute)", [("fusion.1", 10, 3), ("gemm.2", 20, 4)]),
                                  ("XLA Ops", [("fusion.1", 10, 3)]),
                                  ("Stream #8", [("copy.3", 30, 1)])])
  gpu1 = _plane("/device:GPU:1", [("Stream #7", [("fusion.1", 10, 3)])])
  events, source = kernel_profile.trace_events(SimpleNamespace(planes=[host, gpu1, gpu0]))
  assert source == "/device:GPU:0"
  assert [(e.op, e.start_ns, e.dur_ns) for e in events] == [
      ("fusion.1", 10, 3), ("gemm.2", 20, 4), ("copy.3", 30, 1)]
  events, source = kernel_profile.trace_events(SimpleNamespace(planes=[host]))
  assert source == "/host:CPU" and [e.op for e in events] == ["host.1"]
  assert kernel_profile.trace_events(SimpleNamespace(planes=[])) == ([], "")


def _compiled_step(kind: str, **overrides):
  _, compiled, state, batch, info = _train_setup(kind, PRESETS["quick"], overrides=overrides)
  holder = {"state": state}

  def step():
    holder["state"], _ = compiled(holder["state"], batch)
    return holder["state"]

  jax.block_until_ready(step())
  return compiled, step, (holder, batch, info)  # the first state was donated to the step


def _check_totals(p: dict):
  for key in ("by_kind", "by_scope", "by_phase"):
    assert sum(p[key].values()) == pytest.approx(p["kernels_ms"], rel=1e-6), key
  assert 0 < p["busy_ms"] <= p["kernels_ms"] + 1e-9
  assert p["busy_ms"] <= p["wall_ms"]
  assert p["unmatched_ms"] == 0  # every event names an instruction of the program


def test_transformer_step_profile_on_cpu(tmp_path):
  """Every scope of a transformer step gets time, and full remat shows as a recompute phase;
  without remat there is none."""
  compiled, step, _ = _compiled_step("transformer", remat="full")
  keep = tmp_path / "t" / "trace.xplane.pb"
  p = kernel_profile.profile_calls(step, compiled.as_text(), calls=2, keep=str(keep))
  _check_totals(p)
  assert keep.stat().st_size > 0
  for scope in ("embed", "mixer", "attention", "mlp", "head", "loss", "optimizer"):
    assert p["by_scope"].get(scope, 0) > 0, (scope, p["by_scope"])
  assert {"forward", "backward", "recompute", "update"} <= set(p["by_phase"])
  assert p["launches"] >= 50 and len(p["top"]) == 12
  # the matmuls' FLOPs are counted and ran at some rate
  assert p["flops"] > 0 and p["tflops"] > 0 and p["tflops_by_phase"]["backward"] > 0
  lines = kernel_profile.markdown("transformer", p)
  assert lines[0].startswith("**transformer** (/host:CPU): wall ") and "| instruction |" in lines[7]
  assert lines[5].startswith("- counted ") and "GFLOP per call" in lines[5]
  assert p["source"] == "/host:CPU"  # no GPU: XLA:CPU's thunks

  compiled, step, _ = _compiled_step("transformer", remat="none")
  p = kernel_profile.profile_calls(step, compiled.as_text(), calls=1)
  assert "recompute" not in p["by_phase"] and p["by_phase"]["backward"] > 0


def test_e2e_meta_step_profile_shows_the_inner_loop():
  compiled, step, _ = _compiled_step("e2e-meta")
  p = kernel_profile.profile_calls(step, compiled.as_text(), calls=2)
  _check_totals(p)
  for scope in ("prime_mlp", "inner_update", "attention", "head"):
    assert p["by_scope"].get(scope, 0) > 0, (scope, p["by_scope"])
  assert {"forward/inner-grad", "backward/inner-grad"} <= set(p["by_phase"])


def test_train_task_records_a_profile_and_the_cli_prints_one(capsys, tmp_path, monkeypatch):
  """gpu-check's train tasks (`_time_steps`) keep the profile beside the timing, the raw trace
  where gpu-check asks; the command line profiles a kind at a preset."""
  compiled, _, (holder, batch, info) = _compiled_step("ttt_linear")
  monkeypatch.setenv(kernel_profile.PROFILE_ENV, str(tmp_path / "p.xplane.pb"))
  out = gpu_tasks._time_steps(compiled, holder["state"], batch, dict(info))
  assert out["median_s"] > 0 and out["profile"]["calls"] == 3
  assert out["profile"]["by_scope"]["ttt_inner"] > 0
  assert os.path.getsize(tmp_path / "p.xplane.pb") > 0

  def broken():
    raise RuntimeError("no trace")

  err = kernel_profile.profile_or_error(broken, compiled.as_text())
  assert err["error"].startswith("RuntimeError: no trace")
  # a trace without the program's kernels (another program ran) is an error, not zeros
  other = jax.jit(lambda x: x * 2.0)
  err = kernel_profile.profile_or_error(lambda: other(np.ones(4, np.float32)), compiled.as_text())
  assert "holds no kernel event of jit__train_step" in err["error"], err
  # the timing, before the profile (gpu-check's phase marks around it)
  lines = capsys.readouterr().out.splitlines()
  assert lines[0].startswith("PHASE timed ") and lines[1].startswith("RESULT {")
  argv = ["--kind", "ttt_linear-dual", "--preset", "quick", "--calls", "1"]
  assert kernel_profile.main(argv) == 0
  text = capsys.readouterr().out
  assert text.startswith("**ttt_linear-dual** (/host:CPU): wall ") and "ttt_inner" in text
