"""Gradient accumulation on a sharded batch: each microbatch stays split over the batch axes.

The checks run in a subprocess (this file, run as a script) with 8 forced host CPU devices. For
each model kind and mesh, one train step with `train.grad_accum=2` is compared with the same step
unaccumulated, and the compiled steps' HLO is searched for collectives that move batch data
(tokens, activations) between devices. With the rows of every microbatch on their own devices,
accumulating adds none: no collective ever moves the integer tokens, and any activation
collective of the accumulating step is one the unaccumulated step has too (same op, dtype and
non-batch dimensions; the transformer has none at all, only FSDP's parameter all-gathers and
gradient reductions).
"""

from __future__ import annotations

import argparse
import json
import os
import re
import subprocess
import sys

import jax
import numpy as np
import optax
import pytest

from ttt_jax import sharding as shd
from ttt_jax.config import build_config
from ttt_jax.train.trainer import Trainer

# accumulation on meshes (on one device: test_train.py, in make test)
pytestmark = pytest.mark.extended

KINDS = ("transformer", "e2e")
MESHES = {"8,1,1": (8, 1, 1), "1,8,1": (1, 8, 1)}
BATCH, SEQ, ACCUM = 16, 48, 2  # 8 rows per microbatch: one row per device
# an HLO instruction `%name = type[dims]{layout} op(` of a collective that moves data
MOVES_DATA = re.compile(r"= (\w+)\[([\d,]*)\]\S* (all-gather|all-to-all|collective-permute|"
                        r"reduce-scatter)(?:-start)?\(")


def tiny_config(kind: str, mesh: tuple[int, int, int], accum: int):
  c = build_config(f"model={kind},ctx={SEQ}")
  m = c.model
  m.num_layers = 2 if kind == "e2e" else 1  # e2e: one prefix + one suffix block
  m.d_model, m.num_heads, m.intermediate_size = 64, 4, 128
  m.window = 16
  m.e2e.suffix_len, m.e2e.mini_batch_size, m.e2e.prime_intermediate_size = 1, 16, 128
  m.e2e.ilr_warmup_steps = 1
  c.data.batch_size, c.data.seq_len, c.data.shuffle, c.data.prefetch = BATCH, SEQ, False, 0
  c.train.steps, c.train.warmup_steps, c.train.lr = 3, 0, 1e-2  # lr 1e-2 from step 0
  c.train.grad_accum = accum
  c.mesh.data, c.mesh.fsdp, c.mesh.tensor = mesh
  return c


def _squeeze(shape) -> tuple[int, ...]:
  return tuple(int(d) for d in shape if int(d) != 1)


def batch_collectives(hlo: str, param_shapes: set[tuple[int, ...]]) -> list[list]:
  """[op, dtype, shape, HLO line] of each collective that moves anything but a parameter."""
  params = {_squeeze(s) for s in param_shapes}
  found = []
  for line in hlo.splitlines():
    m = MOVES_DATA.search(line)
    if not m:
      continue
    dtype, dims, op = m.groups()
    shape = [int(d) for d in dims.split(",") if d]
    if op == "all-gather" and dtype == "f32" and _squeeze(shape) in params:
      continue  # FSDP: a parameter (or a reshape of it) gathered before use
    found.append([op, dtype, shape, line.strip()[:200]])
  return found


def _flat(tree) -> dict[str, np.ndarray]:
  return {jax.tree_util.keystr(p): np.asarray(x, np.float64)
          for p, x in jax.tree_util.tree_leaves_with_path(jax.device_get(tree))}


def _max_rel(a: dict, b: dict, grads: dict | None = None) -> float:
  """Largest |a - b| of any array, relative to that array's largest |b| entry; with `grads`,
  only over the entries whose gradient is above 1% of the array's largest one."""
  worst = 0.0
  for k, ref in b.items():
    diff = np.abs(a[k] - ref)
    if grads is not None:
      g = np.abs(grads[k])
      diff = np.where(g > 1e-2 * g.max(), diff, 0.0)
    worst = max(worst, float(diff.max() / (np.abs(ref).max() + 1e-30)))
  return worst


def worker(kinds: list[str]) -> dict:
  devices = jax.devices()
  tokens = np.random.default_rng(0).integers(0, 259, (BATCH, SEQ + 1), dtype=np.int32)
  out: dict = {"num_devices": len(devices), "kinds": {}}
  for kind in kinds:
    res = out["kinds"][kind] = {}
    init = None
    for name, mesh in MESHES.items():
      steps = {}
      for accum in (1, ACCUM):
        cfg = tiny_config(kind, mesh, accum)
        tr = Trainer.create(cfg, shd.make_mesh(cfg.mesh, devices))
        if init is None:
          init = jax.device_get(tr.init_state())
        state = jax.device_put(init, tr.state_shardings)
        batch = tr.device_batch({"tokens": tokens})
        compiled = tr.train_step.lower(state, batch).compile()
        hlo = compiled.as_text()
        new, metrics = compiled(state, batch)
        shapes = {tuple(x.shape) for x in jax.tree.leaves(tr.abstract_params)}
        steps[accum] = {
            "metrics": {k: float(v) for k, v in jax.device_get(metrics).items()},
            "params": _flat(new.params),
            "mu": _flat(optax.tree_utils.tree_get(new.opt_state, "mu")),
            "moves": batch_collectives(hlo, shapes)}
      one, acc = steps[1], steps[ACCUM]
      res[name] = {
          "metrics": one["metrics"], "metrics_accum": acc["metrics"],
          # Adam's first moment after one step is 0.1 x the (clipped) gradient
          "grad_max_rel_diff": _max_rel(acc["mu"], one["mu"]),
          "param_max_rel_diff": _max_rel(acc["params"], one["params"], one["mu"]),
          "param_max_abs_diff": max(float(np.max(np.abs(acc["params"][k] - p)))
                                    for k, p in one["params"].items()),
          "moves": one["moves"], "moves_accum": acc["moves"],
      }
  return out


@pytest.fixture(scope="module")
def accum_results():
  # fast_compile.py's flags (the collectives searched for are placed before code generation)
  from ..fast_compile import FAST_COMPILE  # noqa: PLC0415 (this file also runs as a script)

  env = dict(os.environ, JAX_PLATFORMS="cpu", TF_CPP_MIN_LOG_LEVEL="2",
             XLA_FLAGS=f"--xla_force_host_platform_device_count=8 {' '.join(FAST_COMPILE)}")
  p = subprocess.run([sys.executable, __file__, "--kinds", ",".join(KINDS)], env=env,
                     capture_output=True, text=True, timeout=600)
  assert p.returncode == 0, p.stderr[-3000:]
  lines = [s for s in p.stdout.splitlines() if s.startswith("RESULT ")]
  assert lines, p.stderr[-3000:]
  res = json.loads(lines[-1][len("RESULT "):])
  assert res["num_devices"] == 8
  return res["kinds"]


@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("mesh", MESHES)
def test_accumulated_step_equals_full_batch_step(accum_results, kind, mesh):
  r = accum_results[kind][mesh]
  for key, ref in r["metrics"].items():
    if key == "lr":
      continue
    got = r["metrics_accum"][key]
    assert abs(got - ref) <= 1e-5 * max(abs(ref), 1e-6), (key, got, ref)
  assert r["grad_max_rel_diff"] <= 1e-5
  # Adam's first update is lr * g / (|g| + 1e-8) ~ lr * sign(g): where the gradient is not
  # ~0 it is the same to 1e-5; where it is ~0, summation-order noise can move an entry by up to
  # lr (1e-2) in either step, accumulated or not
  assert r["param_max_rel_diff"] <= 1e-5
  assert r["param_max_abs_diff"] <= 2e-2


@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("mesh", MESHES)
def test_accumulation_moves_no_batch_data(accum_results, kind, mesh):
  r = accum_results[kind][mesh]
  lines = "\n".join(m[3] for m in r["moves_accum"])
  assert not [m for m in r["moves_accum"] if m[1] != "f32"], lines  # tokens, masks
  assert len(r["moves_accum"]) <= len(r["moves"]), lines
  baseline = {(op, dtype, tuple(shape[1:])) for op, dtype, shape, _ in r["moves"]}
  for op, dtype, shape, line in r["moves_accum"]:
    assert (op, dtype, tuple(shape[1:])) in baseline, line
  if kind == "transformer":
    assert not r["moves_accum"], lines


def test_collective_filter():
  hlo = ("%all-gather.5 = s32[2,2,49]{2,1,0} all-gather(%bitcast.86), channel_id=1\n"
         "%all-gather.4 = f32[64,64]{1,0} all-gather(%param.1), channel_id=5\n"
         "%all-gather.6 = f32[1,64]{0,1} all-gather(%bitcast.2), channel_id=6\n"
         "%collective-permute.13 = f32[1,48,64]{2,1,0} collective-permute(%fusion)\n"
         "%all-reduce.2 = f32[64,64]{1,0} all-reduce(%dot), channel_id=7\n")
  found = batch_collectives(hlo, {(64, 64), (64,)})
  assert [m[:3] for m in found] == [["all-gather", "s32", [2, 2, 49]],
                                    ["collective-permute", "f32", [1, 48, 64]]]


if __name__ == "__main__":
  ap = argparse.ArgumentParser()
  ap.add_argument("--kinds", default=",".join(KINDS))
  result = worker(ap.parse_args().kinds.split(","))
  sys.stdout.write("RESULT " + json.dumps(result) + "\n")
