"""Benchmark sections that time compiled programs on fixed inputs: the matmul ceiling, the
train step of every model kind (tokens/s, MFU, memory) and TTT dual vs primal."""

from __future__ import annotations

import time

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from ttt_jax.benchmarks.common import (
  Size,
  counted_flops,
  interleaved,
  memory_stats,
  model_config,
  xla_flops,
)
from ttt_jax.config import base_config
from ttt_jax.models import count_params
from ttt_jax.models.lm import make_mixer
from ttt_jax.train.flops import train_flops_per_token
from ttt_jax.train.trainer import Trainer


def _failure(kind: str, err: BaseException, echo) -> dict[str, str]:
  """Missing modules are 'skipped'; anything else is an 'error' (printed, kept in the JSON)."""
  if isinstance(err, ImportError):
    echo(f"  {kind}: skipped ({err})")
    return {"skipped": f"not available: {err}"}
  msg = f"{type(err).__name__}: {str(err).splitlines()[0] if str(err) else ''}"
  echo(f"  {kind}: ERROR {msg}")
  return {"error": msg}


def bench_matmul(size: Size, echo=print) -> dict:
  """XLA throughput of one n x n @ n x n product in fp32 and bf16 (default precision)."""
  n = size.matmul_n
  key = jax.random.key(0)
  mm = jax.jit(jnp.dot)
  fns, out = {}, {}
  for name, dt in (("float32", jnp.float32), ("bfloat16", jnp.bfloat16)):
    a = jax.random.normal(key, (n, n), dt)
    b = jax.random.normal(jax.random.fold_in(key, 1), (n, n), dt)
    compiled = mm.lower(a, b).compile()
    fns[name] = lambda c=compiled, a=a, b=b: c(a, b)
  echo(f"matmul {n}x{n}")
  times = interleaved(fns, size.repeats, size.warmup, echo)
  for name, t in times.items():
    out[name] = dict(t, n=n, flops_per_s=2 * n**3 / t["median_s"])
    echo(f"  {name}: {out[name]['flops_per_s'] / 1e9:.1f} GFLOP/s")
  return out


def _train_setup(kind: str, size: Size, compile_only: bool = False,
                 overrides: dict | None = None, mark=None):
  return train_setup_from_config(model_config(kind, size, overrides=overrides), compile_only,
                                 mark)


def train_setup_from_config(cfg, compile_only: bool = False, mark=None):
  """(cfg, compiled train step, state, batch of random tokens, info: params, tokens per step,
  model / XLA / counted FLOPs, compile seconds (tracing and lowering included), memory) of a
  validated config. `mark(phase)`, if given, is called as each phase ends: 'set up' (the state
  initialised), 'lowered' (the step traced and lowered), 'compiled'."""
  mark = mark or (lambda phase: None)
  trainer = Trainer.create(cfg)
  rng = np.random.default_rng(0)
  tokens = rng.integers(0, 256, (cfg.data.batch_size, cfg.data.seq_len + 1), dtype=np.int32)
  batch = trainer.device_batch({"tokens": tokens})
  if compile_only:
    state = jax.eval_shape(lambda: trainer._init(cfg.seed))  # shapes only, no mesh context
    state = jax.tree.map(lambda x, s: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=s),
                         state, trainer.state_shardings)
  else:
    state = trainer.init_state()
  mark("set up")
  t0 = time.perf_counter()
  lowered = trainer.train_step.lower(state, batch)
  mark("lowered")
  compiled = lowered.compile()
  compile_s = time.perf_counter() - t0
  mark("compiled")
  n_params = count_params(trainer.abstract_params)
  info = {
      "params": n_params,
      "tokens_per_step": cfg.data.batch_size * cfg.data.seq_len,
      "model_flops_per_token": train_flops_per_token(cfg, n_params),
      "xla_flops_per_step": xla_flops(compiled),
      "counted_flops_per_step": counted_flops(compiled),
      "compile_s": compile_s,
      "memory": memory_stats(compiled),
  }
  return cfg, compiled, state, batch, info


def bench_train(size: Size, kinds, ceiling: dict | None, echo=print) -> dict:
  """Train-step time of each kind (interleaved), tokens/s and FLOPs utilization.

  `ceiling` is the matmul section's result; MFU uses the ceiling of the compute dtype.
  """
  results, fns = {}, {}
  for kind in kinds:
    echo(f"train step: compiling {kind}")
    try:
      _, compiled, state, batch, info = _train_setup(kind, size)
    except Exception as e:  # noqa: BLE001 (one failing kind must not stop the others)
      results[kind] = _failure(kind, e, echo)
      continue
    holder = {"state": state}

    def step(holder=holder, compiled=compiled, batch=batch):
      holder["state"], metrics = compiled(holder["state"], batch)
      return metrics["loss"]

    fns[kind] = step
    results[kind] = info
  if fns:
    echo(f"train step: timing {', '.join(fns)}")
    times = interleaved(fns, size.repeats, size.warmup, echo)
  else:
    times = {}
  peak = None if not ceiling else ceiling.get(size.dtype, {}).get("flops_per_s")
  for kind, t in times.items():
    r = results[kind]
    r.update(t)
    r["tokens_per_s"] = r["tokens_per_step"] / t["median_s"]
    r["model_flops_per_s"] = r["model_flops_per_token"] * r["tokens_per_s"]
    if r["xla_flops_per_step"]:
      r["xla_flops_per_s"] = r["xla_flops_per_step"] / t["median_s"]
    if peak:
      r["mfu"] = r["model_flops_per_s"] / peak
      if r["xla_flops_per_step"]:
        r["xla_flops_fraction"] = r["xla_flops_per_s"] / peak
  ratios = {}
  if "e2e-meta" in times and "e2e-pretrain" in times:
    ratios["e2e_meta_over_pretrain"] = (times["e2e-meta"]["median_s"]
                                        / times["e2e-pretrain"]["median_s"])
  if "transformer" in times:
    base = times["transformer"]["median_s"]
    ratios["step_time_over_transformer"] = {k: t["median_s"] / base for k, t in times.items()}
  return {"kinds": results, "ratios": ratios}


def train_memory(size: Size, kinds, echo=print) -> dict:
  """Compile-only memory analysis of the train step of each kind (no allocation)."""
  out = {}
  for kind in kinds:
    try:
      out[kind] = _train_setup(kind, size, compile_only=True)[4]["memory"]
    except Exception as e:  # noqa: BLE001
      out[kind] = _failure(kind, e, echo)
  return out


def _ttt_fwd_bwd(kind: str, size: Size, impl: str, x, remat_group: int | None = None):
  """(jitted value_and_grad of one TTT layer w.r.t. parameters and input, parameters)."""
  cfg = model_config(kind, size)
  cfg.model.ttt.impl = impl
  if remat_group is not None:
    cfg.model.ttt.remat_group = remat_group
  graphdef, params, rest = nnx.split(make_mixer(cfg.model, nnx.Rngs(0)), nnx.Param, ...)
  positions = jnp.arange(x.shape[1], dtype=jnp.int32)

  def loss(params, x):
    y, _ = nnx.merge(graphdef, params, rest)(x, positions, None)
    return jnp.mean(jnp.square(y.astype(jnp.float32)))

  return jax.jit(jax.value_and_grad(loss, argnums=(0, 1))), params


def bench_ttt_impl(size: Size, layers=("ttt_linear", "ttt_mlp"), echo=print) -> dict:
  """One TTT layer, forward + backward (w.r.t. parameters and input), dual vs primal form."""
  results, fns = {}, {}
  b, t, d = size.batch, size.seq_len, size.d_model
  x = jax.random.normal(jax.random.key(0), (b, t, d), jnp.float32)
  for kind in layers:
    for impl in ("dual", "primal"):
      name = f"{kind}/{impl}"
      try:
        fwd_bwd, params = _ttt_fwd_bwd(kind, size, impl, x)
        compiled = fwd_bwd.lower(params, x).compile()
      except Exception as e:  # noqa: BLE001
        results[name] = _failure(name, e, echo)
        continue
      fns[name] = lambda c=compiled, p=params: c(p, x)
      results[name] = {"memory": memory_stats(compiled), "xla_flops": xla_flops(compiled)}
  if fns:
    echo(f"TTT layer fwd+bwd [{b}, {t}, {d}]: timing {', '.join(fns)}")
    for name, tm in interleaved(fns, size.repeats, size.warmup, echo).items():
      results[name].update(tm)
  ratios = {}
  for kind in layers:
    dual, primal = results.get(f"{kind}/dual", {}), results.get(f"{kind}/primal", {})
    if "median_s" in dual and "median_s" in primal:
      ratios[f"{kind}_primal_over_dual"] = primal["median_s"] / dual["median_s"]
  return {"shape": [b, t, d], "impls": results, "ratios": ratios}


def ttt_memory(size: Size, layers=("ttt_linear", "ttt_mlp"), echo=print) -> dict:
  """Peak memory (compile-time buffer assignment, nothing allocated) of one TTT layer's
  forward + backward on one sequence at each of `size.ttt_memory_lengths`, with remat through
  time off (a plain scan keeps every mini-batch's residuals) and on (the config default group of
  mini-batches per checkpoint)."""
  group = int(base_config().model.ttt.remat_group)
  out: dict = {"d_model": size.d_model, "mini_batch": size.ttt_mini_batch,
               "remat_group": group, "layers": {}}
  for kind in layers:
    per = out["layers"][kind] = {}
    for t in size.ttt_memory_lengths:
      x = jax.ShapeDtypeStruct((1, t, size.d_model), jnp.float32)
      row = per[str(t)] = {}
      for label, g in (("no_remat", 0), ("remat", group)):
        try:
          fwd_bwd, params = _ttt_fwd_bwd(kind, size, "dual", x, remat_group=g)
          row[label] = memory_stats(fwd_bwd.lower(params, x).compile())
        except Exception as e:  # noqa: BLE001
          row[label] = _failure(f"{kind}@{t}/{label}", e, echo)
      if "peak_bytes" in row["no_remat"] and "peak_bytes" in row["remat"]:
        row["no_remat_over_remat"] = row["no_remat"]["peak_bytes"] / row["remat"]["peak_bytes"]
      echo(f"TTT memory {kind} T={t}: " + ", ".join(
          f"{k} {v['peak_bytes'] / 2**20:.1f} MiB" for k, v in row.items()
          if isinstance(v, dict) and "peak_bytes" in v))
  return out
