"""MFU in the training log: the model-FLOPs count against the matmuls the training step really
does, the peak table's lookup, the logged field."""

from __future__ import annotations

import math
import types

import jax
import jax.numpy as jnp
import pytest
from flax import nnx
from jax.extend import core as jcore

from ttt_jax.config import build_config
from ttt_jax.models import build_model, count_params
from ttt_jax.train.flops import PEAK_FLOPS, peak_flops_per_device, train_flops_per_token
from ttt_jax.train.loop import train_and_evaluate
from ttt_jax.train.metrics import read_metrics


def fake_device(kind: str, platform: str = "gpu"):
  return types.SimpleNamespace(device_kind=kind, platform=platform)


# device_kind strings as JAX reports them, and the data-sheet entry each must resolve to: the
# most specific one (an H100 PCIe is not an H100 SXM; a v5 lite is not a v5p)
DEVICE_KINDS = {
    "NVIDIA H100 80GB HBM3": "H100", "NVIDIA H100 PCIe": "H100 PCIe", "NVIDIA H200": "H200",
    "NVIDIA A100-SXM4-40GB": "A100", "NVIDIA A100 80GB PCIe": "A100", "NVIDIA L4": "L4",
    "TPU v4": "TPU v4", "TPU v5 lite": "TPU v5 lite", "TPU v5p": "TPU v5p", "TPU v6 lite": "TPU v6",
}


@pytest.mark.parametrize("kind", list(DEVICE_KINDS))
def test_device_kinds_resolve_to_their_own_entry(kind):
  name = DEVICE_KINDS[kind]
  for dtype, column in (("bfloat16", 0), ("float32", 1)):
    peak, source = peak_flops_per_device(dtype, fake_device(kind))
    if PEAK_FLOPS[name][column] is None:
      assert peak is None, (kind, dtype)
    else:
      assert source == f"data sheet ({name})" and peak == PEAK_FLOPS[name][column]


def test_peak_table_is_consistent():
  """NVIDIA's dense TF32 rate (float32 matmuls on tensor cores) is half the dense bf16 rate on
  every data sheet in the table; TPUs have no float32 matmul rate; an unknown chip has none."""
  for name, (bf16, fp32) in PEAK_FLOPS.items():
    assert 1e13 < bf16 < 1e16, name  # FLOP/s, not TFLOP/s
    if name.startswith("TPU"):
      assert fp32 is None, name
    else:
      assert fp32 == pytest.approx(bf16 / 2, rel=0.01), name
  assert peak_flops_per_device("bfloat16", fake_device("Mystery Accelerator 9000"))[0] is None


# -- model FLOPs against the matmuls of the step -------------------------------------------------


def matmul_flops(jaxpr: jcore.Jaxpr) -> int:
  """FLOPs of every dot_general a jaxpr runs (2 per multiply-add), through nested calls, remat
  and custom-derivative rules; a scan body counts once per iteration."""
  total = 0
  for eqn in jaxpr.eqns:
    if eqn.primitive.name == "dot_general":
      (_, rhs_contract), (_, rhs_batch) = eqn.params["dimension_numbers"]
      lhs, rhs = (v.aval.shape for v in eqn.invars)
      rhs_free = [n for i, n in enumerate(rhs) if i not in rhs_contract + rhs_batch]
      total += 2 * math.prod(lhs) * math.prod(rhs_free)
      continue
    assert eqn.primitive.name not in ("while", "cond"), eqn.primitive  # no fixed trip count
    times = eqn.params["length"] if eqn.primitive.name == "scan" else 1
    for value in eqn.params.values():
      for sub in value if isinstance(value, tuple | list) else (value,):
        if isinstance(sub, jcore.ClosedJaxpr):
          total += times * matmul_flops(sub.jaxpr)
        elif isinstance(sub, jcore.Jaxpr):
          total += times * matmul_flops(sub)
  return total


@pytest.mark.parametrize("kind,tie", [("transformer", True), ("transformer", False),
                                      ("swa", False)])
def test_model_flops_match_the_matmuls_of_the_step(kind, tie):
  """The MFU numerator against an independent count: the dot_general FLOPs in the jaxpr of the
  loss's value and gradient (what a training step computes), per token.

  Two known differences, undone here from first principles: the dense attention computes every
  query x key product and masks afterwards (the model count charges only the keys a causal,
  windowed query sees, counted one query at a time here), and 6N charges the norm scales too
  (6 FLOPs each; no matmul). The output head is a matmul whether or not it is the embedding table
  (tied): the step runs it either way."""
  c = build_config(f"model={kind},scale=tiny,ctx=64")
  m = c.model
  m.tie_embeddings, m.window, m.attention_impl, m.attention_algorithm = tie, 16, "xla", "dense"
  batch, t = 2, c.data.seq_len
  graphdef, params = nnx.split(build_model(m, seed=0))
  tokens = {"tokens": jnp.zeros((batch, t + 1), jnp.int32)}
  loss = lambda p: nnx.merge(graphdef, p).compute_loss(tokens)[0]  # noqa: E731
  step = matmul_flops(jax.make_jaxpr(jax.value_and_grad(loss))(params).jaxpr) / (batch * t)
  window = m.window if kind == "swa" else t
  keys = sum(min(i + 1, window) for i in range(t)) / t  # mean keys per query, counted
  per_layer_unmasked = 3 * 2 * 2 * m.d_model * (t - keys)  # QK^T and PV, fwd + 2x bwd
  norms = sum(x.size for path, x in jax.tree_util.tree_leaves_with_path(nnx.to_pure_dict(params))
              if jax.tree_util.keystr(path).endswith("['scale']"))
  expected = step - m.num_layers * per_layer_unmasked + 6 * norms
  n = count_params(nnx.to_pure_dict(params))
  assert train_flops_per_token(c, n) == pytest.approx(expected, rel=1e-9)


def test_training_log_has_mfu(tmp_path):
  """Every train record has the step's MFU; train.log_every=3 over 7 steps writes the records
  of steps 3, 6 and the last one."""
  c = build_config("model=swa,scale=tiny,ctx=64")
  m = c.model
  m.num_layers, m.d_model, m.num_heads, m.intermediate_size, m.window = 1, 32, 2, 64, 32
  c.data.batch_size = 2
  c.train.steps, c.train.log_every, c.train.eval_every, c.train.eval_batches = 7, 3, 100, 1
  train_and_evaluate(c, str(tmp_path), echo=lambda s: None)
  train = [r for r in read_metrics(str(tmp_path)) if r.get("split") == "train"]
  assert [r["step"] for r in train] == [3, 6, 7]
  recs = [r for r in train if "tokens_per_s" in r]
  assert len(recs) >= 2
  for r in recs:
    assert 0 < r["mfu"] < 1
  # mfu = flops/token x tokens/s / peak: the same factor for every record of the run
  per_token = [r["mfu"] / r["tokens_per_s"] for r in recs]
  assert max(per_token) == pytest.approx(min(per_token), rel=1e-9)
