"""TLM: selection weights, zero gradient below P0, frozen base, adaptation to a shifted domain."""

import math

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import nnx

from ttt_jax.config import ConfigError, build_config
from ttt_jax.data.tokenizers import ByteTokenizer
from ttt_jax.eval import tlm as tlm_lib
from ttt_jax.layers.lora import merge_lora
from ttt_jax.models import build_model
from ttt_jax.models.lm import split_batch, token_nll

SEQ = 32


def tiny_model_config():
  c = build_config(f"model=transformer,ctx={SEQ}")
  m = c.model
  m.num_layers, m.d_model, m.num_heads, m.intermediate_size = 2, 32, 2, 64
  return c.model


def domain(kind: str, n: int, seed: int) -> np.ndarray:
  """Synthetic domains [n, SEQ+1]: A counts by 1 over tokens 0..15, B by 5 over 100..112."""
  rng = np.random.default_rng(seed)
  start = rng.integers(0, 16, size=(n, 1))
  t = np.arange(SEQ + 1)[None, :]
  if kind == "A":
    return ((start + t) % 16).astype(np.int32)
  return (100 + (start + 5 * t) % 13).astype(np.int32)


@pytest.fixture(scope="module")
def trained_model_state():
  """A tiny LM trained for a few steps on domain A (graphdef, params)."""
  model = build_model(tiny_model_config(), seed=0)
  graphdef, params = nnx.split(model)
  opt = optax.adam(3e-3)
  data = domain("A", 64, seed=0)

  @jax.jit
  def step(params, opt_state, batch):
    loss_fn = lambda p: nnx.merge(graphdef, p).compute_loss({"tokens": batch})[0]  # noqa: E731
    grads = jax.grad(loss_fn)(params)
    updates, opt_state = opt.update(grads, opt_state, params)
    return optax.apply_updates(params, updates), opt_state

  opt_state = opt.init(params)
  for i in range(40):
    params, opt_state = step(params, opt_state, jnp.asarray(data[(i * 8) % 64:(i * 8) % 64 + 8]))
  return graphdef, params


def fresh_model(state):
  graphdef, params = state
  return nnx.merge(graphdef, jax.tree.map(jnp.copy, params))


def tlm_config(**kw):
  c = tlm_lib.default_config()
  c.rank, c.alpha, c.eval_batch_size = 4, 8.0, 8
  c.update(kw)
  return c


def test_selection_weights_hand_computed():
  log_p = jnp.array([2.0, 3.0, 3.5, 5.0])
  w = np.asarray(tlm_lib.selection_weights(log_p, 0.1, 3.0))
  expected = [0.0, 0.0, 0.1 * math.exp(0.5), 0.1 * math.exp(2.0)]  # P = P0 exactly: not selected
  np.testing.assert_allclose(w, expected, rtol=1e-6)
  np.testing.assert_allclose(np.asarray(tlm_lib.selection_weights(log_p, 0.5, 1.0)),
                             [0.5 * math.exp(1.0), 0.5 * math.exp(2.0), 0.5 * math.exp(2.5),
                              0.5 * math.exp(4.0)], rtol=1e-6)


def test_log_ppl_matches_reference(trained_model_state):
  model = fresh_model(trained_model_state)
  x = jnp.asarray(np.concatenate([domain("A", 2, 1), domain("B", 2, 1)]))
  ref = [float(token_nll(*((lambda i, t: (model(i)[0], t))(*split_batch({"tokens": x[j:j + 1]})))))
         for j in range(4)]
  tlm, lora = tlm_lib.TLM.create(model, tlm_config())
  np.testing.assert_allclose(np.asarray(tlm.log_ppl(lora, x)), ref, rtol=1e-5)


def test_unselected_samples_get_zero_gradient(trained_model_state):
  model = fresh_model(trained_model_state)
  probe, lora = tlm_lib.TLM.create(model, tlm_config())
  low, high = jnp.asarray(domain("A", 1, 3)), jnp.asarray(domain("B", 1, 3))
  lp_low, lp_high = float(probe.log_ppl(lora, low)[0]), float(probe.log_ppl(lora, high)[0])
  assert lp_low + 0.5 < lp_high
  log_p0 = (lp_low + lp_high) / 2
  tlm, lora = tlm_lib.TLM.create(fresh_model(trained_model_state), tlm_config(log_p0=log_p0))
  _, w_low, g_low = tlm.grads(lora, low)
  assert float(w_low[0]) == 0.0
  assert all(np.all(np.asarray(g) == 0) for g in jax.tree.leaves(g_low))
  _, w_hi, g_hi = tlm.grads(lora, high)
  np.testing.assert_allclose(float(w_hi[0]), 0.1 * math.exp(lp_high - log_p0), rtol=1e-5)
  _, w_both, g_both = tlm.grads(lora, jnp.concatenate([low, high]))
  assert float(w_both[0]) == 0.0 and float(w_both[1]) > 0
  for a, b in zip(jax.tree.leaves(g_both), jax.tree.leaves(g_hi), strict=True):
    a, b = np.asarray(a, np.float64), 0.5 * np.asarray(b, np.float64)
    assert np.linalg.norm(a - b) <= 1e-4 * np.linalg.norm(b)
  assert any(np.abs(np.asarray(g)).max() > 0 for g in jax.tree.leaves(g_hi))
  # An online step on an unselected sample leaves the adapters as they were.
  before = jax.tree.map(np.asarray, lora)
  opt_state = tlm.optimizer.init(lora)
  new, _, _, _ = tlm.step(jax.tree.map(jnp.copy, lora), opt_state, low)
  for a, b in zip(jax.tree.leaves(new), jax.tree.leaves(before), strict=True):
    np.testing.assert_array_equal(np.asarray(a), b)


def test_offline_adaptation_lowers_shifted_domain_ppl_base_frozen(trained_model_state, tmp_path):
  model = fresh_model(trained_model_state)
  base_before = jax.tree.map(np.asarray, nnx.state(model).to_pure_dict())
  cfg = tlm_config(lr=3e-3, log_p0=0.0, epochs=2, batch_size=4)
  adapt, held = domain("B", 32, seed=10), domain("B", 8, seed=11)
  original = domain("A", 8, seed=12)
  tlm, lora, report = tlm_lib.run_adaptation(model, cfg, adapt, held, original, progress=False)
  assert report["heldout_ppl_after"] < 0.8 * report["heldout_ppl_before"], report
  assert report["fraction_selected"] == 1.0 and report["updates"] == report["steps"] == 16
  # Base weights are bit-identical; every LoRA B moved away from zero.
  _, base_after = nnx.split(tlm.model(lora), tlm_lib.LoRAParam, ...)[1:]
  after = base_after.to_pure_dict()
  for a, b in zip(jax.tree.leaves(after), jax.tree.leaves(base_before), strict=True):
    np.testing.assert_array_equal(np.asarray(a), b)
  bs = [x for p, x in jax.tree_util.tree_leaves_with_path(lora.to_pure_dict())
        if str(p[-1]).endswith("'b']")]
  assert bs and all(np.abs(np.asarray(b)).max() > 0 for b in bs)
  # The adapter checkpoint restores into a fresh copy of the base model with the same results.
  path = tlm_lib.save_adapter(str(tmp_path / "adapter"), lora, cfg)
  fresh = fresh_model(trained_model_state)
  restored, scale = tlm_lib.load_adapter(path, fresh)
  assert scale == cfg.alpha / cfg.rank
  loaded = nnx.state(fresh, tlm_lib.LoRAParam).to_pure_dict()
  for a, b in zip(jax.tree.leaves(loaded), jax.tree.leaves(lora.to_pure_dict()), strict=True):
    np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
  # Folding the adapter into plain base weights gives the adapted model's perplexities.
  plain = fresh_model(trained_model_state)
  graphdef, state = nnx.split(plain)
  nnx.replace_by_pure_dict(state, merge_lora(base_before, restored, scale))
  x = jnp.asarray(held)
  logits = jax.jit(lambda s, t: nnx.merge(graphdef, s)(t)[0])(state, x[:, :-1])
  merged = np.asarray(token_nll(logits, x[:, 1:], reduce=False).mean(-1))
  np.testing.assert_allclose(merged, np.asarray(tlm.log_ppl(lora, x)), rtol=1e-4)


def test_online_mode_records_and_config_errors(trained_model_state):
  model = fresh_model(trained_model_state)
  samples = np.concatenate([domain("A", 2, 20), domain("B", 2, 20)])
  tlm, lora0 = tlm_lib.TLM.create(model, tlm_config(lr=1e-2, log_p0=1.5))
  lora, records = tlm.adapt_online(lora0, samples, progress=False)
  assert [r["index"] for r in records] == [0, 1, 2, 3]
  for r in records:
    assert r["selected"] == (r["log_ppl_before"] > 1.5)
    if r["selected"]:
      assert r["log_ppl_after"] < r["log_ppl_before"]
    else:
      assert r["log_ppl_after"] == r["log_ppl_before"] and r["weight"] == 0.0
  assert any(r["selected"] for r in records) and not all(r["selected"] for r in records)
  with pytest.raises(ConfigError, match="mode"):
    tlm_lib.validate_config(tlm_config(mode="batch"))
  with pytest.raises(ConfigError, match="targets"):
    tlm_lib.TLM.create(fresh_model(trained_model_state), tlm_config(targets="q_proj"))


def test_text_samples_and_split(tmp_path):
  (tmp_path / "a.txt").write_text("hello world " * 20)
  (tmp_path / "b.txt").write_text("second document " * 10)
  docs = tlm_lib.read_texts(str(tmp_path))
  assert [n for n, _ in docs] == ["a.txt", "b.txt"]
  s = tlm_lib.text_samples(docs, ByteTokenizer(), 16)
  assert s.shape[1] == 17 and s[0, 0] == ByteTokenizer.bos_id
  np.testing.assert_array_equal(s[1, 0], s[0, -1])  # consecutive windows share one token
  adapt, held = tlm_lib.split_heldout(s, 0.25)
  assert len(held) == round(len(s) * 0.25) and len(adapt) + len(held) == len(s)
  np.testing.assert_array_equal(held[-1], s[-1])
