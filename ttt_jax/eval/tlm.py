"""TLM: test-time learning of a trained LM by input-perplexity minimization (arXiv 2505.20633).

Unlabeled test inputs x (samples of N tokens) are scored by their input perplexity under the
current model, P(x; Θ) = exp(mean_t −log p(x_t | x_<t)). Only LoRA factors are trained
(layers/lora.py); the base weights are a constant argument of every step, so they stay
bit-identical. The per-sample objective is the log input perplexity weighted by the
sample-selection score

    S(x) = λ · exp(log P(x; Θ) − log P0) · 1[P(x; Θ) > P0]      (λ = 0.1, P0 = e³ by default)

taken as a constant (stop-gradient) weight: a batch's loss is mean_i S(x_i) · log P(x_i; Θ), so
samples with P ≤ P0 contribute exactly zero gradient, and a step whose batch selects nothing is
skipped (Adam's moments do not move the adapters on an empty step). Adam, lr 5e-5, batch 1.

Modes: `offline` adapts on the whole adaptation set (for `epochs` passes or `steps` updates),
then evaluates; `online` streams the samples once: each is scored, used for at most one update,
and the next sample sees the updated adapters (per-sample decisions with P before/after).
"""

from __future__ import annotations

import dataclasses
import math
from typing import Any

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax
from flax import nnx

from ttt_jax.config import ConfigError
from ttt_jax.layers.lora import LoRAParam, apply_lora
from ttt_jax.models.lm import token_nll

MODES = ("offline", "online")


def default_config() -> ml_collections.ConfigDict:
  """Every TLM knob with its default (the paper's where it gives one)."""
  c = ml_collections.ConfigDict()
  c.mode = "offline"
  c.rank = 8
  c.alpha = 16.0
  c.targets = "wq,wk,wv,wo,w1,w2,w3"
  c.lr = 5e-5
  c.b1 = 0.9
  c.b2 = 0.999
  c.eps = 1e-8
  c.batch_size = 1
  c.lam = 0.1  # λ of the selection score
  c.log_p0 = 3.0  # log P0: samples with log-perplexity <= this are not used
  c.epochs = 1  # offline passes over the adaptation set
  c.steps = 0  # offline updates (0: `epochs` passes); online mode always makes one pass
  c.shuffle = True  # offline sample order
  c.seq_len = 256  # tokens per sample (each sample holds seq_len + 1 tokens)
  c.heldout_fraction = 0.2  # tail of the data kept out of adaptation, for evaluation
  c.max_samples = 0  # cap on adaptation samples (0: all)
  c.original_samples = 16  # base-domain validation samples for the forgetting check (0: skip)
  c.eval_batch_size = 8
  c.seed = 0
  c.name = "tlm"  # adapter directory: <workdir>/adapters/<name>
  return c


def validate_config(c: ml_collections.ConfigDict) -> ml_collections.ConfigDict:
  ref = default_config()
  for key in c.keys():
    if key not in ref:
      raise ConfigError(f"unknown TLM config key {key!r}; allowed: {', '.join(sorted(ref))}")
  if c.mode not in MODES:
    raise ConfigError(f"mode={c.mode!r} not allowed; choose one of: {', '.join(MODES)}")
  for key in ("rank", "batch_size", "seq_len", "eval_batch_size", "epochs"):
    if int(c[key]) <= 0:
      raise ConfigError(f"{key}={c[key]!r} must be > 0")
  for key in ("lr", "lam", "alpha"):
    if float(c[key]) <= 0:
      raise ConfigError(f"{key}={c[key]!r} must be > 0")
  for key in ("steps", "max_samples", "original_samples"):
    if int(c[key]) < 0:
      raise ConfigError(f"{key}={c[key]!r} must be >= 0")
  if not 0.0 < c.heldout_fraction < 1.0:
    raise ConfigError(f"heldout_fraction={c.heldout_fraction!r} must be in (0, 1)")
  if not target_list(c):
    raise ConfigError("targets is empty; give a comma list such as wq,wv,w1,w2,w3")
  return c


def target_list(c: ml_collections.ConfigDict) -> tuple[str, ...]:
  return tuple(t.strip() for t in str(c.targets).split(",") if t.strip())


def selection_weights(log_p: jax.Array, lam: float, log_p0: float) -> jax.Array:
  """S(x) = λ·exp(log P − log P0)·1[log P > log P0] per sample."""
  return jnp.where(log_p > log_p0, lam * jnp.exp(log_p - log_p0), 0.0)


@dataclasses.dataclass
class TLM:
  """A model with LoRA adapters; pure, jitted functions of the adapter parameters only."""

  config: ml_collections.ConfigDict
  graphdef: Any
  base: nnx.State  # everything that is not a LoRAParam (frozen)
  optimizer: optax.GradientTransformation
  adapted: list[str]

  @classmethod
  def create(cls, model: nnx.Module, config: ml_collections.ConfigDict):
    """Adds adapters to `model` (in place). Returns (tlm, initial adapter state)."""
    validate_config(config)
    try:
      adapted = apply_lora(model, target_list(config), rank=config.rank, alpha=config.alpha,
                           seed=config.seed)
    except ValueError as e:
      raise ConfigError(f"targets: {e}") from None
    graphdef, lora, base = nnx.split(model, LoRAParam, ...)
    opt = optax.adam(config.lr, b1=config.b1, b2=config.b2, eps=config.eps)
    tlm = cls(config, graphdef, base, opt, adapted)
    tlm._jit()
    return tlm, lora

  @property
  def scale(self) -> float:
    return float(self.config.alpha) / self.config.rank

  def model(self, lora, base: nnx.State | None = None) -> nnx.Module:
    return nnx.merge(self.graphdef, lora, self.base if base is None else base)

  # -- pure functions (the frozen base is an argument, never a baked-in constant) --------------
  def _log_ppl(self, base, lora, tokens: jax.Array) -> jax.Array:
    logits, _ = self.model(lora, base)(tokens[:, :-1])
    return token_nll(logits, tokens[:, 1:], reduce=False).mean(axis=-1)

  def _loss(self, lora, base, tokens):
    log_p = self._log_ppl(base, lora, tokens)
    c = self.config
    w = jax.lax.stop_gradient(selection_weights(log_p, c.lam, c.log_p0))
    return jnp.mean(w * log_p), (log_p, w)

  def _grads(self, base, lora, tokens):
    (_, (log_p, w)), grads = jax.value_and_grad(self._loss, has_aux=True)(lora, base, tokens)
    return log_p, w, grads

  def _step(self, base, lora, opt_state, tokens):
    log_p, w, grads = self._grads(base, lora, tokens)
    updates, new_opt = self.optimizer.update(grads, opt_state, lora)
    new_lora = optax.apply_updates(lora, updates)
    used = jnp.any(w > 0)
    keep = lambda new, old: jnp.where(used, new, old)  # noqa: E731
    return jax.tree.map(keep, new_lora, lora), jax.tree.map(keep, new_opt, opt_state), log_p, w

  def _jit(self) -> None:
    self._log_ppl_jit = jax.jit(self._log_ppl)
    self._grads_jit = jax.jit(self._grads)
    self._step_jit = jax.jit(self._step, donate_argnums=(1, 2))

  # -- compiled entry points -------------------------------------------------------------------
  def log_ppl(self, lora, tokens) -> jax.Array:
    """log P(x; Θ) per sample: mean next-token NLL of tokens [B, N+1] -> [B]."""
    return self._log_ppl_jit(self.base, lora, tokens)

  def grads(self, lora, tokens):
    """(log P [B], selection weights S [B], gradient of mean S·log P w.r.t. the adapters)."""
    return self._grads_jit(self.base, lora, tokens)

  def step(self, lora, opt_state, tokens):
    """One Adam update of the adapters (skipped when no sample is selected); donates inputs."""
    return self._step_jit(self.base, lora, opt_state, tokens)

  # -- loops -----------------------------------------------------------------------------------
  def evaluate(self, lora, samples: np.ndarray) -> np.ndarray:
    """log P(x) of every sample [S, N+1] -> [S] (batches of `eval_batch_size`)."""
    bs = self.config.eval_batch_size
    out = []
    for i in range(0, len(samples), bs):
      chunk = samples[i:i + bs]
      pad = bs - len(chunk)
      if pad:
        chunk = np.concatenate([chunk, np.repeat(chunk[-1:], pad, axis=0)])
      out.append(np.asarray(self.log_ppl(lora, jnp.asarray(chunk)))[:bs - pad])
    return np.concatenate(out) if out else np.zeros((0,), np.float32)

  def adapt_offline(self, lora, samples: np.ndarray, progress: bool = True):
    """Updates on the whole adaptation set. Returns (lora, log dict)."""
    c = self.config
    n, bs = len(samples), c.batch_size
    steps = c.steps or c.epochs * math.ceil(n / bs)
    rng = np.random.default_rng(c.seed)
    order = np.concatenate([rng.permutation(n) if c.shuffle else np.arange(n)
                            for _ in range(math.ceil(steps * bs / n) + 1)])
    lora = jax.tree.map(jnp.copy, lora)
    opt_state = self.optimizer.init(lora)
    seen = selected = updates = 0
    for i in _progress(range(steps), progress, "tlm offline"):
      batch = jnp.asarray(samples[order[i * bs:(i + 1) * bs]])
      lora, opt_state, _, w = self.step(lora, opt_state, batch)
      w = np.asarray(w)
      seen += len(w)
      selected += int((w > 0).sum())
      updates += int((w > 0).any())
    return lora, {"steps": steps, "updates": updates, "samples_seen": seen,
                  "fraction_selected": selected / max(seen, 1)}

  def adapt_online(self, lora, samples: np.ndarray, progress: bool = True):
    """One pass, one sample at a time. Returns (lora, per-sample records)."""
    lora = jax.tree.map(jnp.copy, lora)
    opt_state = self.optimizer.init(lora)
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
  from tqdm.auto import tqdm  # noqa: PLC0415

  return tqdm(it, desc=desc, unit="sample", dynamic_ncols=True)


def perplexity(log_p: np.ndarray) -> float:
  """Token-level perplexity of equal-length samples: exp(mean log P)."""
  return float(math.exp(float(np.mean(log_p)))) if len(log_p) else float("nan")


# -- adapter checkpoints ---------------------------------------------------------------------------
ADAPTER_META = "adapter.json"


def save_adapter(directory: str, lora, config: ml_collections.ConfigDict,
                 extra: dict | None = None) -> str:
  """Writes the adapter factors (Orbax, `<dir>/params`) and their LoRA config (adapter.json)."""
  import json  # noqa: PLC0415
  import os  # noqa: PLC0415

  import orbax.checkpoint as ocp  # noqa: PLC0415

  directory = os.path.abspath(directory)
  os.makedirs(directory, exist_ok=True)
  params = lora.to_pure_dict() if isinstance(lora, nnx.State) else lora
  ckpt = ocp.StandardCheckpointer()
  ckpt.save(os.path.join(directory, "params"), params, force=True)
  ckpt.wait_until_finished()
  meta = {"rank": int(config.rank), "alpha": float(config.alpha), "targets": str(config.targets),
          "seed": int(config.seed), **(extra or {})}
  with open(os.path.join(directory, ADAPTER_META), "w") as f:
    json.dump(meta, f, indent=2)
  return directory


def load_adapter(directory: str, model: nnx.Module) -> tuple[dict, float]:
  """Adds the saved adapter to `model` in place and loads its factors.

  Returns (adapter pure dict, scale alpha/rank); `layers.lora.merge_lora(base_params, adapter,
  scale)` folds it into plain base parameters instead.
  """
  import json  # noqa: PLC0415
  import os  # noqa: PLC0415

  import orbax.checkpoint as ocp  # noqa: PLC0415

  path = os.path.join(directory, ADAPTER_META)
  if not os.path.exists(path):
    raise FileNotFoundError(f"{path} not found: not an adapter directory (see scripts/adapt.py)")
  with open(path) as f:
    meta = json.load(f)
  targets = tuple(t for t in meta["targets"].split(",") if t)
  apply_lora(model, targets, rank=meta["rank"], alpha=meta["alpha"], seed=meta["seed"])
  lora = nnx.state(model, LoRAParam)
  abstract = jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype), lora.to_pure_dict())
  params = ocp.StandardCheckpointer().restore(
      os.path.join(os.path.abspath(directory), "params"), abstract)
  nnx.replace_by_pure_dict(lora, params)
  nnx.update(model, lora)
  return params, meta["alpha"] / meta["rank"]


# -- data --------------------------------------------------------------------------------------
def read_texts(path: str) -> list[tuple[str, str]]:
  """(name, text) of a text file, or of every regular file below a folder (sorted by path)."""
  import os  # noqa: PLC0415

  if os.path.isfile(path):
    files = [path]
  elif os.path.isdir(path):
    files = sorted(os.path.join(d, f) for d, _, fs in os.walk(path) for f in fs
                   if not f.startswith("."))
  else:
    raise FileNotFoundError(f"--data {path!r}: no such file or folder")
  docs = []
  for name in files:
    with open(name, "rb") as f:
      text = f.read().decode("utf-8", errors="replace")
    if text.strip():
      docs.append((os.path.relpath(name, path) if name != path else os.path.basename(name), text))
  if not docs:
    raise ValueError(f"--data {path!r}: no non-empty text found")
  return docs


def text_samples(docs: list[tuple[str, str]], tokenizer, seq_len: int) -> np.ndarray:
  """Consecutive non-overlapping samples [S, seq_len + 1] of the stream [BOS] doc [EOS] ..."""
  from ttt_jax.data.pipeline import build_stream  # noqa: PLC0415

  tokens = build_stream(docs, tokenizer).tokens
  if (len(tokens) - 1) // seq_len < 2:
    raise ValueError(f"the text has {len(tokens)} tokens: fewer than two samples of "
                     f"seq_len={seq_len}")
  return text_samples_from_tokens(tokens, seq_len)


def split_heldout(samples: np.ndarray, fraction: float, max_samples: int = 0):
  """(adaptation samples, held-out tail). The tail comes from the end of the data."""
  n_held = min(max(1, int(round(len(samples) * fraction))), len(samples) - 1)
  adapt, held = samples[:-n_held], samples[-n_held:]
  return (adapt[:max_samples] if max_samples else adapt), held


def evenly_spaced(samples: np.ndarray, k: int) -> np.ndarray:
  if k >= len(samples):
    return samples
  return samples[np.linspace(0, len(samples) - 1, k).round().astype(int)]


# -- one adaptation run ----------------------------------------------------------------------------
def run_adaptation(model: nnx.Module, config: ml_collections.ConfigDict, adapt: np.ndarray,
                   heldout: np.ndarray, original: np.ndarray | None = None,
                   progress: bool = True) -> tuple[TLM, Any, dict]:
  """Adds adapters to `model`, adapts on `adapt`, and measures perplexities before/after.

  Returns (tlm, adapted LoRA state, report dict).
  """
  import time  # noqa: PLC0415

  tlm, lora0 = TLM.create(model, config)
  sets = {"heldout": heldout, "adapt": adapt}
  if original is not None and len(original):
    sets["original"] = original
  before = {k: tlm.evaluate(lora0, v) for k, v in sets.items()}
  t0 = time.perf_counter()
  if config.mode == "offline":
    lora, log = tlm.adapt_offline(lora0, adapt, progress)
    records = None
  else:
    lora, records = tlm.adapt_online(lora0, adapt, progress)
    sel = [r["selected"] for r in records]
    log = {"steps": len(records), "updates": int(sum(sel)), "samples_seen": len(records),
           "fraction_selected": float(np.mean(sel)) if sel else 0.0,
           "online_ppl": perplexity(np.array([r["log_ppl_before"] for r in records]))}
  jax.block_until_ready(lora)
  seconds = time.perf_counter() - t0
  after = {k: tlm.evaluate(lora, v) for k, v in sets.items()}
  report = {
      "mode": config.mode, "config": config.to_dict(), "adapted_modules": tlm.adapted,
      "num_adapt_samples": len(adapt), "num_heldout_samples": len(heldout),
      "num_original_samples": len(sets.get("original", ())), "adapt_seconds": seconds,
      "lora_params": int(sum(x.size for x in jax.tree.leaves(lora))),
      **log,
  }
  for k in sets:
    report[f"{k}_ppl_before"] = perplexity(before[k])
    report[f"{k}_ppl_after"] = perplexity(after[k])
    report[f"{k}_fraction_above_p0"] = float(np.mean(before[k] > config.log_p0))
  if records is not None:
    report["samples"] = records
  return tlm, lora, report


def adapt_workdir(workdir: str, data: str, config: ml_collections.ConfigDict,
                  step: int | None = None, echo=print) -> dict:
  """scripts/adapt.py: base run + text -> adapter in `<workdir>/adapters/<name>` and a report."""
  import os  # noqa: PLC0415

  from ttt_jax.data.pipeline import data_tokenizer, load_stream  # noqa: PLC0415
  from ttt_jax.eval.perplexity import load_run  # noqa: PLC0415

  validate_config(config)
  run = load_run(workdir, step)
  from ttt_jax.models import build_model  # noqa: PLC0415

  graphdef, state = nnx.split(nnx.eval_shape(lambda: build_model(run.config.model)))
  nnx.replace_by_pure_dict(state, run.params)
  model = nnx.merge(graphdef, state)
  dc = run.config.data
  samples = text_samples(read_texts(data), data_tokenizer(dc), config.seq_len)
  adapt, held = split_heldout(samples, config.heldout_fraction, config.max_samples)
  original = None
  if config.original_samples:
    stream = load_stream(dc.source, dc.tokenizer, "validation", dc.val_fraction)
    original = evenly_spaced(text_samples_from_tokens(stream.tokens, config.seq_len),
                             config.original_samples)
  echo(f"{workdir} step {run.step} ({run.config.model.kind}): {len(adapt)} adaptation and "
       f"{len(held)} held-out samples of {config.seq_len} tokens from {data}")
  _, lora, report = run_adaptation(model, config, adapt, held, original)
  out = os.path.join(workdir, "adapters", config.name)
  save_adapter(out, lora, config, {"base_workdir": os.path.abspath(workdir), "base_step": run.step})
  return {"adapter_dir": out, "base_step": run.step, "data": os.path.abspath(data), **report}


def text_samples_from_tokens(tokens: np.ndarray, seq_len: int) -> np.ndarray:
  n = (len(tokens) - 1) // seq_len
  return tokens[np.arange(n)[:, None] * seq_len + np.arange(seq_len + 1)[None, :]].astype(np.int32)
