"""scripts/compile_check.py: AOT compile of every model kind's train step on 8 forced CPU devices.

The fast test compiles the tiny presets (1 layer, unoptimized code generation); the slow one the
125M presets at 8K, as in docs/scaling.md.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys

import jax
import jax.numpy as jnp
import ml_collections
import pytest

from ttt_jax.benchmarks import compile_check as cc
from ttt_jax.benchmarks import gpu_census
from ttt_jax.benchmarks.common import memory_stats
from ttt_jax.config import MODEL_KINDS, ConfigError, build_config

from .fast_compile import OLDER_EMITTERS

pytestmark = pytest.mark.extended  # the compile check's own tests

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SCRIPT = os.path.join(ROOT, "scripts", "compile_check.py")


def _run_script(tmp_path, *args, timeout=900, xla_flags="") -> tuple[dict, str]:
  out = tmp_path / "compile_check.json"
  env = dict(os.environ, JAX_PLATFORMS="cpu", TF_CPP_MIN_LOG_LEVEL="2")
  env["XLA_FLAGS"] = f"{env.get('XLA_FLAGS', '')} {xla_flags}".strip()
  p = subprocess.run([sys.executable, SCRIPT, *args, "--json", str(out)], env=env, cwd=ROOT,
                     capture_output=True, text=True, timeout=timeout)
  assert p.returncode == 0, p.stderr[-3000:]
  with open(out) as f:
    return json.load(f), p.stdout


def _check_compiled(report: dict, stdout: str, scale: str, kinds=MODEL_KINDS) -> None:
  assert [r["kind"] for r in report["results"]] == list(kinds)
  for r in report["results"]:
    assert r["status"] == "ok", r
    assert r["devices"] == 8 and r["mesh"] == {"data": 1, "fsdp": 8, "tensor": 1}
    m = r["memory"]
    for key in ("argument_bytes", "output_bytes", "alias_bytes", "temp_bytes", "peak_bytes"):
      assert m[key] > 0, (r["kind"], key, m)
    assert m["generated_code_bytes"] >= 0  # XLA:CPU reports 0
    # the step returns the new state and scalar metrics only: besides the state, the output
    # tuple's table (one 8-byte pointer per array) and a few scalars: measured 7,356 bytes for
    # the 125M TTT-Linear state's 912 arrays as a list of blocks (7,296 of pointers).
    # Gradients or logits in the output would not fit.
    extra = m["output_bytes"] - r["state_bytes"]
    assert 0 <= extra <= 8 * r["state_arrays"] + 1024, (r["kind"], extra, r["state_arrays"], m)
    # the arguments are the train state and the batch as their shardings lay them out; the
    # donated state is aliased to the new one, only the batch is not
    assert r["batch_bytes"] == r["per_device_batch"] * (r["seq_len"] + 1) * 4
    assert m["argument_bytes"] == r["state_bytes"] + r["batch_bytes"], (r["kind"], m)
    assert m["alias_bytes"] == r["state_bytes"], (r["kind"], m)
    assert r["compile_s"] > 0 and r["lower_s"] > 0
    assert f"| {scale} | {r['kind']} | {r['seq_len']} |" in stdout


def test_script_compiles_tiny_kinds(tmp_path):
  # Two kinds: the plain LM step and E2E's meta-learning step (every kind's train step is
  # compiled on 8 forced devices by tests/test_sharding.py, swa's and ttt_mlp's in make
  # test-extended, and lowered for CUDA by tests/test_gpu_lowering.py; the slow test below
  # compiles every kind at 125M). Fusions by XLA:CPU's older emitters compile in half the time;
  # the buffer sizes differ a little, the identities checked hold either way.
  kinds = ("transformer", "e2e")
  report, stdout = _run_script(tmp_path, "--scales", "tiny", "--ctx", "256", "--fast_compile",
                               "--kinds", ",".join(kinds), "--set", "model.num_layers=1",
                               timeout=600, xla_flags=" ".join(OLDER_EMITTERS))
  _check_compiled(report, stdout, "tiny", kinds)
  assert "per-device memory (MiB)" in stdout


@pytest.mark.slow
def test_script_compiles_every_kind_125m(tmp_path):
  report, stdout = _run_script(tmp_path, "--scales", "125m", "--timeout", "600",
                               "--total_budget", "3000", timeout=3600)
  _check_compiled(report, stdout, "125m")
  for r in report["results"]:
    assert r["seq_len"] == 8192
    # params + Adam's two moments in fp32, split 8 ways (some small arrays stay replicated)
    assert 12 * r["params"] / 8 <= r["state_bytes"] <= 1.6 * 12 * r["params"] / 8, r


def test_h200_target_compiles_for_gpus_where_the_cuda_plugin_is_installed(tmp_path):
  # XLA:GPU's buffer assignment for 2 H200s of a deviceless topology: the same identities as
  # XLA:CPU's (the state donated and aliased, the batch split over fsdp)
  if gpu_census.cuda_plugin() is None:
    pytest.skip("JAX's CUDA plugin is not installed here (make gpu-census installs it)")
  report, stdout = _run_script(tmp_path, "--target", "h200", "--devices", "2", "--scales",
                               "tiny", "--ctx", "256", "--kinds", "transformer", "--set",
                               "model.num_layers=1", timeout=600)
  (r,) = report["results"]
  assert r["status"] == "ok", r
  assert r["target"] == "h200" and r["devices"] == 2
  assert r["mesh"] == {"data": 1, "fsdp": 2, "tensor": 1}
  assert report["config"]["backend"] == cc.TARGETS["h200"]
  m = r["memory"]
  assert m["temp_bytes"] > 0
  assert m["alias_bytes"] == r["state_bytes"]
  assert m["argument_bytes"] == r["state_bytes"] + r["batch_bytes"]
  assert "2 H200s in one host" in stdout


def test_on_h200s_stacked_ttt_blocks_keep_the_layer_remat_a_list_loses(tmp_path):
  # why the paper-scale presets set model.scan_layers=True (docs/scaling.md): in a list of TTT
  # blocks XLA:GPU allocates every block's remat-through-time buffers at once, so the list's
  # temporaries are more than twice the stack's. Eight tiny TTT-MLP blocks at
  # 4K, 8 sequences on one H200: measured 1.90 GiB as a list, 0.80 GiB stacked (at 4 blocks
  # 1.17 against 0.71 GiB)
  if gpu_census.cuda_plugin() is None:
    pytest.skip("JAX's CUDA plugin is not installed here (make gpu-census installs it)")
  temps = {}
  for stacked in (False, True):
    report, _ = _run_script(tmp_path, "--target", "h200", "--devices", "1", "--scales", "tiny",
                            "--ctx", "4k", "--kinds", "ttt_mlp", "--set",
                            f"model.remat=full,model.scan_layers={stacked},model.num_layers=8",
                            timeout=600)
    (r,) = report["results"]
    assert r["status"] == "ok", r
    temps[stacked] = r["memory"]["temp_bytes"]
  assert temps[True] < temps[False] / 2, temps


def test_h200_target_without_the_cuda_plugin_is_one_config_error():
  if gpu_census.cuda_plugin() is not None:
    pytest.skip(f"JAX's CUDA plugin is installed here ({gpu_census.cuda_plugin()})")
  with pytest.raises(ConfigError, match="jax-cuda12-plugin"):
    cc.check(["transformer"], ["tiny"], "256", target="h200", echo=lambda *_: None)


def test_fast_compile_is_refused_for_the_h200_target():
  with pytest.raises(ConfigError, match="--fast_compile"):
    cc.check(["transformer"], ["tiny"], "256", fast_compile=True, target="h200",
             echo=lambda *_: None)


def test_only_the_cpu_target_forces_host_devices(monkeypatch):
  monkeypatch.setenv("XLA_FLAGS", "--xla_force_host_platform_device_count=4")
  cpu = cc.child_env(8, True, "cpu")["XLA_FLAGS"]
  assert "--xla_force_host_platform_device_count=8" in cpu and cc.FAST_COMPILE in cpu
  gpu = cc.child_env(8, True, "h200").get("XLA_FLAGS", "")
  assert "device_count" not in gpu and cc.FAST_COMPILE not in gpu


def test_memory_columns_of_a_program_with_known_buffers():
  """The memory columns against a program whose buffers are known by construction: a donated
  state s [256, 128] f32 updated in place, a batch b [64] i32, and (s s^T) s, whose [256, 256]
  f32 intermediate must exist while it runs (XLA:CPU does not fuse two matmuls)."""
  s = jax.ShapeDtypeStruct((256, 128), jnp.float32)
  b = jax.ShapeDtypeStruct((64,), jnp.int32)
  step = jax.jit(lambda s, b: (s * 2 + 1, (s @ s.T) @ s, jnp.sum(b)), donate_argnums=0)
  m = memory_stats(step.lower(s, b).compile())
  state, batch, product, inter = 256 * 128 * 4, 64 * 4, 256 * 128 * 4, 256 * 256 * 4
  assert m["argument_bytes"] == state + batch
  assert m["alias_bytes"] == state  # the new state is written over the donated one
  outputs = state + product + 4
  assert outputs <= m["output_bytes"] < outputs + 64  # + the output tuple's index table
  assert m["temp_bytes"] >= inter
  # live at once at the second matmul: the arguments, the outputs not written in place (the
  # product and the sum) and the intermediate
  assert m["peak_bytes"] >= state + batch + product + 4 + inter


def test_timeout_is_reported_not_raised():
  r = cc.run_config("transformer", "tiny", "256", (1, -1, 1), devices=8, batch_size=0,
                    overrides=[], timeout=0.01, fast_compile=True)
  assert r["status"] == "timeout" and "within" in r["error"]


def test_presets_and_overrides():
  assert cc.preset_spec("ttt_mlp", "350m", "8k") == (
      "configs/pretrain.py:model=ttt_mlp,scale=350m,ctx=8k")
  e2e = cc.load_preset(cc.preset_spec("e2e", "125m", "2k"))  # the e2e preset fixes ctx: 8K
  assert e2e.model.kind == "e2e" and e2e.data.seq_len == 8192 and e2e.data.batch_size == 64
  ext = cc.load_preset(cc.preset_spec("e2e", "125m", "128k"))  # its context-extension stage
  assert ext.data.seq_len == 131072 and ext.data.batch_size == 16
  cfg = build_config("model=transformer,scale=tiny")
  cc.apply_overrides(cfg, ["model.num_layers=2", "model.remat=dots", "train.lr=0.5",
                           "model.qk_norm=true"])
  m = cfg.model
  assert (m.num_layers, m.remat, cfg.train.lr, m.qk_norm) == (2, "dots", 0.5, True)
  for bad in ("model.layers=2", "model.num_layers", "model.num_layers=two", "nope.x=1",
              "model.qk_norm=maybe"):
    with pytest.raises(ConfigError, match="--set"):
      cc.apply_overrides(cfg, [bad])
  with pytest.raises(ConfigError, match="--mesh"):
    cc.parse_mesh("1,8")
  assert cc.parse_mesh("1,-1,1") == (1, -1, 1)


def test_table_lists_failures():
  ok = {"kind": "swa", "scale": "125m", "status": "ok", "seq_len": 8192, "batch_size": 32,
        "per_device_batch": 4.0, "params": 86e6, "lower_s": 1.0, "compile_s": 2.0,
        "memory": {"argument_bytes": 2**30, "output_bytes": 2**30, "alias_bytes": 2**30,
                   "temp_bytes": 3 * 2**30, "generated_code_bytes": 0, "peak_bytes": 4 * 2**30}}
  bad = {"kind": "e2e", "scale": "350m", "status": "timeout", "error": "not compiled within 9 s"}
  text = cc.table({"results": [ok, bad]})
  assert "| 125m | swa | 8192 | 32 (4) | 86M | 1.00 | 1.00 | 1.00 | 3.00 | 0.000 | 4.00 |" in text
  assert "| 350m | e2e | | | | timeout: not compiled within 9 s |" in text
  assert "arguments GiB" in text
  assert isinstance(cc.load_preset("configs/pretrain.py:model=swa"), ml_collections.ConfigDict)
