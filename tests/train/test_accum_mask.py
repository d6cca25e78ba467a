"""Gradient accumulation under an uneven `loss_mask` (one device): the accumulated step equals
the full-batch step (loss, gradient norm, updated parameters), as the needle fine-tune needs;
the sharded, unmasked case is tests/train/test_accum.py."""

from __future__ import annotations

import jax
import numpy as np
import pytest

from ttt_jax.config import build_config
from ttt_jax.train.trainer import Trainer

BATCH, SEQ = 4, 32


def config(kind: str, accum: int):
  c = build_config(f"model={kind},ctx={SEQ}")
  m = c.model
  m.num_layers = 2 if kind == "e2e" else 1
  m.d_model, m.num_heads, m.intermediate_size, m.window = 32, 2, 64, 16
  m.e2e.suffix_len, m.e2e.mini_batch_size, m.e2e.prime_intermediate_size = 1, 16, 64
  c.data.batch_size, c.data.seq_len = BATCH, SEQ
  c.train.warmup_steps, c.train.grad_accum = 0, accum
  return c


@pytest.mark.parametrize("kind", ["transformer", pytest.param("e2e", marks=pytest.mark.extended)])
def test_masked_accumulation_equals_full_batch(kind):
  rng = np.random.default_rng(0)
  tokens = rng.integers(0, 256, (BATCH, SEQ + 1)).astype(np.int32)
  # microbatches are rows (0, 2) and (1, 3): 3 + 4 scored tokens against 30 + 29
  mask = np.zeros((BATCH, SEQ), np.float32)
  mask[0, :3] = mask[2, 5:9] = 1
  mask[1, 2:] = 1
  mask[3, 3:] = 1
  out = {}
  for accum in (1, 2):
    trainer = Trainer.create(config(kind, accum))
    state = trainer.init_state()
    before = jax.device_get(state.params)  # the step donates the state
    new, metrics = trainer.train_step(state, trainer.device_batch(
        {"tokens": tokens, "loss_mask": mask}))
    out[accum] = (float(metrics["loss"]), float(metrics["grad_norm"]),
                  jax.device_get(new.params), before)
  (loss1, g1, p1, p0), (loss2, g2, p2, _) = out[1], out[2]
  assert loss2 == pytest.approx(loss1, rel=1e-5)
  assert g2 == pytest.approx(g1, rel=1e-4)
  # the update itself (Adam's first step is about lr * g / (|g| + eps): elements whose gradient
  # is near eps amplify rounding, so compare the whole update, not each element)
  d1 = np.concatenate([np.ravel(a - b) for a, b in zip(jax.tree.leaves(p1), jax.tree.leaves(p0),
                                                       strict=True)])
  d2 = np.concatenate([np.ravel(a - b) for a, b in zip(jax.tree.leaves(p2), jax.tree.leaves(p0),
                                                       strict=True)])
  assert np.linalg.norm(d2 - d1) <= 1e-3 * np.linalg.norm(d1)
