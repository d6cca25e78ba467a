"""The tasks of `make gpu-check` (ttt_jax/benchmarks/gpu_check.py lists them): each runs in a
child process and returns one JSON-able dict. Imports are local so a child loads only what its
task needs."""

from __future__ import annotations

import json
import time

from ttt_jax.benchmarks.gpu_variants import pretrain_config, setup_train_kind, tune_sweep

STREAM_LENGTHS = (8192, 32768, 131072)
ATTENTION_SHAPE = (8192, 8, 64)  # tokens, heads, head dim
PADDED_HEAD_DIM = 80  # the 3b presets': the TTT kernels run it padded to 128 (`pallas`, `tune`)


def _error(e: Exception, limit: int = 300) -> dict:
  from ttt_jax.benchmarks.common import error_record  # noqa: PLC0415
  return error_record(e, limit)


def mark(phase: str) -> None:
  """Tells gpu-check that `phase` of this task has ended (a `PHASE <name> <epoch s>` line): its
  summary splits each task's wall time by phase, and says which phase a task that ran out of
  time was in."""
  print(f"PHASE {phase} {time.time():.3f}", flush=True)


def print_result(out: dict) -> None:
  """Prints a task's result, or its rows so far: if the task then runs out of time, gpu-check
  keeps them (the last `RESULT` line wins)."""
  print("RESULT " + json.dumps(out), flush=True)


def _median_time(fn, repeats: int = 5, warmup: int = 2) -> float:
  from ttt_jax.benchmarks.common import interleaved  # noqa: PLC0415

  return interleaved({"fn": fn}, repeats, warmup, echo=lambda s: None)["fn"]["median_s"]


# -- tasks (each runs in a child process) ---------------------------------------------------------
# the packages whose versions `env` records (None: not installed), JAX's CUDA plugins among them
ENV_PACKAGES = ("jax", "jaxlib", "jax-cuda12-plugin", "jax-cuda13-plugin", "flax", "optax",
                "orbax-checkpoint", "grain", "numpy")


def task_env(n: int = 8192) -> dict:
  """The device, package versions and the bf16 matmul ceiling (n^3)."""
  import importlib.metadata as md  # noqa: PLC0415

  import jax  # noqa: PLC0415
  import jax.numpy as jnp  # noqa: PLC0415

  from ttt_jax.models import rng_kernel_same_bits  # noqa: PLC0415

  dev = jax.devices()[0]
  versions = {}
  for name in ENV_PACKAGES:
    try:
      versions[name] = md.version(name)
    except md.PackageNotFoundError:
      versions[name] = None
  a = jax.random.normal(jax.random.key(0), (n, n), jnp.bfloat16)
  b = jax.random.normal(jax.random.key(1), (n, n), jnp.bfloat16)
  mm = jax.jit(jnp.dot).lower(a, b).compile()
  t = _median_time(lambda: mm(a, b), repeats=10, warmup=3)
  try:
    same = rng_kernel_same_bits()
  except Exception as e:  # noqa: BLE001  (the rest of the record stands without it)
    same = _error(e, 200)["error"]
  return {"device": dev.device_kind, "platform": dev.platform, "versions": versions,
          "bf16_matmul_flops_per_s": 2 * n**3 / t, "rng_kernel_same_bits": same}


def task_attention() -> dict:
  import jax  # noqa: PLC0415
  import jax.numpy as jnp  # noqa: PLC0415

  from ttt_jax.benchmarks.common import tree_rel_err  # noqa: PLC0415
  from ttt_jax.layers.attention import AttentionAlgorithm, dot_product_attention  # noqa: PLC0415

  out = {}
  t, h, d = ATTENTION_SHAPE
  keys = jax.random.split(jax.random.key(0), 4)
  q, k, v, probe = (jax.random.normal(kk, (1, t, h, d), jnp.float32) for kk in keys)
  pos = jnp.arange(t, dtype=jnp.int32)
  for window in (None, 1024):
    def loss(q, k, v, algo, window=window):
      o = dot_product_attention(q, k, v, pos, pos, window, ordered=True, algorithm=algo)
      return jnp.sum(o.astype(jnp.float32) * probe), o

    with jax.default_matmul_precision("highest"):
      ref = jax.jit(jax.value_and_grad(
          lambda q, k, v: loss(q, k, v, AttentionAlgorithm("blockwise"))[0],
          argnums=(0, 1, 2)))(q, k, v)
    row = {}
    for impl in ("blockwise", "xla", "cudnn"):
      algo = AttentionAlgorithm(impl=impl)
      fn = jax.jit(jax.value_and_grad(lambda q, k, v, algo=algo: loss(q, k, v, algo)[0],
                                      argnums=(0, 1, 2)))
      args = [x.astype(jnp.bfloat16) for x in (q, k, v)]
      try:
        val, grads = fn(*args)
        row[impl] = {"value_rel_err": abs(float(val) - float(ref[0])) / abs(float(ref[0])),
                     "grad_rel_err": tree_rel_err(tuple(g.astype(jnp.float32) for g in grads),
                                                  tuple(ref[1])),
                     "fwd_bwd_s": _median_time(lambda fn=fn, args=args: fn(*args))}
      except Exception as e:  # noqa: BLE001
        row[impl] = _error(e, 200)
    out[f"window={window}"] = row
    print_result(out)
  return out


def task_pallas(preset: str = "gpu") -> dict:
  """Both TTT kernels vs the XLA dual form (fp32, small; TTT-Linear also with its output made by
  XLA, `row` linear-xla, and as a streaming call leaves out the last two updates, linear-stream;
  both at `PADDED_HEAD_DIM`, which they run padded), then one layer's fwd+bwd time, dual vs
  pallas (`LAYER_TIMINGS`), at `preset`'s shape."""
  import functools  # noqa: PLC0415

  import jax  # noqa: PLC0415
  import jax.numpy as jnp  # noqa: PLC0415
  import numpy as np  # noqa: PLC0415

  from ttt_jax.benchmarks.common import PRESETS, tree_rel_err  # noqa: PLC0415
  from ttt_jax.layers import ttt_dual, ttt_inner, ttt_pallas  # noqa: PLC0415

  rng = np.random.default_rng(0)
  interpret = jax.default_backend() != "gpu"  # CPU smoke runs
  n, bsz, h, b = 8, 2, 4, 16
  f = lambda *s, sc=1.0: jnp.asarray(sc * rng.standard_normal(s), jnp.float32)  # noqa: E731
  gate = jnp.asarray(rng.uniform(0.1, 0.9, (n, bsz, h, b)), jnp.float32)
  out = {}
  base_lr = {"linear": 1.0, "mlp": 0.1}  # the presets' inner base LRs
  pad = PADDED_HEAD_DIM
  for row, kind, tune, done, d in (
      ("linear", "linear", {}, None, 64), ("mlp", "mlp", {}, None, 64),
      ("linear-xla", "linear", {"linear_output": "xla"}, None, 64),
      ("linear-stream", "linear", {}, jnp.arange(n) < n - 2, 64),
      (f"linear-hd{pad}", "linear", {}, None, pad), (f"mlp-hd{pad}", "mlp", {}, None, pad)):
    xs = (f(n, bsz, h, b, d), f(n, bsz, h, b, d), f(n, bsz, h, b, d))
    ln = (1 + f(h, 1, d, sc=0.1), f(h, 1, d, sc=0.1))
    model = ttt_inner.inner_model(kind)
    eta = ttt_inner.token_lr(gate, f(b, sc=0.1), base_lr[kind], d)
    params = {k: f(bsz, h, *s, sc=0.3 if k in model.weight_names else 0.1)
              for k, s in model.param_shapes(d).items()}
    kern = functools.partial(model.pallas_sequence, complete=done, interpret=interpret)
    dual = lambda p, ln, *x, k=kind, c=done: ttt_dual.dual_sequence(k, p, ln, *x, 4, c)  # noqa: E731
    probe = f(n, bsz, h, b, d)

    def vg(fn, probe=probe):
      def obj(*a):
        final, z = fn(*a)
        return jnp.sum(z * probe) + sum(jnp.sum(jnp.sin(w)) for w in jax.tree.leaves(final))
      return jax.jit(jax.value_and_grad(obj, argnums=tuple(range(6))))

    try:  # one kernel failing does not hide the other's result
      with jax.default_matmul_precision("highest"), ttt_pallas.tuning(**tune):
        v_d, g_d = vg(dual)(params, ln, *xs, eta)
        v_k, g_k = vg(kern)(params, ln, *xs, eta)
      out[row] = {"value_rel_err": abs(float(v_k) - float(v_d)) / abs(float(v_d)),
                  "grad_rel_err": tree_rel_err(g_k, g_d)}
    except Exception as e:  # noqa: BLE001
      out[row] = _error(e)
    print_result(out)
  size = PRESETS[preset]
  x = jax.random.normal(jax.random.key(0), (size.batch, size.seq_len, size.d_model))
  for layer, impl, row, tune in LAYER_TIMINGS:
    out[f"{layer}/{row}"] = _timed_layer(layer, size, impl, x, tune)
    print_result(out)
  return out


# `pallas`'s layer timings: (layer, impl, row name, ttt_pallas tuning); TTT-Linear's kernels
# also with their output made by XLA and the kernels on the W chain alone
LAYER_TIMINGS = (("ttt_linear", "dual", "dual", {}), ("ttt_linear", "pallas", "pallas", {}),
                 ("ttt_linear", "pallas", "pallas-xla", {"linear_output": "xla"}),
                 ("ttt_mlp", "dual", "dual", {}), ("ttt_mlp", "pallas", "pallas", {}))


LEARN_CASES = (("transformer/cudnn", {"attention_impl": "cudnn"}, "full"),
               ("transformer/xla", {"attention_impl": "xla"}, "full"),
               ("transformer/cudnn/noremat", {"attention_impl": "cudnn"}, "none"))


def task_learn(steps: int = 10, preset: str = "gpu") -> dict:
  """The transformer's first `steps` train steps on one batch of random bytes with each attention
  implementation, from the same initialisation: a step that learns lowers the loss (the batch's
  bigrams can be memorised), a skipped non-finite step leaves it where it was."""
  import dataclasses  # noqa: PLC0415

  import jax  # noqa: PLC0415

  from ttt_jax.benchmarks.common import PRESETS  # noqa: PLC0415
  from ttt_jax.benchmarks.training import _train_setup  # noqa: PLC0415

  out = {}
  for name, overrides, remat in LEARN_CASES:
    try:
      size = dataclasses.replace(PRESETS[preset], remat=remat)
      _, compiled, state, batch, info = _train_setup("transformer", size, overrides=overrides)
      rows = []
      for _ in range(steps):
        state, metrics = compiled(state, batch)
        rows.append({k: float(v) for k, v in jax.device_get(metrics).items()
                     if k in ("loss", "grad_norm", "lr", "finite")})
      out[name] = {"compile_s": info["compile_s"],
                   **{k: [r[k] for r in rows] for k in rows[0]}}
    except Exception as e:  # noqa: BLE001
      out[name] = _error(e)
    print_result(out)
  return out


def task_tune(preset: str = "gpu", layer: str = "ttt_linear") -> dict:
  """One TTT layer's fwd+bwd at the gpu preset: `tune_sweep(layer)`'s rows, each precision's
  error against the IEEE dual form; then the same heads at `PADDED_HEAD_DIM` (rows `/hd80`: the
  3b presets' head dim, which the kernels run padded to 128), against that width's IEEE dual."""
  import dataclasses  # noqa: PLC0415

  import jax  # noqa: PLC0415

  from ttt_jax.benchmarks.common import PRESETS  # noqa: PLC0415

  size = PRESETS[preset]
  padded = dataclasses.replace(size, d_model=size.num_heads * PADDED_HEAD_DIM)
  runs = [(name, size, impl, precision, tune) for name, impl, precision, tune in tune_sweep(layer)]
  runs += [(f"{impl}/{precision}/hd{PADDED_HEAD_DIM}", padded, impl, precision, {})
           for impl, precision in (("dual", "highest"), ("dual", "default"),
                                   ("pallas", "default"))]
  out, refs = {}, {}
  for name, at, impl, precision, tune in runs:
    x = jax.random.normal(jax.random.key(0), (at.batch, at.seq_len, at.d_model))
    reference = impl == "dual" and precision == "highest"
    out[name] = _timed_layer(layer, at, impl, x, tune, precision, refs, reference)
    print_result(out)
  return out


def _timed_layer(layer, size, impl, x, tune, precision=None, refs=None, reference=False) -> dict:
  """Compile and median fwd+bwd time of one TTT layer under `tune` (and matmul `precision`);
  with `refs` ({d_model: result}), its error against the reference at its width, which a
  `reference` row sets (NaN where that row failed)."""
  import contextlib  # noqa: PLC0415

  import jax  # noqa: PLC0415

  from ttt_jax.benchmarks.common import tree_rel_err  # noqa: PLC0415
  from ttt_jax.benchmarks.training import _ttt_fwd_bwd  # noqa: PLC0415
  from ttt_jax.layers import ttt_pallas  # noqa: PLC0415

  matmuls = jax.default_matmul_precision(precision) if precision else contextlib.nullcontext()
  try:
    with matmuls, ttt_pallas.tuning(**tune):  # traced and compiled under the setting
      t0 = time.perf_counter()
      fn, params = _ttt_fwd_bwd(layer, size, impl, x)
      compiled = fn.lower(params, x).compile()
    row = {"compile_s": time.perf_counter() - t0,
           "fwd_bwd_s": _median_time(lambda c=compiled, p=params: c(p, x))}
    if refs is not None:
      result = compiled(params, x)
      if reference:
        refs[size.d_model] = result
      ref = refs.get(size.d_model)
      row["rel_err_vs_ieee_dual"] = float("nan") if ref is None else tree_rel_err(result, ref)
    return row
  except Exception as e:  # noqa: BLE001
    return _error(e)


def task_e2e() -> dict:
  import dataclasses  # noqa: PLC0415

  import jax  # noqa: PLC0415
  import numpy as np  # noqa: PLC0415
  from flax import nnx  # noqa: PLC0415

  from ttt_jax.benchmarks.common import PRESETS, model_config, tree_rel_err  # noqa: PLC0415
  from ttt_jax.layers.common import building_for  # noqa: PLC0415
  from ttt_jax.models import build_model  # noqa: PLC0415
  from ttt_jax.train.trainer import Trainer  # noqa: PLC0415

  # the preset's structure (8 layers: a suffix of 2) at a width the CPU side compiles quickly
  size = dataclasses.replace(PRESETS["gpu"], d_model=256, num_heads=4, intermediate=768,
                             seq_len=512, batch=2, e2e_chunk=128, dtype="float32")
  cfg = model_config("e2e-meta", size)
  tokens = np.random.default_rng(0).integers(0, 256, (2, size.seq_len + 1)).astype(np.int32)
  batch = {"tokens": tokens}
  res = {}
  here = jax.default_backend()
  for platform in (here, "cpu") if here != "cpu" else ("cpu",):
    device = jax.devices(platform)[0]
    with building_for(platform), jax.default_device(device):
      graphdef, params = nnx.split(build_model(cfg.model, 0))

      def loss(p, graphdef=graphdef):
        return nnx.merge(graphdef, p).compute_loss(batch, None)[0]

      with jax.default_matmul_precision("highest"):
        res[platform] = jax.jit(jax.value_and_grad(loss))(jax.device_put(params, device))
  out = {"fp32_loss_gpu": float(res[here][0]), "fp32_loss_cpu": float(res["cpu"][0]),
         "fp32_grad_rel_err": tree_rel_err(jax.device_get(res[here][1]),
                                           jax.device_get(res["cpu"][1]))}
  cfg16 = model_config("e2e-meta", dataclasses.replace(size, dtype="bfloat16"))
  trainer = Trainer.create(cfg16)
  state = trainer.init_state()
  state, metrics = trainer.train_step(state, trainer.device_batch(batch))
  out["bf16_meta_step_loss"] = float(metrics["loss"])
  out["bf16_kernels"] = {"prefix": trainer.model(state.params).blocks[0].mixer.algorithm.impl,
                         "inner_loop": trainer.model(state.params).inner_attention.impl}
  return out


def _backend_up() -> None:
  import jax  # noqa: PLC0415

  jax.devices()
  mark("backend up")


def task_train(kind: str) -> dict:
  """Kind K[+variant] at the gpu preset (`gpu_variants.setup_train_kind`)."""
  _backend_up()
  return _time_steps(*setup_train_kind(kind, mark=mark))


def task_train_125m(kind: str) -> dict:
  """The `125m` pretraining preset of kind K at 8K context (bf16), batch 8 sequences."""
  from ttt_jax.benchmarks.training import train_setup_from_config  # noqa: PLC0415

  _backend_up()
  cfg = pretrain_config(kind)
  _, compiled, state, batch, info = train_setup_from_config(cfg, mark=mark)
  info["seq_len"] = cfg.data.seq_len
  return _time_steps(compiled, state, batch, info)


def _time_steps(compiled, state, batch, info: dict) -> dict:
  """Median step time; the steps' losses and finite flags (all on one batch: a healthy step
  lowers the loss) are kept, so a run whose updates are all skipped as non-finite shows; then
  where the device time of three more steps goes (`kernel_profile`)."""
  from ttt_jax.benchmarks.kernel_profile import profile_or_error  # noqa: PLC0415

  holder, history = {"state": state}, []

  def step():
    holder["state"], metrics = compiled(holder["state"], batch)
    history.append((metrics["loss"], metrics["finite"]))
    return metrics["loss"]

  info["median_s"] = _median_time(step, repeats=7, warmup=2)
  info["loss"] = float(step())
  info["losses"] = [float(loss) for loss, _ in history]
  info["nonfinite_steps"] = sum(float(f) == 0 for _, f in history)
  mark("timed")
  print_result(info)  # gpu-check keeps this if the profile hangs
  info["profile"] = profile_or_error(lambda: (step(), holder["state"])[1], compiled.as_text())
  mark("profiled")
  return info


def task_stream(spec: str) -> dict:
  """Kinds K1/K2/... (streaming.STREAM_ALIASES included) timed interleaved in one process: one
  kind's results as they are, several as {'kinds': ..., 'ratios': ...}."""
  import dataclasses  # noqa: PLC0415

  from ttt_jax.benchmarks import streaming  # noqa: PLC0415
  from ttt_jax.benchmarks.common import PRESETS  # noqa: PLC0415

  kinds = spec.split("/")
  size = dataclasses.replace(PRESETS["gpu"], repeats=3, warmup=1, decode_steps=16)
  out = streaming.bench_streaming(size, kinds, STREAM_LENGTHS, prefill=True, decode=True,
                                  echo=lambda s: print(s, flush=True))
  return out["kinds"][kinds[0]] if len(kinds) == 1 else {k: out[k] for k in ("kinds", "ratios")}


def task_cache_attention() -> dict:
  """The Triton cache-attention kernel vs masked cuDNN: a 512-query chunk and a decode query
  against a 128K cache of the gpu preset's heads (8 x 64)."""
  from ttt_jax.benchmarks import streaming  # noqa: PLC0415

  return streaming.bench_cache_attention(STREAM_LENGTHS[-1], 512, 8, 64,
                                         echo=lambda s: print(s, flush=True))


TASKS = {"env": task_env, "attention": task_attention, "pallas": task_pallas, "e2e": task_e2e,
         "learn": task_learn, "tune": task_tune,
         "tune_mlp": lambda: task_tune(layer="ttt_mlp"), "cache_attention": task_cache_attention}


def run_task(name: str) -> dict:
  if name.startswith("train:"):  # a variant's XLA flags were set by the parent
    return task_train(name.split(":", 1)[1])
  if name.startswith("train125m:"):  # K+V: config variants through `pretrain_config`
    return task_train_125m(name.split(":", 1)[1])
  name = name.partition("+")[0]
  if name.startswith("stream:"):
    return task_stream(name.split(":", 1)[1])
  return TASKS[name]()
