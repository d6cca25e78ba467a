"""TLM: test-time learning of a trained LM by input-perplexity minimization (arXiv 2505.20633).

Unlabeled test inputs x (samples of N tokens) are scored by their input perplexity under the
current model, P(x; Θ) = exp(mean_t −log p(x_t | x_<t)). Only LoRA factors are trained
(layers/lora.py); the base weights are a constant argument of every step, so they stay
bit-identical. Each sample is weighted by the sample-selection score

    S(x) = λ · exp(log P(x; Θ) − log P0) · 1[P(x; Θ) > P0]      (λ = 0.1)

taken as a constant (stop-gradient) weight. A batch's loss is mean_i S(x_i) · P(x_i; Θ) with
`objective=perplexity` (the paper's form, the default) or mean_i S(x_i) · log P(x_i; Θ) with
`objective=log_perplexity`; since ∇P = P · ∇log P, the first weights each sample's gradient by an
extra factor P(x_i). Samples with P ≤ P0 contribute exactly zero gradient, and a step whose batch
selects nothing is skipped (Adam's moments do not move the adapters on an empty step).

The threshold `log_p0` is a number (the paper's log P0 = 3 is a perplexity per subword token of a
large LLM), `auto` (log P0 = the model's log-perplexity on its own validation data + `log_p0_margin`
nats per token, see `resolve_log_p0`), or `default`: `auto` for byte-level tokenizers, 3 otherwise.
Adam, batch 1, lr 3e-4: tuned on SmolLM2-135M (docs/tlm.md), where the paper's 5e-5 moved
held-out perplexity a third as far in the same 32 updates.

Modes: `offline` adapts on the whole adaptation set (for `epochs` passes or `steps` updates),
then evaluates; `online` streams the samples once: each is scored, used for at most one update,
and the next sample sees the updated adapters (per-sample decisions with P before/after).
Runs on text (data, adapter files, reports): `tlm_run.py`.
"""

from __future__ import annotations

import dataclasses
import math
import re
from typing import Any

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax
from flax import nnx
from tqdm.auto import tqdm

from ttt_jax.config import ConfigError
from ttt_jax.eval.stream import fill_rows
from ttt_jax.layers.lora import LoRAParam, apply_lora
from ttt_jax.models.lm import token_nll
from ttt_jax.sharding import OnParamsMesh, replicated

MODES = ("offline", "online")
OBJECTIVES = ("perplexity", "log_perplexity")
PAPER_LOG_P0 = 3.0  # the paper's P0 = e³ (per subword token of a large LLM)
LOG_P0_WORDS = ("default", "auto")
# Below this fraction of selected samples a run warns that the threshold selects almost nothing.
LOW_SELECTION = 0.05


def default_config() -> ml_collections.ConfigDict:
  """Every TLM knob with its default (the paper's where it gives one)."""
  c = ml_collections.ConfigDict()
  c.mode = "offline"
  c.objective = "perplexity"  # S·P (the paper) or S·log P
  c.rank = 8
  c.alpha = 16.0
  c.targets = "wq,wk,wv,wo,w1,w2,w3"
  c.lr = 3e-4  # the paper: 5e-5 (docs/tlm.md measures both on SmolLM2-135M)
  c.b1 = 0.9
  c.b2 = 0.999
  c.eps = 1e-8
  c.batch_size = 1
  c.lam = 0.1  # λ of the selection score
  # log P0: a number, `auto` (validation log-perplexity + log_p0_margin) or `default` (`auto` for
  # byte-level tokenizers, the paper's 3.0 otherwise). Samples with log P <= log P0 are not used.
  c.log_p0 = ml_collections.FieldReference("default", field_type=object)
  c.log_p0_margin = 0.1  # nats per token above the home-domain log-perplexity (log_p0=auto)
  c.epochs = 1  # offline passes over the adaptation set
  c.steps = 0  # offline updates (0: `epochs` passes); online mode always makes one pass
  c.shuffle = True  # offline sample order
  c.seq_len = 256  # tokens per sample (each sample holds seq_len + 1 tokens)
  c.heldout_fraction = 0.2  # tail of the data kept out of adaptation, for evaluation
  c.max_samples = 0  # cap on adaptation samples (0: all)
  c.original_samples = 16  # base-domain validation samples: forgetting check, log_p0=auto
  c.eval_batch_size = 8
  c.seed = 0
  c.name = "tlm"  # adapter directory: <workdir>/adapters/<name>
  return c


def parse_log_p0(value) -> float | str:
  """`log_p0` as a finite float or one of LOG_P0_WORDS; anything else is a ConfigError."""
  if isinstance(value, str) and value.strip().lower() in LOG_P0_WORDS:
    return value.strip().lower()
  try:
    number = float(value)
  except (TypeError, ValueError):
    number = float("nan")
  if isinstance(value, bool) or not math.isfinite(number):
    raise ConfigError(f"log_p0={value!r} not allowed; give a finite number (log P0 in nats per "
                      f"token) or one of: {', '.join(LOG_P0_WORDS)}")
  return number


def validate_config(c: ml_collections.ConfigDict) -> ml_collections.ConfigDict:
  """Checks every knob (one-line ConfigError naming the key); normalizes `log_p0`."""
  ref = default_config()
  for key in c.keys():
    if key not in ref:
      raise ConfigError(f"unknown TLM config key {key!r}; allowed: {', '.join(sorted(ref))}")
  if c.mode not in MODES:
    raise ConfigError(f"mode={c.mode!r} not allowed; choose one of: {', '.join(MODES)}")
  if c.objective not in OBJECTIVES:
    raise ConfigError(f"objective={c.objective!r} not allowed; choose one of: "
                      f"{', '.join(OBJECTIVES)}")
  for key in ("rank", "batch_size", "seq_len", "eval_batch_size", "epochs"):
    if int(c[key]) <= 0:
      raise ConfigError(f"{key}={c[key]!r} must be > 0")
  for key in ("lr", "lam", "alpha"):
    if float(c[key]) <= 0:
      raise ConfigError(f"{key}={c[key]!r} must be > 0")
  for key in ("steps", "max_samples", "original_samples"):
    if int(c[key]) < 0:
      raise ConfigError(f"{key}={c[key]!r} must be >= 0")
  if not re.fullmatch(r"[A-Za-z0-9][A-Za-z0-9._-]*", str(c.name)):
    raise ConfigError(f"name={c.name!r} not allowed: the adapter directory <workdir>/adapters/"
                      "<name> takes letters, digits, '.', '_' and '-' (no '/' or '..')")
  if not 0.0 < c.heldout_fraction < 1.0:
    raise ConfigError(f"heldout_fraction={c.heldout_fraction!r} must be in (0, 1)")
  if not math.isfinite(float(c.log_p0_margin)) or c.log_p0_margin < 0:
    raise ConfigError(f"log_p0_margin={c.log_p0_margin!r} must be a finite number >= 0 (nats "
                      "per token above the validation log-perplexity)")
  c.log_p0 = parse_log_p0(c.log_p0)
  if c.log_p0 == "auto" and not c.original_samples:
    raise ConfigError("log_p0=auto calibrates on the run's validation samples: needs "
                      "original_samples > 0 (or give log_p0 as a number)")
  if not target_list(c):
    raise ConfigError("targets is empty; give a comma list such as wq,wv,w1,w2,w3")
  return c


def target_list(c: ml_collections.ConfigDict) -> tuple[str, ...]:
  return tuple(t.strip() for t in str(c.targets).split(",") if t.strip())


def log_p0_rule(c: ml_collections.ConfigDict, byte_level: bool) -> str:
  """How `log_p0` is set for this run: "fixed", "auto", or "paper" (`default`, subword)."""
  value = parse_log_p0(c.log_p0)
  if value == "default":
    return "auto" if byte_level else "paper"
  return "auto" if value == "auto" else "fixed"


def resolve_log_p0(c: ml_collections.ConfigDict, byte_level: bool,
                   home_log_p: np.ndarray | None = None) -> tuple[float, str]:
  """(log P0, a sentence saying where it comes from).

  `auto`: log P0 = log P_home + log_p0_margin, where log P_home = mean log P over the home-domain
  validation samples `home_log_p` (the log of the model's token-level validation perplexity):
  a sample is selected when the model finds it harder than its own validation data by more than
  the margin (0.1 nats per token: a perplexity over 1.105 × the validation perplexity).
  """
  rule = log_p0_rule(c, byte_level)
  if rule == "fixed":
    return float(c.log_p0), f"log_p0={float(c.log_p0):g} (fixed)"
  if rule == "paper":
    return PAPER_LOG_P0, f"log_p0={PAPER_LOG_P0:g} (the paper's P0 = e^3; subword tokenizer)"
  if home_log_p is None or not len(home_log_p):
    raise ConfigError("log_p0=auto needs validation samples of the run's own data "
                      "(original_samples > 0), or give log_p0 as a number")
  home = float(np.mean(home_log_p))
  value = home + float(c.log_p0_margin)
  return value, (f"log_p0=auto: validation log-perplexity {home:.4f} (ppl {math.exp(home):.3f}, "
                 f"{len(home_log_p)} samples) + log_p0_margin {float(c.log_p0_margin):g}")


def selection_weights(log_p: jax.Array, lam: float, log_p0) -> jax.Array:
  """S(x) = λ·exp(log P − log P0)·1[log P > log P0] per sample."""
  return jnp.where(log_p > log_p0, lam * jnp.exp(log_p - log_p0), 0.0)


def sample_objective(log_p: jax.Array, objective: str) -> jax.Array:
  """The per-sample quantity S multiplies: P = exp(log P) or log P."""
  if objective == "perplexity":
    return jnp.exp(log_p)
  if objective == "log_perplexity":
    return log_p
  raise ConfigError(f"objective={objective!r} not allowed; choose one of: {', '.join(OBJECTIVES)}")


@dataclasses.dataclass
class TLM:
  """A model with LoRA adapters; pure, jitted functions of the adapter parameters only."""

  config: ml_collections.ConfigDict
  graphdef: Any
  base: nnx.State  # everything that is not a LoRAParam (frozen)
  optimizer: optax.GradientTransformation
  adapted: list[str]
  log_p0: float | None = None  # the selection threshold; None until resolved (auto / default)

  @classmethod
  def create(cls, model: nnx.Module, config: ml_collections.ConfigDict,
             log_p0: float | None = None):
    """Adds adapters to `model` (in place). Returns (tlm, initial adapter state).

    The threshold is `log_p0` if given, else config.log_p0 when it is a number, else unset
    (`run_adaptation` resolves `auto`/`default`; set `tlm.log_p0` before training).
    """
    validate_config(config)
    try:
      adapted = apply_lora(model, target_list(config), rank=config.rank, alpha=config.alpha,
                           seed=config.seed)
    except ValueError as e:
      raise ConfigError(f"targets: {e}") from None
    graphdef, lora, base = nnx.split(model, LoRAParam, ...)
    opt = optax.adam(config.lr, b1=config.b1, b2=config.b2, eps=config.eps)
    if log_p0 is None and not isinstance(config.log_p0, str):
      log_p0 = float(config.log_p0)
    tlm = cls(config, graphdef, base, opt, adapted, log_p0)
    tlm._jit()
    return tlm, tlm.place(lora)

  @property
  def scale(self) -> float:
    return float(self.config.alpha) / self.config.rank

  def model(self, lora, base: nnx.State | None = None) -> nnx.Module:
    return nnx.merge(self.graphdef, lora, self.base if base is None else base)

  def threshold(self) -> float:
    if self.log_p0 is None:
      raise ConfigError(f"log_p0={self.config.log_p0!r} is not resolved yet: set tlm.log_p0 "
                        "(run_adaptation does it from the validation samples)")
    return float(self.log_p0)

  # -- pure functions (the frozen base is an argument, never a baked-in constant) --------------
  def _log_ppl(self, base, lora, tokens: jax.Array) -> jax.Array:
    logits, _ = self.model(lora, base)(tokens[:, :-1])
    return token_nll(logits, tokens[:, 1:], reduce=False).mean(axis=-1)

  def _loss(self, lora, base, tokens, log_p0):
    log_p = self._log_ppl(base, lora, tokens)
    c = self.config
    w = jax.lax.stop_gradient(selection_weights(log_p, c.lam, log_p0))
    return jnp.mean(w * sample_objective(log_p, c.objective)), (log_p, w)

  def _grads(self, base, lora, tokens, log_p0):
    (_, (log_p, w)), grads = jax.value_and_grad(self._loss, has_aux=True)(lora, base, tokens,
                                                                          log_p0)
    return log_p, w, grads

  def _step(self, base, lora, opt_state, tokens, log_p0):
    log_p, w, grads = self._grads(base, lora, tokens, log_p0)
    updates, new_opt = self.optimizer.update(grads, opt_state, lora)
    new_lora = optax.apply_updates(lora, updates)
    used = jnp.any(w > 0)
    keep = lambda new, old: jnp.where(used, new, old)
    return jax.tree.map(keep, new_lora, lora), jax.tree.map(keep, new_opt, opt_state), log_p, w

  def _replicated(self) -> jax.sharding.Sharding | None:
    """Replicated over the devices the base weights are on: a loaded run's mesh (any weight on
    one decides), else the one device a committed weight was put on; None for weights placed
    nowhere in particular (host arrays, fresh ones)."""
    leaves = jax.tree.leaves(self.base)
    for s in (getattr(x, "sharding", None) for x in leaves):
      if isinstance(s, jax.sharding.NamedSharding):
        return replicated(s.mesh)
    committed = [x.sharding for x in leaves if getattr(x, "committed", False)]
    return committed[0] if committed else None

  def place(self, tree):
    """Adapter or optimizer state where the compiled step keeps it (replicated on the base's
    mesh or device): the first update then has the signature of every later one, so the step
    compiles once (fresh state is otherwise unplaced and the step's outputs placed)."""
    where = self._replicated()
    return tree if where is None else jax.device_put(tree, where)

  def _jit(self) -> None:
    where = self._replicated()
    placed = {} if where is None else {"out_shardings": where}  # every output
    # on the base's devices, the samples split over them where they divide (OnParamsMesh)
    self._log_ppl_jit = OnParamsMesh(self._log_ppl, batch_args=(1,))
    self._grads_jit = OnParamsMesh(self._grads, batch_args=(1,))
    self._step_jit = OnParamsMesh(self._step, batch_args=(2,), donate_argnums=(1, 2), **placed)

  # -- compiled entry points -------------------------------------------------------------------
  def log_ppl(self, lora, tokens) -> jax.Array:
    """log P(x; Θ) per sample: mean next-token NLL of tokens [B, N+1] -> [B]."""
    return self._log_ppl_jit(self.base, lora, tokens)

  def grads(self, lora, tokens):
    """(log P [B], selection weights S [B], gradient of the batch loss w.r.t. the adapters)."""
    return self._grads_jit(self.base, lora, tokens, jnp.float32(self.threshold()))

  def step(self, lora, opt_state, tokens):
    """One Adam update of the adapters (skipped when no sample is selected); donates inputs."""
    return self._step_jit(self.base, lora, opt_state, tokens, jnp.float32(self.threshold()))

  # -- loops -----------------------------------------------------------------------------------
  def evaluate(self, lora, samples: np.ndarray) -> np.ndarray:
    """log P(x) of every sample [S, N+1] -> [S] (batches of `eval_batch_size`)."""
    bs = self.config.eval_batch_size
    out = []
    for i in range(0, len(samples), bs):
      chunk = samples[i:i + bs]
      out.append(np.asarray(self.log_ppl(lora, fill_rows(chunk, bs)))[:len(chunk)])
    return np.concatenate(out) if out else np.zeros((0,), np.float32)

  def adapt_offline(self, lora, samples: np.ndarray, progress: bool = True):
    """Updates on the whole adaptation set. Returns (lora, log dict)."""
    c = self.config
    n, bs = len(samples), c.batch_size
    steps = c.steps or c.epochs * math.ceil(n / bs)
    rng = np.random.default_rng(c.seed)
    order = np.concatenate([rng.permutation(n) if c.shuffle else np.arange(n)
                            for _ in range(math.ceil(steps * bs / n) + 1)])
    lora = self.place(jax.tree.map(jnp.copy, lora))
    opt_state = self.place(self.optimizer.init(lora))
    seen = selected = updates = 0
    for i in _progress(range(steps), progress, "tlm offline"):
      batch = jnp.asarray(samples[order[i * bs:(i + 1) * bs]])
      lora, opt_state, _, w = self.step(lora, opt_state, batch)
      w = np.asarray(w)
      seen += len(w)
      selected += int((w > 0).sum())
      updates += int((w > 0).any())
    return lora, {"steps": steps, "updates": updates, "samples_seen": seen,
                  "samples_selected": selected, "fraction_selected": selected / max(seen, 1)}

  def adapt_online(self, lora, samples: np.ndarray, progress: bool = True):
    """One pass, one sample at a time. Returns (lora, per-sample records)."""
    lora = self.place(jax.tree.map(jnp.copy, lora))
    opt_state = self.place(self.optimizer.init(lora))
    records = []
    for i in _progress(range(len(samples)), progress, "tlm online"):
      x = jnp.asarray(samples[i:i + 1])
      lora, opt_state, log_p, w = self.step(lora, opt_state, x)
      before, weight = float(log_p[0]), float(w[0])
      after = float(self.log_ppl(lora, x)[0]) if weight > 0 else before
      records.append({"index": i, "selected": weight > 0, "weight": weight,
                      "log_ppl_before": before, "log_ppl_after": after,
                      "ppl_before": math.exp(before), "ppl_after": math.exp(after)})
    return lora, records


def _progress(it, enabled: bool, desc: str):
  if not enabled:
    return it
  return tqdm(it, desc=desc, unit="sample", dynamic_ncols=True)


def perplexity(log_p: np.ndarray) -> float:
  """Token-level perplexity of equal-length samples: exp(mean log P)."""
  return float(math.exp(float(np.mean(log_p)))) if len(log_p) else float("nan")


def low_selection_warning(selected: int, seen: int, log_p0: float, rule: str,
                          adapt_above: float | None = None) -> str | None:
  """A one-line WARNING when fewer than LOW_SELECTION of the samples seen were selected."""
  if seen and selected / seen >= LOW_SELECTION:
    return None
  above = "" if adapt_above is None else (
      f"; {100 * adapt_above:.1f}% of the adaptation samples were above it before adapting")
  return (f"WARNING: TLM selected only {selected} of {seen} samples "
          f"({100 * selected / max(seen, 1):.2f}% < {100 * LOW_SELECTION:g}%), so adaptation "
          f"changed (almost) nothing: threshold log P0 = {log_p0:.4f} (P0 = "
          f"{math.exp(log_p0):.3f}; {rule})"
          f"{above}. The knob is tlm.log_p0 (--config.log_p0=auto, or a lower number)")
