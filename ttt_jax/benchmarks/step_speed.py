"""Old vs new code of the TTT and E2E steps, compiled and timed side by side in one process.

`compare(baseline, targets)` compiles every target twice, once with the working tree's code and
once inside `revisions.swapped(baseline, ...)` (the layers' shared helpers, the TTT layer, its
inner loop and the E2E model at git revision `baseline`), then times all programs round-robin
with the matmul ceiling in the same rounds. Ratios of medians taken this way hold on a loaded
machine where absolute numbers from separate runs do not. Targets:
  layer:<ttt_linear|ttt_mlp>  one TTT layer, forward + backward w.r.t. parameters and input, at
                              [1, layer_len, d_model] of the preset (dual form);
  train:<kind>                the train step of a bench kind (`common.TRAIN_KINDS`).
"""

from __future__ import annotations

import argparse
import json
import time
from collections.abc import Callable

import jax
import jax.numpy as jnp
from flax import nnx

from ttt_jax.argtypes import non_negative_int, positive_int
from ttt_jax.benchmarks import common, revisions, training
from ttt_jax.benchmarks.common import Size, interleaved, model_config, tree_rel_err, xla_flops
from ttt_jax.models.lm import make_mixer

SWAPPED_MODULES = ["ttt_jax.layers.common", "ttt_jax.layers.ttt_inner", "ttt_jax.layers.ttt",
                   "ttt_jax.models.e2e_inner", "ttt_jax.models.e2e"]


def _layer_program(kind: str, size: Size, length: int, batch: int = 1, impl: str = "dual"):
  x = jax.random.normal(jax.random.key(0), (batch, length, size.d_model), jnp.float32)
  fwd_bwd, params = training._ttt_fwd_bwd(kind, size, impl, x)  # noqa: SLF001
  t0 = time.perf_counter()
  compiled = fwd_bwd.lower(params, x).compile()
  compile_s = time.perf_counter() - t0
  return (lambda: compiled(params, x)), compiled, compile_s


def _layer_outputs(kind: str, size: Size, length: int, batch: int = 1) -> Callable:
  """The layer's outputs y [batch, length, D] (for the value comparison of old and new code)."""
  cfg = model_config(kind, size)
  graphdef, state = nnx.split(make_mixer(cfg.model, nnx.Rngs(0)))
  x = jax.random.normal(jax.random.key(0), (batch, length, size.d_model), jnp.float32)
  positions = jnp.arange(length, dtype=jnp.int32)
  fwd = jax.jit(lambda s, x: nnx.merge(graphdef, s)(x, positions, None)[0])
  return lambda: fwd(state, x)


def _train_program(kind: str, size: Size):
  _, compiled, state, batch, info = training._train_setup(kind, size)  # noqa: SLF001
  holder = {"state": state}

  def step():
    holder["state"], metrics = compiled(holder["state"], batch)
    return metrics["loss"]

  return step, compiled, info["compile_s"]


def build(target: str, size: Size, layer_len: int, layer_batch: int = 1):
  """(callable, compiled, compile seconds) of one target with the code currently loaded."""
  what, _, kind = target.partition(":")
  if what == "layer":
    return _layer_program(kind, size, layer_len, layer_batch)
  if what == "train":
    return _train_program(kind, size)
  raise ValueError(f"unknown target {target!r}: layer:<kind> or train:<kind>")


def compare(baseline: str, targets: list[str], size: Size, layer_len: int = 2048,
            repeats: int = 5, warmup: int = 1, echo=print, layer_batch: int = 1) -> dict:
  """Per target: old and new medians, new/old speedup, XLA FLOPs / ceiling, compile times, and
  for layer targets the largest relative difference of the outputs (values and gradients)."""
  fns, info = {}, {}
  for target in targets:
    for label in ("new", "old"):
      echo(f"compiling {target} ({label})")
      if label == "old":
        with revisions.swapped(baseline, SWAPPED_MODULES):
          fn, compiled, cs = build(target, size, layer_len, layer_batch)
      else:
        fn, compiled, cs = build(target, size, layer_len, layer_batch)
      fns[f"{target}/{label}"] = fn
      info[f"{target}/{label}"] = {"compile_s": cs, "xla_flops": xla_flops(compiled)}
    if target.startswith("layer:"):  # values (outputs y) and gradients, new vs old
      kind = target.partition(":")[2]
      y_new = _layer_outputs(kind, size, layer_len, layer_batch)()
      with revisions.swapped(baseline, SWAPPED_MODULES):
        y_old = _layer_outputs(kind, size, layer_len, layer_batch)()
      info[f"{target}/new"]["max_rel_diff_y"] = tree_rel_err(y_new, y_old)
      info[f"{target}/new"]["max_rel_diff_grads"] = tree_rel_err(fns[f"{target}/new"](),
                                                                 fns[f"{target}/old"]())
  n = size.matmul_n
  a = jax.random.normal(jax.random.key(1), (n, n), jnp.float32)
  mm = jax.jit(jnp.dot).lower(a, a).compile()
  fns["matmul"] = lambda: mm(a, a)
  times = interleaved(fns, repeats, warmup, echo)
  peak = 2 * n ** 3 / times["matmul"]["median_s"]
  out = {"matmul_flops_per_s": peak, "targets": {}}
  for target in targets:
    row = {}
    for label in ("new", "old"):
      r = dict(info[f"{target}/{label}"], **times[f"{target}/{label}"])
      if r["xla_flops"]:
        r["xla_fraction"] = r["xla_flops"] / r["median_s"] / peak
      row[label] = r
    row["speedup"] = row["old"]["median_s"] / row["new"]["median_s"]
    out["targets"][target] = row
  return out


def format_table(result: dict) -> str:
  lines = [f"matmul ceiling (same rounds): {result['matmul_flops_per_s'] / 1e9:.1f} GFLOP/s",
           "| target | old ms | new ms | old/new | XLA/peak old | XLA/peak new | compile old s "
           "| compile new s | rel diff y | rel diff grads |", "|" + "---|" * 10]
  for target, r in result["targets"].items():
    o, n = r["old"], r["new"]
    frac = lambda x: f"{100 * x['xla_fraction']:.1f}%" if "xla_fraction" in x else "-"  # noqa: E731
    diff = " | ".join(f"{n[k]:.1e}" if k in n else "-"
                      for k in ("max_rel_diff_y", "max_rel_diff_grads"))
    lines.append(f"| {target} | {1e3 * o['median_s']:.1f} | {1e3 * n['median_s']:.1f} | "
                 f"{r['speedup']:.2f}x | {frac(o)} | {frac(n)} | {o['compile_s']:.1f} | "
                 f"{n['compile_s']:.1f} | {diff} |")
  return "\n".join(lines)


def build_parser() -> argparse.ArgumentParser:
  p = argparse.ArgumentParser(
      description="Old vs new TTT/E2E step speed, side by side in one process.")
  p.add_argument("--baseline", default="HEAD", help="git revision of the old code")
  p.add_argument("--targets", default="layer:ttt_linear,layer:ttt_mlp",
                 help="comma list of layer:<ttt_linear|ttt_mlp> and train:<bench kind>")
  p.add_argument("--preset", choices=sorted(common.PRESETS), default="cpu")
  p.add_argument("--layer_len", type=positive_int, default=2048,
                 help="sequence length of layer targets")
  p.add_argument("--layer_batch", type=positive_int, default=1, help="batch of layer targets")
  p.add_argument("--repeats", type=positive_int, default=5)
  p.add_argument("--warmup", type=non_negative_int, default=1)
  p.add_argument("--json", default="", help="also write the results here")
  return p


def main(argv=None) -> None:
  args = build_parser().parse_args(argv)
  targets = [s.strip() for s in args.targets.split(",") if s.strip()]
  revisions.check_revision(args.baseline)  # before anything compiles
  result = compare(args.baseline, targets, common.PRESETS[args.preset], args.layer_len,
                   args.repeats, args.warmup, layer_batch=args.layer_batch)
  print(format_table(result))
  if args.json:
    with open(args.json, "w") as f:
      json.dump(result, f, indent=1)
