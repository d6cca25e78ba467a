"""MFU in the training log: the model-FLOPs formula, the peak table, the logged field."""

from __future__ import annotations

import types

import pytest

from ttt_jax.config import build_config
from ttt_jax.train.flops import peak_flops_per_device, train_flops_per_token
from ttt_jax.train.metrics import read_metrics
from ttt_jax.train.trainer import abstract_model, count_params, train_and_evaluate


def fake_device(kind: str, platform: str = "gpu"):
  return types.SimpleNamespace(device_kind=kind, platform=platform)


@pytest.mark.parametrize("kind,dtype,peak", [
    ("NVIDIA H100 80GB HBM3", "bfloat16", 989e12),
    ("NVIDIA H100 PCIe", "bfloat16", 756e12),
    ("NVIDIA H200", "float32", 495e12),
    ("NVIDIA A100-SXM4-40GB", "bfloat16", 312e12),
    ("TPU v5 lite", "bfloat16", 197e12),
    ("TPU v4", "bfloat16", 275e12),
])
def test_peak_table_matches_device_kinds(kind, dtype, peak):
  got, source = peak_flops_per_device(dtype, fake_device(kind))
  assert got == peak and "data sheet" in source


def test_unknown_accelerator_has_no_peak():
  assert peak_flops_per_device("bfloat16", fake_device("Mystery Accelerator 9000"))[0] is None
  assert peak_flops_per_device("float32", fake_device("TPU v4"))[0] is None


def test_model_flops_count_by_hand():
  c = build_config("model=transformer,scale=tiny,ctx=64")
  m = c.model
  n = count_params(abstract_model(m)[1].to_pure_dict())
  non_embedding = n - 384 * m.d_model  # 259 byte ids padded to 384 rows
  keys = (64 + 1) / 2  # mean keys a causal query sees at T = 64
  expected = 6 * non_embedding + 12 * m.d_model * keys * m.num_layers
  assert train_flops_per_token(c, n) == pytest.approx(expected)


def test_training_log_has_mfu(tmp_path):
  c = build_config("model=swa,scale=tiny,ctx=64")
  m = c.model
  m.num_layers, m.d_model, m.num_heads, m.intermediate_size, m.window = 1, 32, 2, 64, 32
  c.data.batch_size = 2
  c.train.steps, c.train.log_every, c.train.eval_every, c.train.eval_batches = 6, 2, 100, 1
  train_and_evaluate(c, str(tmp_path), echo=lambda s: None)
  recs = [r for r in read_metrics(str(tmp_path)) if "tokens_per_s" in r]
  assert len(recs) >= 2
  for r in recs:
    assert 0 < r["mfu"] < 1
  # mfu = flops/token x tokens/s / peak: the same factor for every record of the run
  per_token = [r["mfu"] / r["tokens_per_s"] for r in recs]
  assert max(per_token) == pytest.approx(min(per_token), rel=1e-9)


def test_tied_and_untied_heads_cost_the_same():
  """The output head is one [D, V] matmul whether or not it shares the embedding table: a tied
  model (one table, counted once in N) and an untied one (table + head) do the same matmuls."""
  flops = {}
  for tie in (True, False):
    c = build_config("model=transformer,scale=tiny,ctx=64")
    c.model.tie_embeddings = tie
    n = count_params(abstract_model(c.model)[1].to_pure_dict())
    flops[tie] = train_flops_per_token(c, n)
  assert flops[True] == pytest.approx(flops[False])
