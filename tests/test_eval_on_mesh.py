"""Evaluation, generation and TLM on the devices a loaded run's parameters lie on: the programs
outside training take the mesh from their parameters (`sharding.OnParamsMesh`), split a batch's
rows over the devices, give one device's numbers and compile once; their kernels run per
device, so splash attention lowers on a multi-device TPU mesh. The checks run in a subprocess
with 8 forced host CPU devices (tests/eval_mesh_worker.py).
"""

from __future__ import annotations

import os
import subprocess
import sys

import pytest

from .test_sharding import _env, _rel, _result, _selected_kinds
from .tiers import core_and_extended

WORKER = os.path.join(os.path.dirname(__file__), "eval_mesh_worker.py")
KINDS = ("transformer", "swa", "ttt_linear-pallas", "ttt_mlp", "e2e", "e2e+scan")
# swa and ttt_mlp are streamed on the mesh in make test-extended only
KIND_PARAMS = core_and_extended(KINDS, ("transformer", "ttt_linear-pallas", "e2e", "e2e+scan"))


@pytest.fixture(scope="module")
def on_mesh(tmp_path_factory, request) -> dict:
  """The run, the lowered kernels, TLM, and the kinds the selected tests read."""
  workdir = str(tmp_path_factory.mktemp("eval_mesh") / "run")
  selected = _selected_kinds(request, "on_mesh")
  kinds = [k for k in KINDS if k in selected]
  p = subprocess.run([sys.executable, WORKER, "--dir", workdir, "--kinds", ",".join(kinds)],
                     env=_env(8), capture_output=True, text=True, timeout=600)
  assert p.returncode == 0, p.stderr[-3000:]
  res = _result(p.stdout, p.stderr)
  assert res["num_devices"] == 8
  return res


def _ok(res: dict) -> dict:
  assert "error" not in res, res["error"]
  return res


def test_a_run_trained_on_8_devices_evaluates_there_as_on_one(on_mesh):
  """load_run places the parameters over every device; evaluate_run there (per-length and
  strided perplexity, position buckets) gives the one-device numbers, for 8 documents in
  batches of 8 and for 10 in batches of 3: batches are rounded up to whole shares of the 8
  devices and the last one filled up, so the chunk steps take every batch as 8 rows split over
  the devices (before, a batch of 3 rows ran whole on every device)."""
  res = _ok(on_mesh["run"])
  assert res["mesh"] == {"data": 8, "fsdp": 1, "tensor": 1}
  for name, docs in (("8x8", 8), ("10x3", 10)):
    assert res[name]["docs"] == docs
    assert len(res[name]["mesh"]) == len(res[name]["single"]) >= 5
    assert _rel(res[name]["mesh"], res[name]["single"]) <= 1e-5, name
  assert res["batches"] == [[8, ["data"]]], res["batches"]


@pytest.mark.parametrize("kind", KIND_PARAMS)
def test_streaming_splits_the_rows_and_compiles_once(on_mesh, kind):
  """Per kind: the streamed NLL equals one device's (the transformer's also with its weights
  FSDP-sharded over (1,8,1), as a trainer holds them); each device's compiled chunk step takes one
  of the 8 rows (it took all 8 before: every device repeated the whole batch); the chunk step
  and the cache initializer compiled once over 4 chunks (the cache comes back placed as it went
  in)."""
  res = _ok(on_mesh["kinds"][kind])
  assert res["nll_rel"] <= 1e-5
  if kind == "transformer":  # weights sharded as on a trainer's FSDP mesh (1,8,1)
    assert res["fsdp_nll_rel"] <= 1e-5
  assert res["token_args"] and set(res["token_args"]) == {"1"}, res["token_args"]
  assert res["step_compiles"] == 1 and res["init_compiles"] == 1


@pytest.mark.parametrize("kind", ("transformer", "e2e"))
def test_generation_on_the_mesh(on_mesh, kind):
  """Greedy generation of 8 rows on the mesh (segments of 4 tokens: the loop runs 3 times) gives
  one device's tokens, with one compiled loop."""
  res = _ok(on_mesh["kinds"][kind])
  assert res["generated_equal"] and res["loop_compiles"] == 1


def test_tlm_adapts_on_a_split_batch(on_mesh):
  """TLM's offline adaptation in batches of 8 samples, the base on the (8,1,1) mesh (the
  samples split over the devices), gives one device's adapted log-perplexities; its update and
  its evaluation compile once."""
  res = _ok(on_mesh["tlm"])
  assert _rel(res["mesh"], res["single"]) <= 1e-5
  assert res["mesh_compiles"] == [1, 1]


@pytest.mark.parametrize("program", ("tpu:transformer:one_shot", "tpu:transformer:tlm",
                                     "tpu:transformer:tlm_step", "cuda:transformer:chunk",
                                     "cuda:ttt_linear-pallas:chunk"))
def test_kernels_lower_per_device_on_the_mesh(on_mesh, program):
  """Lowered for TPU (splash) and CUDA (the cache kernel, TTT-Linear's streaming kernels) with
  the parameters on the (8,1,1) mesh: every kernel call sits in a per-device region that takes
  the batch split. (The TPU ones failed before: "Mosaic kernels cannot be automatically
  partitioned".)"""
  res = _ok(on_mesh["lowered"])[program]
  assert res["inside"] and all(res["inside"]) and res["batch_split"], res
