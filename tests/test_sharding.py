"""Sharding over the (data, fsdp, tensor) mesh: same numbers as one device, really sharded.

The multi-device checks run in subprocesses (tests/sharding_worker.py) with 8 forced host
CPU devices, or as two `jax.distributed` processes on localhost with 4 devices each. The model
kinds the selected tests read are computed, on every mesh, in two subprocesses started once.
"""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys

import jax
import ml_collections
import numpy as np
import pytest
from jax.sharding import Mesh, NamedSharding, PartitionSpec

from ttt_jax import sharding as shd
from ttt_jax.config import MESH_AXES, ConfigError, base_config, parse_rules, validate
from ttt_jax.sharding import activation_sharding, constrain, logical_to_mesh
from ttt_jax.train import distributed

from .fast_compile import FAST_COMPILE
from .tiers import core_and_extended

WORKER = os.path.join(os.path.dirname(__file__), "sharding_worker.py")
# ttt_linear-pallas: the Pallas TTT-Linear kernels (interpreted on CPU), run per device on a
# mesh (`sharding.per_shard`), as a GPU takes them by default; e2e+scan: E2E with its prefix
# blocks stacked (`model.scan_layers`) and its chunk loop, KV window included, in a checkpointed
# group (`model.e2e.remat_group`)
KINDS = ("transformer", "swa", "ttt_linear", "ttt_mlp", "e2e", "ttt_linear-pallas", "e2e+scan")
MESHES = ("8,1,1", "1,8,1", "2,2,2")
# swa's and ttt_mlp's mesh runs are in make test-extended (one-device tests of theirs in make test)
KIND_PARAMS = core_and_extended(KINDS, ("transformer", "ttt_linear", "e2e", "ttt_linear-pallas",
                                        "e2e+scan"))
# the worker processes, run side by side, and the kinds each computes
GROUPS = (("transformer", "swa", "e2e"), ("ttt_linear", "ttt_mlp", "ttt_linear-pallas", "e2e+scan"))


def needs(*kinds: str):
  """The model kinds a test reads from `meshes` other than its `kind` parameter."""
  def mark(fn):
    fn.kinds = kinds
    return fn
  return mark


def _selected(request, fixture: str = "meshes") -> list:
  """The selected tests of the requesting module that read `fixture`: the fixture computes only
  what they read (a `-m` or `-k` selection does not pay for the rest)."""
  return [item for item in request.session.items
          if item.module is request.module and fixture in item.fixturenames]


def _selected_kinds(request, fixture: str = "meshes") -> set[str]:
  kinds = set()
  for item in _selected(request, fixture):
    callspec = getattr(item, "callspec", None)
    if callspec is not None and "kind" in callspec.params:
      kinds.add(callspec.params["kind"])
    kinds.update(getattr(item.function, "kinds", ()))
  return kinds


def _env(devices: int) -> dict:
  # fast_compile.py's flags: the tiny steps run in milliseconds, compiling dominates
  env = dict(os.environ, JAX_PLATFORMS="cpu", TF_CPP_MIN_LOG_LEVEL="2",
             XLA_FLAGS=f"--xla_force_host_platform_device_count={devices} {' '.join(FAST_COMPILE)}")
  env.pop("JAX_COORDINATOR_ADDRESS", None)
  return env


def _result(stdout: str, stderr: str) -> dict:
  for line in stdout.splitlines():
    if line.startswith("RESULT "):
      return json.loads(line[len("RESULT "):])
  raise AssertionError(f"worker printed no result; stderr tail:\n{stderr[-3000:]}")


def _free_port() -> int:
  with socket.socket() as s:
    s.bind(("127.0.0.1", 0))
    return s.getsockname()[1]


@pytest.fixture(scope="module")
def two_processes(tmp_path_factory):
  """Two localhost processes x 4 CPU devices train 3 steps on a (2,2,2) mesh."""
  workdir = str(tmp_path_factory.mktemp("two_proc"))
  port = _free_port()
  procs = [subprocess.Popen(
      [sys.executable, WORKER, "process", "--pid", str(i), "--nproc", "2", "--port", str(port),
       "--dir", workdir], env=_env(4), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
      for i in range(2)]
  results = []
  try:
    for p in procs:
      out, err = p.communicate(timeout=300)
      assert p.returncode == 0, err[-3000:]
      results.append(_result(out, err))
  finally:
    for p in procs:
      if p.poll() is None:
        p.kill()
  return {"workdir": workdir, "procs": results}


@pytest.fixture(scope="module")
def meshes(tmp_path_factory, request):
  """Every selected kind x mesh, in two concurrent subprocesses (compiling dominates; CI has 2
  cores); the first also restores the two-process run's checkpoint when its test is selected."""
  ckpt_dir = str(tmp_path_factory.mktemp("ckpt"))
  selected = _selected_kinds(request)
  extra = [[] for _ in GROUPS]
  if any("two_processes" in item.fixturenames for item in _selected(request)):
    workdir = request.getfixturevalue("two_processes")["workdir"]
    extra[0] = ["--proc-ckpt", os.path.join(workdir, "ckpt")]
  kinds = [[k for k in group if k in selected] for group in GROUPS]
  groups = [["--kinds", ",".join(k), *e] for k, e in zip(kinds, extra, strict=True) if k or e]
  procs = [subprocess.Popen([sys.executable, WORKER, "meshes", "--dir", ckpt_dir, *args],
                            env=_env(8), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
           for args in groups]
  out = {"kinds": {}}
  try:
    for p in procs:
      stdout, stderr = p.communicate(timeout=600)
      assert p.returncode == 0, stderr[-3000:]
      res = _result(stdout, stderr)
      assert res.pop("num_devices") == 8
      out["kinds"].update(res.pop("kinds"))
      out.update(res)
  finally:
    for p in procs:
      if p.poll() is None:
        p.kill()
  assert set(out["kinds"]) == selected
  return out


def _kind(meshes, kind) -> dict:
  res = meshes["kinds"][kind]
  assert "error" not in res, res["error"]
  return res


def _rel(a, b) -> float:
  a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
  return float(np.max(np.abs(a - b) / np.abs(b)))


def _find(specs: dict, suffix: str):
  hits = [v for k, v in specs.items() if k.endswith(suffix)]
  assert hits, f"no parameter path ends with {suffix}: {sorted(specs)[:8]} ..."
  return hits[0]


@pytest.mark.parametrize("kind", KIND_PARAMS)
def test_losses_and_gradients_match_single_device(meshes, kind):
  res = _kind(meshes, kind)
  ref = res["single"]["losses"]
  assert len(ref) == 3 and all(np.isfinite(ref))
  for mesh in MESHES:
    assert _rel(res[mesh]["losses"], ref) <= 1e-5, (mesh, res[mesh]["losses"], ref)
    # The gradient of the first step (Adam's first moment, (1 - b1) x the clipped gradient) of
    # every parameter, from the same initial parameters and batch: equal to reduction-order
    # rounding (measured: <= 1e-6 for most leaves, 1e-5 for TTT's tau, a sum of cancelling
    # terms). A gradient summed over part of the devices, or divided by their count, is off by
    # 1/8 or more; after Adam, which divides out a gradient's scale, losses and parameters
    # would not show a mis-scaled one.
    grads = res[mesh]["grad_rel_diff"]
    assert len(grads) == len(res[mesh]["specs"])
    worst = max(grads, key=grads.get)
    assert grads[worst] <= 5e-5, (mesh, worst, grads[worst])
    # after 3 Adam steps the parameters still agree (measured: <= 3.3e-4): a step is ~lr x the
    # gradient's sign, so an entry whose gradient is ~0 can move by part of a step (lr 1e-2)
    # on rounding noise; the bound is relative to the array's largest entry. The embedding rows
    # of rare tokens are such entries: 9.5e-3 for E2E on (2,2,2), with either
    # model.e2e.window_residuals, while every first-step gradient agrees to 2e-6 (above)
    for leaf, diff in res[mesh]["param_rel_diff"].items():
      assert diff < (2e-2 if leaf.endswith("['embedding']") else 2e-3), (mesh, leaf, diff)


@pytest.mark.parametrize("kind", KIND_PARAMS)
def test_global_norms_sum_per_leaf_rows_unless_parameters_are_split(meshes, kind):
  """`optim.global_norm`'s per-leaf rows (one launch per leaf on a GPU) where every parameter is
  whole on each device (one device; data parallel), per-leaf scalars where FSDP or tensor
  parallelism splits them (the rows of split leaves would each be gathered); the losses and
  gradients above agree either way, and so does the `grad_norm` metric."""
  res = _kind(meshes, kind)
  got = {m: res[m]["norm_rows"] for m in ("single", *MESHES)}
  assert got == {"single": True, "8,1,1": True, "1,8,1": False, "2,2,2": False}, got
  # the grad_norm metric, per-leaf rows on one device against scalars on the split meshes
  ref = res["single"]["grad_norms"]
  assert len(ref) == 3 and all(n > 0 for n in ref), ref
  for mesh in MESHES:
    assert _rel(res[mesh]["grad_norms"], ref) <= 1e-5, (mesh, res[mesh]["grad_norms"])


@needs("e2e")
def test_e2e_inner_loop_keeps_the_sequences_split(meshes):
  """E2E's inner loop is vmapped over sequences; its constraints inside then keep the
  sequences split over the batch's mesh axes (`sharding.vmap_batch`). Without that, each chunk
  step resharded its activations with all-to-alls (138 in this tiny model's FSDP step; 686 in
  the gpu preset's on 8 H200s, docs/gpu_census.md); parameters still move by all-gathers and
  all-reduces."""
  got = _kind(meshes, "e2e")["1,8,1"]["collectives"]
  assert "all-to-all" not in got and got.get("all-gather", 0) > 0, got


@pytest.mark.parametrize("kind", core_and_extended(("ttt_linear", "ttt_mlp"), ("ttt_linear",)))
def test_ttt_inner_loop_reduces_nothing_across_devices_per_trip(meshes, kind):
  """TTT's scan over mini-batches (dual form) takes the inner LayerNorm per sequence, so its
  gradient sums over the batch once, after the loop; before, each trip of the backward scan
  all-reduced its share across the devices (256 all-reduces per step at the gpu preset on 8
  H200s, docs/gpu_census.md)."""
  res = _kind(meshes, kind)["1,8,1"]
  assert res["collectives"].get("all-reduce", 0) > 0  # the gradients' reductions, after it
  assert res["loop_collectives"] == {}, res["loop_collectives"]


@needs("transformer")  # the worker runs it beside the transformer
def test_tlm_adapts_an_fsdp_sharded_model_as_on_one_device(meshes):
  """TLM's adapters and Adam state are placed replicated on the base's mesh and the step keeps
  them there: on FSDP-sharded weights it compiles once and adapts as on one device."""
  res = meshes["tlm"]
  assert "error" not in res, res["error"]
  assert res["1,8,1"]["base_sharded"] and not res["single"]["base_sharded"]
  assert res["1,8,1"]["step_compiles"] == res["single"]["step_compiles"] == 1
  assert _rel(res["1,8,1"]["log_ppl"], res["single"]["log_ppl"]) < 1e-4


@needs("transformer")
def test_a_batch_the_devices_do_not_divide_fails_naming_the_key(meshes):
  """Trainer.create rejects data.batch_size=6 on 8 batch devices (and on data 2 x fsdp 2) in one
  ConfigError naming the key and the mesh axes, not in JAX's IndivisibleError at the first step;
  and train.grad_accum=4 with 2 sequences per device (each microbatch would be computed on
  several devices at once)."""
  errors = meshes["batch_split_errors"]
  assert errors["8,1,1"] == ("data.batch_size=6 must be a multiple of the 8 devices the batch is "
                             "split over (mesh.data=8, by mesh.rules)")
  assert errors["2,2,2"] == ("data.batch_size=6 must be a multiple of the 4 devices the batch is "
                             "split over (mesh.data=2 x mesh.fsdp=2, by mesh.rules)")
  assert errors["2,2,2+accum"] == (
      "train.grad_accum=4 must divide the 2 sequences each device holds (data.batch_size=8 over "
      "4 devices, mesh.data=2 x mesh.fsdp=2): else a microbatch does not split evenly and is "
      "computed on several devices at once")


def test_processes_holding_the_same_rows_read_the_same_windows():
  """`batch_block`: processes group by the rows their devices hold (in blocks or strided, as a
  batch over `fsdp, data` with `data` across hosts puts them); this process's group and the
  number of groups; rows that overlap without being the same are refused in one line naming
  mesh.rules (the two-process test runs the groups themselves)."""
  from types import SimpleNamespace

  from ttt_jax.batch_blocks import batch_block

  class Device(SimpleNamespace):
    __hash__ = object.__hash__

  def holding(*per_device):  # (process, rows) of each device
    devices = {Device(process_index=p): (rows, slice(None)) for p, rows in per_device}
    return SimpleNamespace(devices_indices_map=lambda shape: devices)

  # this test's process is process 0
  assert batch_block(holding((0, slice(0, 4)), (1, slice(4, 8))), 8) == (0, 2)
  assert batch_block(holding((1, slice(0, 4)), (0, slice(4, 8))), 8) == (1, 2)
  assert batch_block(holding((0, slice(0, 8)), (1, slice(0, 8))), 8) == (0, 1)
  strided = holding((0, slice(0, 2)), (1, slice(2, 4)), (0, slice(4, 6)), (1, slice(6, 8)))
  assert batch_block(strided, 8) == (0, 2)
  four = holding(*[(p, slice(2 * p, 2 * p + 2)) for p in range(4)])
  assert batch_block(four, 8) == (0, 4)
  overlapping = holding((0, slice(0, 4)), (1, slice(2, 6)), (1, slice(6, 8)))
  with pytest.raises(ConfigError, match=r"^mesh.rules: the processes hold overlapping but "):
    batch_block(overlapping, 8)


def test_batch_split_counts_the_devices_of_the_batch_axes_only():
  """The check multiplies the sizes of the batch's mesh axes (by the sharding's spec), so a
  tensor axis does not count and a batch of 4 on data 2 x fsdp 2 passes; train.grad_accum must
  divide each device's rows."""
  from types import SimpleNamespace

  from ttt_jax.train.trainer import check_batch_split
  mesh = SimpleNamespace(shape={"data": 2, "fsdp": 2, "tensor": 3})
  check_batch_split(4, SimpleNamespace(spec=PartitionSpec(("data", "fsdp")), mesh=mesh))
  check_batch_split(5, SimpleNamespace(spec=PartitionSpec(), mesh=mesh))  # replicated batch
  with pytest.raises(ConfigError, match=r"batch_size=6 .* 4 devices .*mesh.data=2 x mesh.fsdp=2"):
    check_batch_split(6, SimpleNamespace(spec=PartitionSpec(("data", "fsdp")), mesh=mesh))
  with pytest.raises(ConfigError, match=r"batch_size=3 .* 2 devices .*\(mesh.fsdp=2,"):
    check_batch_split(3, SimpleNamespace(spec=PartitionSpec("fsdp"), mesh=mesh))
  # grad_accum divides each device's rows, or the microbatches would not cover the devices
  check_batch_split(8, SimpleNamespace(spec=PartitionSpec(("data", "fsdp")), mesh=mesh), 2)
  check_batch_split(6, SimpleNamespace(spec=PartitionSpec(), mesh=mesh), 3)  # one batch device
  with pytest.raises(ConfigError, match=r"train.grad_accum=4 must divide the 2 sequences"):
    check_batch_split(8, SimpleNamespace(spec=PartitionSpec(("data", "fsdp")), mesh=mesh), 4)


@needs("ttt_linear")  # the worker runs it beside TTT-Linear
def test_kernels_run_per_device_on_a_mesh(meshes):
  """A Pallas kernel call carries no partitioning rule: on a mesh each device runs it on its own
  sequences and heads (`sharding.per_shard`), with the same result as without a mesh
  (interpreted here; the TTT-Linear kernels' training is compared in the tests above, their
  streaming here), and in
  the lowered multi-device train steps every kernel call sits in a per-device region."""
  res = meshes["kernels"]
  assert "error" not in res, res["error"]
  for name in ("splash", "cache"):  # grouped-query heads, split over 'tensor' with the queries
    assert res[name]["max_rel"] <= 1e-5, (name, res[name])
    assert res[name]["manual_regions"] >= 1, name
  # TTT-Linear's kernels streaming (a partial mini-batch buffered): outputs and state, the
  # kernels in a per-device region
  assert res["ttt_stream"]["max_rel"] <= 1e-5, res["ttt_stream"]
  assert res["ttt_stream"]["manual_regions"] >= 1, res["ttt_stream"]
  # plain code through per_shard, batch or heads not dividing the mesh: value and gradients
  assert max(res["plain"]) <= 1e-6, res["plain"]
  for name, calls in (("ttt_linear-cuda", 6), ("transformer-tpu", 4)):
    # the kernel calls in the module's text. TTT-Linear, 2 layers: each layer's forward kernel,
    # its recompute and the backward kernel; splash (one function shared by the layers): its
    # forward, its forward keeping residuals, and the backward's dq and dkv kernels
    assert res[name]["devices"] == 8
    assert res[name]["inside"] == [True] * calls, (name, res[name])
    assert res[name]["batch_split"], name


@pytest.mark.parametrize("kind", ["e2e", "ttt_linear-pallas"])
def test_custom_rules_train_as_on_one_device(meshes, kind):
  """`mesh.rules` that give the batch all three mesh axes and the vocabulary 'fsdp': E2E's
  per-sequence vmap and the kernels' per-device regions leave the batch's axes to the batch (a
  constraint inside the vmap, or the inner LayerNorm's heads, would otherwise take them again:
  an error, or a device given another head's LayerNorm)."""
  res = _kind(meshes, kind)
  # the rules are the ones applied: the batch over all three axes, the vocabulary on 'fsdp'
  # (by default the batch is on data and fsdp, the vocabulary on tensor and the width on fsdp)
  ruled, default = res["2,2,2+rules"], res["2,2,2"]
  assert ruled["batch_spec"] == [["data", "fsdp", "tensor"]]
  assert default["batch_spec"] == [["data", "fsdp"]]
  assert _find(ruled["specs"], "['embed']['embedding']") == ["fsdp"]
  assert _find(default["specs"], "['embed']['embedding']") == ["tensor", "fsdp"]
  assert _rel(res["2,2,2+rules"]["losses"], res["single"]["losses"]) <= 1e-5
  grads = res["2,2,2+rules"]["grad_rel_diff"]
  assert max(grads.values()) <= 5e-5, max(grads.items(), key=lambda kv: kv[1])


@pytest.mark.parametrize("kind", KIND_PARAMS)
def test_params_really_sharded(meshes, kind):
  res = _kind(meshes, kind)
  # (8,1,1): pure data parallelism, every parameter replicated, batch split 8 ways
  dp = res["8,1,1"]
  assert all(not s for s in dp["specs"].values())
  assert dp["bytes_per_device"] == dp["bytes_total"]
  for mesh in MESHES:
    assert res[mesh]["batch_spec"] == [["data", "fsdp"]]
  # (1,8,1): FSDP over the model width; each device holds ~1/8 of the parameters (a stacked
  # block's weights, the first found with scan_layers, lead with their unsplit `layers` axis)
  layers = [None] if kind.endswith("+scan") else []
  fs = res["1,8,1"]
  assert _find(fs["specs"], "['embed']['embedding']") == [None, "fsdp"]
  assert _find(fs["specs"], "['mlp']['w1']") == [*layers, "fsdp"]
  assert _find(fs["specs"], "['mlp']['w2']") == [*layers, None, "fsdp"]
  # (TTT's per-head inner weights W0 [H, d, d] split over heads = 'tensor' only)
  assert fs["bytes_per_device"] <= 0.3 * fs["bytes_total"]
  # (2,2,2): FSDP x tensor parallel (heads / MLP hidden / vocab over 'tensor')
  tp = res["2,2,2"]
  assert _find(tp["specs"], "['embed']['embedding']") == ["tensor", "fsdp"]
  assert _find(tp["specs"], "['mlp']['w1']") == [*layers, "fsdp", "tensor"]
  assert _find(tp["specs"], "['mlp']['w2']") == [*layers, "tensor", "fsdp"]
  mixer = [s for k, s in tp["specs"].items() if "['mixer']" in k and s]
  assert any("tensor" in s for s in mixer) and any("fsdp" in s for s in mixer), mixer
  assert tp["bytes_per_device"] <= 0.35 * tp["bytes_total"]
  # optimizer moments are sharded exactly like their parameters
  for mesh in MESHES:
    for path, spec in res[mesh]["opt_specs"].items():
      param = path.split(".mu", 1)[1]
      assert spec == res[mesh]["specs"][param], (mesh, path)


@pytest.mark.parametrize("kind", KIND_PARAMS)
def test_checkpoint_restores_on_other_meshes(meshes, kind):
  res = _kind(meshes, kind)
  for target in ("1,8,1", "single"):
    r = res["restore"][target]
    assert r["max_abs_diff"] == 0.0, (target, r)
    assert r["specs_match"], target


@needs("transformer")
def test_two_processes_match_single_process(two_processes, meshes):
  p0, p1 = two_processes["procs"]
  ref = meshes["pipeline_single"]["losses"]
  for p in (p0, p1):
    assert p["process_count"] == 2 and p["global_devices"] == 8 and p["local_devices"] == 4
    assert p["mesh"] == {"data": 2, "fsdp": 2, "tensor": 2}
    assert p["embed_spec"] == ["tensor", "fsdp"]
    assert p["local_rows"] == 4  # each process loads only its half of the global batch of 8
    assert _rel(p["losses"], ref) <= 1e-5, (p["losses"], ref)
  assert p0["first_window_head"] != p1["first_window_head"]
  # a batch that no mesh axis splits across the processes: each feeds all of it, alike
  for p in (p0, p1):
    assert p["whole_batch"]["shard"] == [0, 1] and p["whole_batch"]["local_rows"] == 8
    assert _rel(p["whole_batch"]["losses"], ref) <= 1e-5, (p["whole_batch"]["losses"], ref)
  assert p0["whole_batch"]["first_window_head"] == p1["whole_batch"]["first_window_head"]
  # only process 0 writes metrics
  assert p0["writer_enabled"] and not p1["writer_enabled"]
  with open(os.path.join(two_processes["workdir"], "run", "metrics.jsonl")) as f:
    assert len(f.readlines()) == 1
  # the collectively written checkpoint restores on one device and matches the 1-process run
  assert meshes["proc_ckpt_max_rel_diff"] < 2e-3, meshes["proc_ckpt_max_rel_diff"]


# -- in-process unit checks (no subprocess) ------------------------------------------------------


class _FakeMesh:
  def __init__(self, **shape):
    self.shape = shape


def test_logical_to_mesh_rules():
  mesh = _FakeMesh(data=2, fsdp=4, tensor=2)
  to = logical_to_mesh
  assert to(("embed", "mlp"), (64, 128), mesh) == PartitionSpec("fsdp", "tensor")
  assert to(("batch", None, "embed"), (8, 3, 64), mesh) == PartitionSpec(("data", "fsdp"))
  # a dimension the axes do not divide stays replicated; a partial prefix is kept
  assert to(("embed", "heads"), (6, 3), mesh) == PartitionSpec()
  assert to(("batch",), (2,), mesh) == PartitionSpec("data")
  # size-1 mesh axes are dropped; no names -> replicated
  assert to(("embed",), (64,), _FakeMesh(data=8, fsdp=1, tensor=1)) == PartitionSpec()
  assert to(None, (4,), mesh) == PartitionSpec()


def test_kernel_arguments_split_alike_by_name():
  """A kernel's arguments (per_shard) split each logical name once for all of them: query and
  key/value heads only where the mesh splits both (their grouping must survive), never over an
  axis an earlier name or an enclosing vmap took. Without a mesh per_shard hands back the
  kernel itself."""
  def split(shapes, mesh, rules=shd.LOGICAL_RULES, taken=()):
    arrays = [jax.ShapeDtypeStruct(s, np.float32) for s in shapes]
    return shd.shared_split([(("batch", None, "heads"), a) for a in arrays], mesh, rules, taken)

  tp = _FakeMesh(data=1, fsdp=2, tensor=2)
  assert split([(4, 8, 8, 16), (4, 8, 4, 16)], tp) == {"batch": ("fsdp",), "heads": ("tensor",)}
  assert split([(4, 8, 8, 16), (4, 8, 1, 16)], tp)["heads"] == ()  # one key/value head
  assert split([(3, 8, 6, 16), (3, 8, 3, 16)], tp) == {"batch": (), "heads": ()}
  assert split([(4, 8, 8, 16)], tp, taken=("fsdp",))["batch"] == ()  # a vmap has it
  # the batch takes 'tensor' first (mesh.rules): the heads stay whole, for every argument
  rules = tuple(dict(shd.LOGICAL_RULES, batch=("data", "fsdp", "tensor")).items())
  assert split([(4, 8, 8, 16), (4, 8, 4, 16)], tp, rules) == {"batch": ("fsdp", "tensor"),
                                                             "heads": ()}
  # heads over fsdp+tensor, the batch holding fsdp: 'tensor' (4) must divide both head counts
  rules = tuple(dict(shd.LOGICAL_RULES, heads=("fsdp", "tensor")).items())
  assert split([(2, 8, 4, 16), (2, 8, 2, 16)], _FakeMesh(data=1, fsdp=2, tensor=4),
               rules)["heads"] == ()

  def fn(x):
    return x
  assert shd.per_shard(fn, [("batch",)], ("batch",)) is fn


def test_streaming_state_split_where_it_grows_with_the_batch():
  """grown_split (the placement of an evaluation cache on a loaded run's mesh) finds each
  array's batch dimension by shaping the state at two batch sizes: behind a scanned layer axis,
  not confused with another dimension of the same size; none (positions, counters):
  replicated. A batch the axes do not divide takes a prefix of them, or none. mesh_of and
  batch_ways read the mesh from where arrays lie."""
  mesh = jax.sharding.AbstractMesh((4, 2, 1), MESH_AXES)

  def make(b):
    return {"kv": np.zeros((3, b, 8, 4)), "w": np.zeros((b, 8, 8)), "pos": np.zeros((8,)),
            "count": np.zeros(())}

  specs = lambda b: {k: v.spec for k, v in shd.grown_split(make, b, mesh).items()}  # noqa: E731
  assert specs(8) == {"kv": PartitionSpec(None, ("data", "fsdp")),
                      "w": PartitionSpec(("data", "fsdp")), "pos": PartitionSpec(),
                      "count": PartitionSpec()}
  assert specs(4)["kv"] == PartitionSpec(None, "data") and specs(3)["w"] == PartitionSpec()
  assert shd.mesh_of({"w": np.zeros(3)}) is None and shd.batch_ways({"w": np.zeros(3)}) == 1
  # a batch on that mesh splits 8 ways (data x fsdp), 4 if the rules give it 'data' alone
  on = {"w": jax.ShapeDtypeStruct((2,), np.float32, sharding=NamedSharding(mesh, PartitionSpec()))}
  rules = tuple(dict(shd.LOGICAL_RULES, batch=("data",)).items())
  assert shd.mesh_of(on) == mesh and shd.batch_ways(on) == 8 and shd.batch_ways(on, rules) == 4


def test_rules_from_config_override_defaults():
  rules = dict(parse_rules("embed=,mlp=fsdp+tensor,batch=data,expert=tensor"))
  assert rules["embed"] is None and rules["mlp"] == ("fsdp", "tensor")
  assert rules["batch"] == "data" and rules["expert"] == "tensor"
  assert rules["heads"] == "tensor"  # untouched default
  mesh = _FakeMesh(data=2, fsdp=2, tensor=2)
  spec = logical_to_mesh(("embed", "mlp"), (64, 128), mesh, tuple(rules.items()))
  assert spec == PartitionSpec(None, ("fsdp", "tensor"))
  for bad in ("embed", "embed=model", "=fsdp"):
    with pytest.raises(ConfigError, match="mesh.rules"):
      parse_rules(bad)
  c = base_config()
  c.mesh.rules = "mlp=pipeline"
  with pytest.raises(ConfigError, match="mesh.rules"):
    validate(c)


def test_mesh_shape_from_config():
  m = ml_collections.ConfigDict({"data": -1, "fsdp": 2, "tensor": 2})
  assert shd.resolve_mesh_shape(m, 8) == (2, 2, 2)
  m.data = 4
  with pytest.raises(ConfigError, match="= 16 but there are 8 devices"):
    shd.resolve_mesh_shape(m, 8)
  m.data, m.fsdp = -1, -1
  with pytest.raises(ConfigError, match="at most one"):
    shd.resolve_mesh_shape(m, 8)
  m.fsdp, m.tensor = 3, 1
  with pytest.raises(ConfigError, match="does not divide"):
    shd.resolve_mesh_shape(m, 8)


def test_constrain_is_noop_without_mesh():
  x = np.ones((4, 8), np.float32)
  assert constrain(x, ("batch", "embed")) is x
  one = Mesh(np.asarray(jax.devices()[:1]).reshape(1, 1, 1), MESH_AXES)
  with activation_sharding(one):
    assert constrain(x, ("batch", "embed")) is x


def test_distributed_init_kwargs():
  m = base_config().mesh
  assert distributed.init_kwargs(m, environ={}) == {}
  env = {"JAX_COORDINATOR_ADDRESS": "10.0.0.1:1234", "JAX_NUM_PROCESSES": "4",
         "JAX_PROCESS_ID": "3"}
  assert distributed.init_kwargs(m, environ=env) == {
      "coordinator_address": "10.0.0.1:1234", "num_processes": 4, "process_id": 3}
  m.coordinator_address, m.process_id = "host:99", 1
  assert distributed.init_kwargs(m, environ=env)["coordinator_address"] == "host:99"
  assert distributed.init_kwargs(m, environ=env)["process_id"] == 1
  assert not distributed.initialize(base_config())  # mesh.distributed=False: nothing to do


def test_a_host_name_that_does_not_resolve_fails_in_one_line(monkeypatch):
  """A multi-process job's CPU backend starts gloo's collectives, which look the host name up;
  one that does not resolve is a ConfigError naming it and mesh.distributed, before the
  coordinator is contacted (jax.distributed.initialize is not reached). A name that resolves,
  another collectives implementation, or JAX_PLATFORMS without cpu pass."""
  def unresolvable(name, port):
    raise socket.gaierror(-2, "Name or service not known")

  reached = []
  monkeypatch.setattr(jax.distributed, "initialize", lambda **kw: reached.append(kw))
  monkeypatch.setattr(jax.distributed, "is_initialized", lambda: False)
  monkeypatch.setattr(socket, "gethostname", lambda: "node-17")
  monkeypatch.setattr(socket, "getaddrinfo", unresolvable)
  cfg = base_config()
  cfg.mesh.distributed = True
  with pytest.raises(ConfigError, match=r"mesh.distributed=True: .*'node-17' does not resolve "
                                        r"\(Name or service not known\).*gloo.*/etc/hosts"):
    distributed.initialize(cfg)
  assert reached == []
  # no lookup where gloo is not used, or where the CPU backend is not started
  for collectives, platforms in (("mpi", ""), (None, ""), ("gloo", "cuda")):
    distributed.check_host_name(collectives, platforms)
  for platforms in ("", "cpu", "cuda,cpu"):
    with pytest.raises(ConfigError, match="node-17"):
      distributed.check_host_name("gloo", platforms)
  # a name that resolves: the job is joined
  monkeypatch.setattr(socket, "getaddrinfo", lambda name, port: [("addr",)])
  distributed.check_host_name("gloo", "")
  assert distributed.initialize(cfg) and len(reached) == 1
