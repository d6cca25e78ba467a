"""TLM: selection weights, objectives' gradients, the log P0 threshold (fixed / auto) and its
low-selection warning, zero gradient below P0, frozen base, adaptation to a shifted domain."""

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
from ttt_jax.eval import tlm_run
from ttt_jax.layers.lora import merge_lora
from ttt_jax.models import build_model
from ttt_jax.models.lm import split_batch, token_nll

from ..repo_files import load_file

SEQ = 32


def tlm_configs():
  """configs/tlm.py as a module (the configs folder is not a package)."""
  return load_file("configs/tlm.py")


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
  base_before = jax.tree.map(np.asarray, nnx.to_pure_dict(nnx.state(model)))
  cfg = tlm_config(lr=3e-3, log_p0=0.0, epochs=2, batch_size=4)
  adapt, held = domain("B", 32, seed=10), domain("B", 8, seed=11)
  original = domain("A", 8, seed=12)
  tlm, lora, report = tlm_run.run_adaptation(model, cfg, adapt, held, original, progress=False)
  assert report["heldout_ppl_after"] < 0.8 * report["heldout_ppl_before"], report
  assert report["fraction_selected"] == 1.0 and report["updates"] == report["steps"] == 16
  assert report["warnings"] == [] and report["log_p0"] == 0.0
  # Base weights are bit-identical; every LoRA B moved away from zero.
  _, base_after = nnx.split(tlm.model(lora), tlm_lib.LoRAParam, ...)[1:]
  after = nnx.to_pure_dict(base_after)
  for a, b in zip(jax.tree.leaves(after), jax.tree.leaves(base_before), strict=True):
    np.testing.assert_array_equal(np.asarray(a), b)
  bs = [x for p, x in jax.tree_util.tree_leaves_with_path(nnx.to_pure_dict(lora))
        if str(p[-1]).endswith("'b']")]
  assert bs and all(np.abs(np.asarray(b)).max() > 0 for b in bs)
  # The adapter checkpoint restores into a fresh copy of the base model with the same results.
  path = tlm_run.save_adapter(str(tmp_path / "adapter"), lora, cfg)
  fresh = fresh_model(trained_model_state)
  restored, scale = tlm_run.load_adapter(path, fresh)
  assert scale == cfg.alpha / cfg.rank
  loaded = nnx.to_pure_dict(nnx.state(fresh, tlm_lib.LoRAParam))
  for a, b in zip(jax.tree.leaves(loaded), jax.tree.leaves(nnx.to_pure_dict(lora)), strict=True):
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


def random_lora(lora, rng, scale=0.05):
  """The adapter state with every factor random (a fresh B = 0 would zero A's gradient)."""
  return jax.tree.map(lambda x: jnp.asarray(rng.normal(0, scale, x.shape), x.dtype), lora)


def flat(tree) -> np.ndarray:
  return np.concatenate([np.asarray(x, np.float64).ravel() for x in jax.tree.leaves(tree)])


@pytest.mark.parametrize("objective,seed", [
    ("perplexity", 0), ("log_perplexity", 1),
    pytest.param("perplexity", 2, marks=pytest.mark.extended)])
def test_objective_gradient_matches_slow_reference(trained_model_state, objective, seed):
  """grad of mean_i S_i·P_i (or S_i·log P_i), S a constant, against the chain rule done by hand:
  (1/B) Σ_i S_i · P_i · ∇log P_i (or without P_i), one sample at a time."""
  rng = np.random.default_rng(seed)
  model = fresh_model(trained_model_state)
  tlm, lora = tlm_lib.TLM.create(model, tlm_config(objective=objective, log_p0=0.0))
  lora = random_lora(lora, rng)
  noise = rng.integers(0, 259, size=(1, SEQ + 1)).astype(np.int32)
  x = np.concatenate([domain("A", 1, 100 + seed), domain("B", 1, 100 + seed), noise])
  x = x[rng.permutation(3)]

  def sample_log_p(adapters, tokens):
    logits, _ = nnx.merge(tlm.graphdef, adapters, tlm.base)(tokens[None, :-1])
    return token_nll(logits, tokens[None, 1:])

  log_p = np.array([float(sample_log_p(lora, jnp.asarray(t))) for t in x], np.float64)
  assert np.ptp(log_p) > 0.5, log_p  # the samples' perplexities differ: P_i is not one scale
  tlm.log_p0 = float(np.sort(log_p)[0] + 0.1)  # the easiest sample is not selected
  lam = tlm.config.lam
  s = np.where(log_p > tlm.log_p0, lam * np.exp(log_p - tlm.log_p0), 0.0)
  assert (s > 0).sum() == 2
  factor = np.exp(log_p) if objective == "perplexity" else np.ones_like(log_p)
  ref = sum(s[i] * factor[i] * flat(jax.grad(sample_log_p)(lora, jnp.asarray(x[i])))
            for i in range(len(x))) / len(x)
  got_log_p, got_s, grads = tlm.grads(lora, jnp.asarray(x))
  np.testing.assert_allclose(np.asarray(got_log_p), log_p, rtol=1e-5)
  np.testing.assert_allclose(np.asarray(got_s), s, rtol=1e-4)
  g = flat(grads)
  assert np.linalg.norm(g - ref) <= 1e-4 * np.linalg.norm(ref), (np.linalg.norm(g - ref),
                                                                np.linalg.norm(ref))
  # The other objective's gradient misses by far more than the tolerance, even rescaled.
  other = np.ones_like(log_p) if objective == "perplexity" else np.exp(log_p)
  alt = sum(s[i] * other[i] * flat(jax.grad(sample_log_p)(lora, jnp.asarray(x[i])))
            for i in range(len(x))) / len(x)
  residual = g - (g @ alt) / (alt @ alt) * alt
  assert np.linalg.norm(residual) > 1e-2 * np.linalg.norm(g), np.linalg.norm(residual)


def test_log_p0_rules_resolve_documented_threshold():
  rng = np.random.default_rng(3)
  home = rng.uniform(1.0, 3.0, size=int(rng.integers(4, 20)))
  margin = float(rng.uniform(0.0, 0.5))
  expected = float(np.mean(home)) + margin  # log of the validation perplexity, plus the margin
  for value, byte_level in [("auto", True), ("auto", False), ("default", True), ("AUTO", True)]:
    c = tlm_lib.validate_config(tlm_config(log_p0=value, log_p0_margin=margin))
    got, rule = tlm_lib.resolve_log_p0(c, byte_level, home)
    assert abs(got - expected) <= 1e-12 * abs(expected) and "auto" in rule, (value, got, rule)
  c = tlm_lib.validate_config(tlm_config())
  assert c.log_p0 == "default" and c.objective == "perplexity"
  assert tlm_lib.resolve_log_p0(c, False, home)[0] == tlm_lib.PAPER_LOG_P0 == 3.0
  fixed = float(rng.uniform(0.5, 4.0))
  for value in (fixed, str(fixed)):  # a number from Python or from a command-line string
    c = tlm_lib.validate_config(tlm_config(log_p0=value))
    assert tlm_lib.resolve_log_p0(c, True, home)[0] == fixed
  with pytest.raises(ConfigError, match="log_p0"):
    tlm_lib.resolve_log_p0(tlm_lib.validate_config(tlm_config(log_p0="auto")), True, None)


def test_auto_threshold_from_validation_perplexity_in_a_run(trained_model_state):
  model = fresh_model(trained_model_state)
  original = domain("A", 6, seed=30)
  ref = np.array([float(token_nll(*((lambda i, t: (model(i)[0], t))(
      *split_batch({"tokens": jnp.asarray(original[j:j + 1])}))))) for j in range(6)])
  margin = float(np.random.default_rng(4).uniform(0.05, 0.3))
  cfg = tlm_config(log_p0="auto", log_p0_margin=margin, batch_size=4, lr=1e-3)
  lines = []
  _, _, report = tlm_run.run_adaptation(model, cfg, domain("B", 8, seed=31), domain("B", 4, 32),
                                        original, progress=False, echo=lines.append)
  expected = float(np.mean(ref)) + margin
  assert abs(report["log_p0"] - expected) <= 1e-5 * expected, (report["log_p0"], expected)
  assert math.isclose(math.log(report["original_ppl_before"]) + margin, report["log_p0"],
                      rel_tol=1e-6)
  assert "auto" in report["log_p0_rule"] and "auto" in lines[0], lines
  # Shifted-domain samples are far harder than the home domain: all of them pass the threshold.
  assert report["adapt_fraction_above_p0"] == 1.0 and report["warnings"] == []
  with pytest.raises(ConfigError, match="log_p0"):
    tlm_run.run_adaptation(fresh_model(trained_model_state), cfg, domain("B", 4, 33),
                           domain("B", 2, 34), None, progress=False)


@pytest.mark.parametrize("mode", ["offline", pytest.param("online", marks=pytest.mark.extended)])
def test_low_selection_warns_in_report_and_console(trained_model_state, mode, capsys):
  model = fresh_model(trained_model_state)
  adapt = domain("A", 8, seed=40)
  cfg = tlm_config(mode=mode, log_p0=float(np.random.default_rng(5).uniform(20, 30)),
                   batch_size=4)
  _, _, report = tlm_run.run_adaptation(model, cfg, adapt, domain("A", 2, 41), None,
                                        progress=False)
  assert report["fraction_selected"] == 0.0 and report["updates"] == 0
  assert len(report["warnings"]) == 1
  warning = report["warnings"][0]
  assert warning.startswith("WARNING") and "tlm.log_p0" in warning and "\n" not in warning
  assert "0 of 8" in warning, warning
  lines = tlm_run.report_lines(report)
  assert lines[-1] == warning
  for line in lines:
    print(line)
  assert "WARNING" in capsys.readouterr().out
  # Every sample above the threshold: no warning.
  _, _, report = tlm_run.run_adaptation(fresh_model(trained_model_state),
                                        tlm_config(mode=mode, log_p0=0.0, batch_size=4), adapt,
                                        domain("A", 2, 41), None, progress=False)
  assert report["fraction_selected"] == 1.0 and report["warnings"] == []
  assert not any("WARNING" in line for line in tlm_run.report_lines(report))


def test_low_selection_warning_threshold():
  rng = np.random.default_rng(6)
  seen = int(rng.integers(100, 2000))
  few = int(seen * tlm_lib.LOW_SELECTION) - 1
  enough = math.ceil(seen * tlm_lib.LOW_SELECTION)
  assert "tlm.log_p0" in tlm_lib.low_selection_warning(few, seen, 3.0, "fixed")
  assert tlm_lib.low_selection_warning(enough, seen, 3.0, "fixed") is None
  assert tlm_lib.low_selection_warning(0, 0, 3.0, "fixed") is not None


@pytest.mark.parametrize("key,value", [
    ("objective", "ppl"), ("objective", "perplexity2"), ("log_p0", "high"), ("log_p0", "nan"),
    ("log_p0", float("inf")), ("log_p0", True), ("log_p0_margin", -0.5),
    ("log_p0_margin", float("nan")), ("name", "../checkpoints/10"), ("name", "a/b"),
    ("name", ".."), ("name", ""),
])
def test_bad_knob_values_fail_with_one_line_naming_the_key(key, value):
  with pytest.raises(ConfigError) as e:
    tlm_lib.validate_config(tlm_config(**{key: value}))
  msg = str(e.value)
  assert msg.startswith(f"{key}=") and "\n" not in msg, msg
  with pytest.raises(ConfigError, match=r"log_p0=auto.*original_samples"):
    tlm_lib.validate_config(tlm_config(log_p0="auto", original_samples=0))
  with pytest.raises(ConfigError, match="objective"):
    tlm_configs().get_config("objective=nats")


def test_text_samples_and_split(tmp_path):
  (tmp_path / "a.txt").write_text("hello world " * 20)
  (tmp_path / "b.txt").write_text("second document " * 10)
  docs = tlm_run.read_texts(str(tmp_path))
  assert [n for n, _ in docs] == ["a.txt", "b.txt"]
  s = tlm_run.text_samples(docs, ByteTokenizer(), 16)
  assert s.shape[1] == 17 and s[0, 0] == ByteTokenizer.bos_id
  np.testing.assert_array_equal(s[1, 0], s[0, -1])  # consecutive windows share one token
  adapt, held = tlm_run.split_heldout(s, 0.25)
  assert len(held) == round(len(s) * 0.25) and len(adapt) + len(held) == len(s)
  np.testing.assert_array_equal(held[-1], s[-1])


def test_adapter_names_that_stay_inside_the_adapters_directory_pass():
  for name in ("tlm", "tlm-online_2", "v1.5"):
    assert tlm_lib.validate_config(tlm_config(name=name)).name == name


@pytest.mark.parametrize("mode,where", [
    ("offline", "mesh"), pytest.param("online", "mesh", marks=pytest.mark.extended),
    pytest.param("offline", "device", marks=pytest.mark.extended), ("offline", "fresh")])
def test_the_adaptation_step_compiles_once_for_a_loaded_runs_placed_weights(
    trained_model_state, mode, where):
  """A loaded run's weights are placed on its mesh (or put on one device by the caller, or
  fresh); fresh adapters and Adam state are not, and the step's outputs are: before, the second
  update compiled the step again (about a minute for SmolLM2-135M), and the evaluation after
  adapting compiled log_ppl again."""
  graphdef, params = trained_model_state
  mesh = jax.sharding.Mesh(np.array(jax.devices()[:1]).reshape(1, 1, 1), ("data", "fsdp",
                                                                          "tensor"))
  if where == "fresh":  # arrays on the default device, placed nowhere in particular
    placed = jax.tree.map(jnp.asarray, jax.device_get(params))
  else:
    placed = jax.device_put(jax.tree.map(jnp.copy, params),
                            jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec())
                            if where == "mesh" else jax.devices()[0])
  tlm, lora0 = tlm_lib.TLM.create(nnx.merge(graphdef, placed),
                                  tlm_config(lr=1e-2, log_p0=0.0, mode=mode))
  samples = np.concatenate([domain("A", 2, 30), domain("B", 2, 30)])
  tlm.evaluate(lora0, samples)
  adapt = tlm.adapt_offline if mode == "offline" else tlm.adapt_online
  lora, _ = adapt(lora0, samples, progress=False)
  tlm.evaluate(lora, samples)
  assert tlm._step_jit._cache_size() == 1
  # one per batch shape: evaluation batches, and online's score of each sample after its update
  assert tlm._log_ppl_jit._cache_size() == (1 if mode == "offline" else 2)
