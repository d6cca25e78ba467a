"""TLM on text: samples from files, adapter files, one adaptation run with its report.

`adapt_workdir` is scripts/adapt.py: a trained run + unlabeled text -> adapter + report.json.
`run_adaptation` is the same on token arrays: it resolves the selection threshold (`log_p0`,
see tlm.resolve_log_p0), adapts, measures perplexities before/after, and warns (report
`warnings`, printed by `report_lines`) when almost no sample was selected.
"""

from __future__ import annotations

import json
import math
import os
import time
from typing import Any

import jax
import ml_collections
import numpy as np
import orbax.checkpoint as ocp
from flax import nnx

from ttt_jax.data.pipeline import WindowSource, build_stream, stack_windows
from ttt_jax.data.tokenizers import ByteTokenizer
from ttt_jax.eval.perplexity import write_json
from ttt_jax.eval.tlm import (
  TLM,
  low_selection_warning,
  perplexity,
  resolve_log_p0,
  validate_config,
)
from ttt_jax.layers.lora import LoRAParam, apply_lora
from ttt_jax.models import build_model
from ttt_jax.runs.load import load_run

ADAPTER_META = "adapter.json"


# -- adapter checkpoints ---------------------------------------------------------------------------
def save_adapter(directory: str, lora, config: ml_collections.ConfigDict,
                 extra: dict | None = None) -> str:
  """Writes the adapter factors (Orbax, `<dir>/params`) and their LoRA config (adapter.json)."""
  directory = os.path.abspath(directory)
  os.makedirs(directory, exist_ok=True)
  params = nnx.to_pure_dict(lora) if isinstance(lora, nnx.State) else lora
  ckpt = ocp.StandardCheckpointer()
  ckpt.save(os.path.join(directory, "params"), params, force=True)
  ckpt.wait_until_finished()
  meta = {"rank": int(config.rank), "alpha": float(config.alpha), "targets": str(config.targets),
          "seed": int(config.seed), **(extra or {})}
  write_json(meta, os.path.join(directory, ADAPTER_META))
  return directory


def load_adapter(directory: str, model: nnx.Module) -> tuple[dict, float]:
  """Adds the saved adapter to `model` in place and loads its factors.

  Returns (adapter pure dict, scale alpha/rank); `layers.lora.merge_lora(base_params, adapter,
  scale)` folds it into plain base parameters instead.
  """
  path = os.path.join(directory, ADAPTER_META)
  if not os.path.exists(path):
    raise FileNotFoundError(f"{path} not found: not an adapter directory (see scripts/adapt.py)")
  with open(path) as f:
    meta = json.load(f)
  targets = tuple(t for t in meta["targets"].split(",") if t)
  apply_lora(model, targets, rank=meta["rank"], alpha=meta["alpha"], seed=meta["seed"])
  lora = nnx.state(model, LoRAParam)
  abstract = jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype), nnx.to_pure_dict(lora))
  params = ocp.StandardCheckpointer().restore(
      os.path.join(os.path.abspath(directory), "params"), abstract)
  nnx.replace_by_pure_dict(lora, params)
  nnx.update(model, lora)
  return params, meta["alpha"] / meta["rank"]


# -- data --------------------------------------------------------------------------------------
def read_texts(path: str) -> list[tuple[str, str]]:
  """(name, text) of a text file, or of every regular file below a folder (sorted by path)."""
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
  """Consecutive samples [S, seq_len + 1] of the stream [BOS] doc [EOS] ..., cut as training
  cuts it (`pipeline.WindowSource`: sample i+1 starts with sample i's last token)."""
  tokens = build_stream(docs, tokenizer).tokens
  if (len(tokens) - 1) // seq_len < 2:
    raise ValueError(f"the text has {len(tokens)} tokens: fewer than two samples of "
                     f"seq_len={seq_len}")
  return stack_windows(WindowSource(tokens, seq_len))


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
                   progress: bool = True, byte_level: bool = True,
                   echo=None) -> tuple[TLM, Any, dict]:
  """Adds adapters to `model`, adapts on `adapt`, and measures perplexities before/after.

  `original`: samples of the model's own (home-domain) validation data: forgetting check and the
  `log_p0=auto` calibration. `byte_level`: whether the tokenizer is bytes (`log_p0=default`).
  Returns (tlm, adapted LoRA state, report dict).
  """
  tlm, lora0 = TLM.create(model, config)
  sets = {"heldout": heldout, "adapt": adapt}
  if original is not None and len(original):
    sets["original"] = original
  before = {k: tlm.evaluate(lora0, v) for k, v in sets.items()}
  tlm.log_p0, rule = resolve_log_p0(config, byte_level, before.get("original"))
  if echo is not None:
    echo(f"selection threshold log P0 = {tlm.log_p0:.4f} (P0 = {math.exp(tlm.log_p0):.3f}): "
         f"{rule}")
  t0 = time.perf_counter()
  if config.mode == "offline":
    lora, log = tlm.adapt_offline(lora0, adapt, progress)
    records = None
  else:
    lora, records = tlm.adapt_online(lora0, adapt, progress)
    sel = [r["selected"] for r in records]
    log = {"steps": len(records), "updates": int(sum(sel)), "samples_seen": len(records),
           "samples_selected": int(sum(sel)),
           "fraction_selected": float(np.mean(sel)) if sel else 0.0,
           "online_ppl": perplexity(np.array([r["log_ppl_before"] for r in records]))}
  jax.block_until_ready(lora)
  seconds = time.perf_counter() - t0
  after = {k: tlm.evaluate(lora, v) for k, v in sets.items()}
  report = {
      "mode": config.mode, "objective": config.objective, "log_p0": tlm.log_p0,
      "log_p0_rule": rule, "config": config.to_dict(), "adapted_modules": tlm.adapted,
      "num_adapt_samples": len(adapt), "num_heldout_samples": len(heldout),
      "num_original_samples": len(sets.get("original", ())), "adapt_seconds": seconds,
      "lora_params": int(sum(x.size for x in jax.tree.leaves(lora))),
      **log,
  }
  for k in sets:
    report[f"{k}_ppl_before"] = perplexity(before[k])
    report[f"{k}_ppl_after"] = perplexity(after[k])
    report[f"{k}_fraction_above_p0"] = float(np.mean(before[k] > tlm.log_p0))
  warning = low_selection_warning(log["samples_selected"], log["samples_seen"], tlm.log_p0,
                                  rule, report["adapt_fraction_above_p0"])
  report["warnings"] = [warning] if warning else []
  if records is not None:
    report["samples"] = records
  return tlm, lora, report


def report_lines(report: dict) -> list[str]:
  """The console summary of a report; its WARNING lines come last."""
  keys = [k for k in report if k.endswith(("_ppl_before", "_ppl_after"))]
  lines = []
  for k in keys + ["objective", "log_p0", "fraction_selected", "updates", "adapt_seconds"]:
    v = report[k]
    lines.append(f"{k:>26}: {v:.4f}" if isinstance(v, float) else f"{k:>26}: {v}")
  return lines + list(report.get("warnings", ()))


def adapt_workdir(workdir: str, data: str, config: ml_collections.ConfigDict,
                  step: int | None = None, echo=print, adapters_dir: str | None = None) -> dict:
  """scripts/adapt.py: base run + text -> adapter in `<adapters_dir>/<name>` (default
  `<workdir>/adapters/<name>`) and a report."""
  validate_config(config)
  run = load_run(workdir, step)
  graphdef, state = nnx.split(nnx.eval_shape(lambda: build_model(run.config.model)))
  nnx.replace_by_pure_dict(state, run.params)
  model = nnx.merge(graphdef, state)
  tokenizer = run.data.tokenizer
  samples = text_samples(read_texts(data), tokenizer, config.seq_len)
  adapt, held = split_heldout(samples, config.heldout_fraction, config.max_samples)
  original = None
  if config.original_samples:  # the run's own validation data, windowed the same way
    original = evenly_spaced(run.data.samples("validation", config.seq_len),
                             config.original_samples)
  echo(f"{workdir} step {run.step} ({run.config.model.kind}): {len(adapt)} adaptation and "
       f"{len(held)} held-out samples of {config.seq_len} tokens from {data}")
  _, lora, report = run_adaptation(model, config, adapt, held, original,
                                   byte_level=isinstance(tokenizer, ByteTokenizer), echo=echo)
  out = os.path.join(adapters_dir or os.path.join(workdir, "adapters"), config.name)
  save_adapter(out, lora, config, {"base_workdir": os.path.abspath(workdir), "base_step": run.step})
  return {"adapter_dir": out, "base_step": run.step, "data": os.path.abspath(data), **report}
