"""Training on the embedded corpus: the loss falls, runs are reproducible, accumulation is exact."""

import jax
import numpy as np
import pytest

from ttt_jax.config import build_config
from ttt_jax.data import pipeline
from ttt_jax.train.loop import train_and_evaluate
from ttt_jax.train.trainer import Trainer


def tiny_config(kind="swa", steps=40):
  c = build_config(f"model={kind},scale=tiny,ctx=64")
  c.model.num_layers, c.model.d_model, c.model.num_heads = 2, 64, 4
  c.model.intermediate_size = 128
  c.model.window = 32
  c.data.batch_size = 8
  c.train.steps, c.train.warmup_steps, c.train.lr = steps, 5, 3e-3
  c.train.log_every, c.train.eval_every, c.train.eval_batches = 5, steps, 2
  return c


def losses_of(run):
  history, state = run
  return [h["loss"] for h in history], state


def test_tiny_model_learns_the_embedded_corpus(tmp_path):
  # 200 steps: the corpus is the running Python's own standard library, so it differs between
  # Python versions; after 200 the validation loss is below the unigram entropy by 0.25 on
  # Python 3.11's and 3.13's
  config = tiny_config(steps=200)
  config.train.lr = 1e-2
  out = train_and_evaluate(config, str(tmp_path))
  losses = [h["loss"] for h in out["history"]]
  assert losses[-1] < losses[0] - 1.0, losses  # starts near ln(259) = 5.56
  stream = out["trainer"].data.stream("train")  # the run's own data, resolved once
  assert out["val"]["loss"] < pipeline.unigram_entropy(stream.tokens, 259)
  assert (tmp_path / "metrics.jsonl").exists()
  assert any((tmp_path / "tensorboard").iterdir())


@pytest.mark.parametrize("kind", ["transformer", "swa"])
def test_same_seed_same_losses(kind, train_steps):
  a, _ = losses_of(train_steps(tiny_config(kind), 4))
  b, _ = losses_of(train_steps(tiny_config(kind), 4))
  assert a == b


def test_grad_accumulation_matches_one_big_batch(train_steps):
  one, s1 = losses_of(train_steps(tiny_config(), 2))
  cfg = tiny_config()
  cfg.train.grad_accum = 4
  four, s4 = losses_of(train_steps(cfg, 2))
  np.testing.assert_allclose(one, four, rtol=1e-5)
  for a, b in zip(jax.tree.leaves(s1.params), jax.tree.leaves(s4.params), strict=True):
    np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=2e-4, atol=2e-6)


@pytest.mark.parametrize("kind", ["swa", "e2e"])
def test_validation_runs_in_the_train_steps_microbatches(kind):
  """With train.grad_accum=4 the eval step runs the batch in the same 4 microbatches (a run
  that fits only because of them validates too): the same metrics as one call over the whole
  batch, in less memory."""
  one, four = tiny_config(kind), tiny_config(kind)
  four.train.grad_accum = 4
  t1, t4 = Trainer.create(one), Trainer.create(four)
  params = t1.init_state().params
  batch = t1.device_batch(t1.dataset("validation", shuffle=False)[0])
  m1, m4 = t1.eval_step(params, batch), t4.eval_step(params, batch)
  assert set(m1) == set(m4) and "loss" in m1
  for k in m1:
    np.testing.assert_allclose(float(m4[k]), float(m1[k]), rtol=2e-6, err_msg=k)
  temp = lambda t: t.eval_step.lower(params, batch).compile().memory_analysis()  # noqa: E731
  assert temp(t4).temp_size_in_bytes < temp(t1).temp_size_in_bytes


@pytest.mark.parametrize("remat", ["none", "full", "dots"])
def test_scan_layers_and_remat_give_the_same_loss_and_grads(remat):
  """A Python loop over blocks == a lax.scan over the same weights stacked, under any remat."""
  loop = Trainer.create(tiny_config())
  cfg = tiny_config()
  cfg.model.scan_layers, cfg.model.remat = True, remat
  scan = Trainer.create(cfg)
  params = loop.init_state().params
  stacked = dict(params, blocks=jax.tree.map(lambda *xs: np.stack(xs), *params["blocks"].values()))
  ds = loop.dataset("train")
  batch = loop.device_batch(ds[0])
  grad = lambda t, p: jax.value_and_grad(lambda p: t.loss_fn(p, batch, 0)[0])(p)  # noqa: E731
  (l1, g1), (l2, g2) = grad(loop, params), grad(scan, stacked)
  np.testing.assert_allclose(float(l1), float(l2), rtol=1e-5)
  g1 = dict(g1, blocks=jax.tree.map(lambda *xs: np.stack(xs), *g1["blocks"].values()))
  for a, b in zip(jax.tree.leaves(g1), jax.tree.leaves(g2), strict=True):
    np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=1e-4, atol=1e-7)


def test_remat_policies_trade_recomputed_matmuls_for_memory():
  """model.remat: 'full' recomputes every block in the backward pass (its matmuls counted
  again), 'dots' keeps the outputs of the matmuls with a weight and recomputes the rest
  (attention's products of activations included), so both its recomputed work and its
  buffers lie between those of 'none' and 'full'."""
  from ttt_jax.benchmarks.common import counted_flops  # noqa: PLC0415

  flops, temp = {}, {}
  for remat in ("none", "dots", "full"):
    cfg = tiny_config("transformer")
    cfg.model.remat = remat
    trainer = Trainer.create(cfg)
    params = trainer.init_state().params
    batch = trainer.device_batch(trainer.dataset("train")[0])
    grad = jax.grad(lambda p, b, t=trainer: t.loss_fn(p, b, 0)[0])
    compiled = jax.jit(grad).lower(params, batch).compile()
    flops[remat] = counted_flops(compiled)
    temp[remat] = compiled.memory_analysis().temp_size_in_bytes
  assert flops["none"] < flops["dots"] < flops["full"], flops
  assert temp["full"] < temp["dots"] < temp["none"], temp


def test_create_leaves_the_callers_config_as_given(tmp_path, word_tokenizer):
  """model.vocab_size follows the data tokenizer in `trainer.config`, a copy: the config passed in
  keeps its value (a caller reusing it for another tokenizer or run is not surprised)."""
  path = word_tokenizer(tmp_path, [*"abcdefghijklmnopqrstuvwxyz", "[UNK]"], "[UNK]")
  config = tiny_config()
  config.data.tokenizer = f"hf:{path}"
  before = config.to_dict()
  trainer = Trainer.create(config)
  assert config.to_dict() == before and config.model.vocab_size == 259
  assert trainer.config.model.vocab_size == 30  # 27 + BOS, EOS, PAD
  assert trainer.abstract_params["embed"]["embedding"].shape[0] >= 30


@pytest.mark.parametrize("kind", ["ttt_mlp", "e2e"])
def test_validation_runs_the_full_inner_lr_like_evaluate(kind):
  """During the inner-LR warm-up the train step scales the inner LR; validation does not: its
  loss is the loss with no step (what evaluate.py computes), not the warmed-up one."""
  config = tiny_config(kind)
  config.model.ttt.lr_warmup_steps = config.model.e2e.ilr_warmup_steps = 1000
  config.model.e2e.mini_batch_size = 16
  trainer = Trainer.create(config)
  params = trainer.init_state().params
  batch = trainer.device_batch(trainer.dataset("validation", shuffle=False)[0])
  got = float(trainer.eval_step(params, batch)["loss"])
  loss = jax.jit(lambda p, b, s: trainer.loss_fn(p, b, s)[0], static_argnums=2)
  full, warming = float(loss(params, batch, None)), float(loss(params, batch, 0))
  assert abs(got - full) <= 1e-6 * abs(full)
  # the multiplier is visible at this step: by over 40 fp32 spacings of this loss, 1.9e-5 (the
  # agreement above allows 12). TTT-MLP's inner steps move it least at initialisation: by 1.0e-4
  # on Python 3.11's corpus, 6.2e-5 on 3.13's (the corpus is the running Python's own library)
  assert abs(warming - full) > 40 * np.spacing(np.float32(full)), (warming, full)
