"""The TTT-E2E paper's loss-vs-context-length comparison (its Figure 1, left) at a small scale.

Five models of about equal parameter count (full attention, SWA, TTT-Linear, TTT-MLP, TTT-E2E)
are pretrained on the same tokens of the embedded corpus at one context length (same seed, same
windows, same number of steps), then every model streams the same validation documents and
its next-token loss is read per position. Because all models are causal and every evaluated
sequence is a document prefix starting at BOS, the loss at context length L is the mean of the
per-position losses over the first L positions (what evaluating sequences of exactly L tokens
gives), so one pass at the longest length yields every length.
"""

from __future__ import annotations

import argparse
import os
import time

import jax
import numpy as np
from flax import nnx

from ttt_jax.argtypes import non_negative_int, positive_float, positive_int
from ttt_jax.benchmarks.common import machine_info
from ttt_jax.benchmarks.reproduce_report import write_reproduction
from ttt_jax.config import ConfigError, build_config, parse_ctx, validate
from ttt_jax.data.dataset import Dataset
from ttt_jax.eval import perplexity
from ttt_jax.models import abstract_model, count_params
from ttt_jax.train.loop import train_and_evaluate
from ttt_jax.train.trainer import Trainer

KINDS = ("transformer", "swa", "ttt_linear", "ttt_mlp", "e2e")


def build_parser() -> argparse.ArgumentParser:
  p = argparse.ArgumentParser(description="Loss vs context length of five equally sized models "
                              "trained on the same tokens; writes a markdown report + PNG.")
  p.add_argument("--budget_minutes", type=positive_float, default=15.0,
                 help="training time for all five models together; sets the step count from "
                      "measured step times (ignored with --steps)")
  p.add_argument("--steps", type=non_negative_int, default=0, help="fixed number of training steps")
  p.add_argument("--scale", default="tiny", help="config scale (tiny = 4 x 128)")
  p.add_argument("--ctx", default="1k", help="training context length")
  p.add_argument("--eval_ctx", default="128,256,512,1k", help="evaluation context lengths")
  p.add_argument("--batch_size", type=positive_int, default=8)
  p.add_argument("--eval_docs", type=positive_int, default=32,
                 help="validation documents per length")
  p.add_argument("--seed", type=non_negative_int, default=0)
  p.add_argument("--kinds", default=",".join(KINDS))
  p.add_argument("--workdir", default="runs/e2e_small", help="one run directory per model")
  p.add_argument("--out", default="docs/results/e2e_small.md", help="report (PNG beside it)")
  p.add_argument("--resume", action="store_true",
                 help="continue runs found in --workdir instead of starting over")
  return p


def count_params_of(config) -> int:
  return count_params(nnx.to_pure_dict(abstract_model(config.model, config.seed)[1]))


def _set_width(config, width: int):
  config.model.intermediate_size = width
  if config.model.kind == "e2e":
    config.model.e2e.prime_intermediate_size = width
  return config


def match_params(config, target: int, multiple: int = 8):
  """Sets the MLP width (E2E: MLP and prime-MLP width) so the parameter count is closest to
  `target`. The count is linear in the width, so two abstract builds give the slope."""
  w0 = config.model.intermediate_size
  p0 = count_params_of(config)
  p1 = count_params_of(_set_width(config, w0 + multiple))
  slope = (p1 - p0) / multiple
  best = w0 if slope <= 0 else w0 + (target - p0) / slope
  return _set_width(config, max(multiple, int(round(best / multiple)) * multiple))


def experiment_config(kind: str, args, steps: int):
  ctx = parse_ctx(args.ctx)
  c = build_config(f"model={kind},scale={args.scale},ctx={ctx}")
  c.seed = args.seed
  c.data.batch_size = args.batch_size
  tr = c.train
  tr.steps = steps
  tr.warmup_steps = max(1, steps // 10)
  tr.log_every = max(1, steps // 20)
  tr.eval_every = steps
  c.checkpoint.every_steps = steps
  c.checkpoint.resume = bool(args.resume)
  c.checkpoint.overwrite = not args.resume
  if kind == "e2e":
    c.model.e2e.ilr_warmup_steps = max(1, min(c.model.e2e.ilr_warmup_steps, steps // 3))
  return validate(c)


def configs_for(args, steps: int) -> dict:
  kinds = [k.strip() for k in args.kinds.split(",") if k.strip()]
  for k in kinds:
    if k not in KINDS:
      raise ConfigError(f"--kinds {k!r} unknown; allowed: {', '.join(KINDS)}")
  ref = experiment_config("transformer", args, steps)
  target = count_params_of(ref)
  out = {}
  for kind in kinds:
    c = experiment_config(kind, args, steps)
    out[kind] = c if kind in ("transformer", "swa") else match_params(c, target)
  return out


def measure_step_seconds(config, steps: int = 3) -> float:
  """Median wall time of a compiled train step (after one warm-up step)."""
  trainer = Trainer.create(config)
  state = trainer.init_state()
  rng = np.random.default_rng(0)
  batch = trainer.device_batch({"tokens": rng.integers(
      0, 256, (config.data.batch_size, config.data.seq_len + 1), dtype=np.int32)})
  times = []
  for i in range(steps + 1):
    t0 = time.perf_counter()
    state, m = trainer.train_step(state, batch)
    jax.block_until_ready(m)
    if i:
      times.append(time.perf_counter() - t0)
  return float(np.median(times))


def choose_steps(args, echo=print) -> tuple[int, dict[str, float]]:
  """--steps, or as many steps as fit --budget_minutes for all models together."""
  if args.steps:
    return args.steps, {}
  probe = configs_for(args, steps=10)
  per = {}
  for kind, c in probe.items():
    per[kind] = measure_step_seconds(c)
    echo(f"{kind}: {per[kind] * 1e3:.0f} ms per train step")
  steps = int(args.budget_minutes * 60 / sum(per.values()))
  echo(f"budget {args.budget_minutes} min -> {steps} steps per model")
  return max(steps, 10), per


def evaluate_nll(trainer, params, config, docs, progress: bool = True) -> np.ndarray:
  """Per-position NLL [docs, L] of the validation document prefixes, streamed in chunks."""
  align = perplexity.stream_alignment(config.model)
  chunk = max(align, 128)
  parts = [perplexity.stream_nll(trainer.graphdef, params, docs.tokens[i:i + 8], chunk)
           for i in range(0, docs.tokens.shape[0], 8)]
  return np.concatenate(parts)


def run(args, echo=print) -> dict:
  eval_ctx = perplexity.parse_ctx_list(args.eval_ctx)
  t_start = time.perf_counter()
  steps, probe = choose_steps(args, echo)
  configs = configs_for(args, steps)
  first = next(iter(configs.values()))
  val = Dataset.from_config(first.data).stream("validation")
  docs = perplexity.select_documents(val, max(eval_ctx), args.eval_docs)
  results = {}
  for kind, config in configs.items():
    echo(f"=== {kind}: training {steps} steps")
    t0 = time.perf_counter()
    out = train_and_evaluate(config, os.path.join(args.workdir, kind), echo=echo)
    if out["preempted"]:  # SIGTERM: this model's checkpoint is saved; do not start the next
      raise SystemExit(f"reproduce_e2e: stopped by SIGTERM while training {kind} (its checkpoint "
                       "is saved); run the same command with --resume to continue")
    train_s = time.perf_counter() - t0
    t0 = time.perf_counter()
    nll = evaluate_nll(out["trainer"], out["state"].params, config, docs)
    results[kind] = {
        "params": count_params(out["trainer"].abstract_params),
        "intermediate_size": config.model.intermediate_size,
        "train_loss": out["history"][-1]["loss"] if out["history"] else None,
        "val_loss": out["val"].get("loss"),
        "train_seconds": train_s, "eval_seconds": time.perf_counter() - t0,
        "loss_at_ctx": {str(n): float(nll[:, :n].astype(np.float64).mean()) for n in eval_ctx},
        "per_position": nll.astype(np.float64).mean(axis=0).tolist(),
    }
    echo(f"{kind}: " + ", ".join(f"L={n}: {v:.4f}" for n, v in
                                 results[kind]["loss_at_ctx"].items()))
  report = {
      "args": vars(args), "steps": steps, "probe_step_seconds": probe,
      "train_ctx": first.data.seq_len, "batch_size": first.data.batch_size,
      "tokens_per_model": steps * first.data.batch_size * first.data.seq_len,
      "window": configs.get("swa", first).model.window,
      "e2e_mini_batch": configs["e2e"].model.e2e.mini_batch_size if "e2e" in configs else None,
      "eval_ctx": eval_ctx, "eval_docs": list(docs.names), "results": results,
      "machine": machine_info(), "devices": jax.device_count(),
      "wall_seconds": time.perf_counter() - t_start,
  }
  path = write_reproduction(report, args.out)
  echo(f"wrote {path}")
  return report


def main(argv=None) -> None:
  args = build_parser().parse_args(argv)
  try:
    run(args)
  except ConfigError as e:
    raise SystemExit(f"reproduce_e2e: {e}") from None
