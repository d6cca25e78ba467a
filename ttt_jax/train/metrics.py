"""Metric logging: stdout, `metrics.jsonl`, TensorBoard events in the workdir (process 0 only).

`metrics.jsonl` is strict JSON, one record per line: non-finite values are written as `null`
(Python's json would write bare `NaN`, which strict readers reject). A run that resumes from
step S first drops the records past S that the interrupted run had logged (and TensorBoard
purges its events past S), so every step appears once.
"""

from __future__ import annotations

import json
import math
import os
import time
from collections.abc import Callable, Iterable
from typing import Any

import jax
from tensorboardX import SummaryWriter

METRICS_FILE = "metrics.jsonl"


def json_value(v: float) -> float | None:
  return v if math.isfinite(v) else None


def truncate_metrics(workdir: str, last_step: int) -> int:
  """Drops the records of steps > `last_step` from metrics.jsonl (atomically). Returns how many
  were dropped. Lines that are not valid JSON (a write cut short by a kill) are dropped too."""
  path = os.path.join(workdir, METRICS_FILE)
  if not os.path.exists(path):
    return 0
  kept, dropped = [], 0
  with open(path) as f:
    for line in f:
      try:
        rec = json.loads(line)
      except json.JSONDecodeError:
        dropped += 1
        continue
      if int(rec.get("step", 0)) <= last_step:
        kept.append(json.dumps({k: _clean(v) for k, v in rec.items()}, allow_nan=False))
      else:
        dropped += 1
  if dropped:
    tmp = path + ".tmp"
    with open(tmp, "w") as f:
      f.writelines(line + "\n" for line in kept)
    os.replace(tmp, path)
  return dropped


def _keep_history_of_a_previous_run(workdir: str, echo) -> None:
  """A run starting at step 0 in a workdir whose metrics.jsonl holds records (its checkpoints
  were deleted or moved): the file is moved to metrics.jsonl.<n>, never truncated away."""
  path = os.path.join(workdir, METRICS_FILE)
  if not os.path.isfile(path) or os.path.getsize(path) == 0:
    return
  n = 1
  while os.path.exists(f"{path}.{n}"):
    n += 1
  os.replace(path, f"{path}.{n}")
  echo(f"notice: {path} held the records of an earlier run without checkpoints here; kept as "
       f"{path}.{n} (this run starts at step 0)")


def _clean(v: Any) -> Any:
  return json_value(v) if isinstance(v, float) else v


class MetricWriter:
  """`first_step`: the step the run starts from; records past it are dropped first."""

  def __init__(self, workdir: str | None, *, echo=print, first_step: int = 0):
    self.enabled = jax.process_index() == 0 and workdir is not None
    self.echo = echo
    self._jsonl = None
    self._tb = None
    if self.enabled:
      os.makedirs(workdir, exist_ok=True)
      if first_step == 0:
        _keep_history_of_a_previous_run(workdir, echo)
      dropped = truncate_metrics(workdir, first_step)
      if dropped:
        echo(f"metrics.jsonl: dropped {dropped} records past step {first_step} (logged by the "
             "interrupted run; they are logged again)")
      self._jsonl = open(os.path.join(workdir, METRICS_FILE), "a", buffering=1)  # noqa: SIM115
      # purge_step: TensorBoard ignores earlier events at steps >= first_step + 1
      self._tb = SummaryWriter(os.path.join(workdir, "tensorboard"), purge_step=first_step + 1)

  def write(self, step: int, metrics: dict[str, float], prefix: str = "train") -> None:
    if jax.process_index() != 0:
      return
    scalars = {k: float(v) for k, v in metrics.items()}
    self.echo(f"[{prefix}] step {step}: " + ", ".join(f"{k}={_fmt(v)}" for k, v in scalars.items()))
    if not self.enabled:
      return
    rec = {"step": step, "split": prefix, "time": time.time(),
           **{k: json_value(v) for k, v in scalars.items()}}
    self._jsonl.write(json.dumps(rec, allow_nan=False) + "\n")
    for k, v in scalars.items():
      if math.isfinite(v):
        self._tb.add_scalar(f"{prefix}/{k}", v, step)

  def close(self) -> None:
    if self._jsonl is not None:
      self._jsonl.close()
    if self._tb is not None:
      self._tb.close()


def _fmt(v: float) -> str:
  return f"{v:.4g}" if not math.isfinite(v) or abs(v) < 1e4 else f"{v:.0f}"


def read_metrics(workdir: str, split: str = "train") -> list[dict]:
  """All records of one split from `metrics.jsonl` (later records for a step win)."""
  path = os.path.join(workdir, METRICS_FILE)
  if not os.path.exists(path):
    return []
  by_step = {}
  with open(path) as f:
    for line in f:
      rec = json.loads(line)
      if rec.get("split") == split:
        by_step[rec["step"]] = rec
  return [by_step[s] for s in sorted(by_step)]


def validation_metrics(eval_fn: Callable[[Any], dict], batches: Iterable) -> dict[str, float]:
  """Mean of `eval_fn(batch)` metrics over equally sized batches, plus `ppl = exp(loss)`."""
  totals: dict[str, float] = {}
  n = 0
  for batch in batches:
    for k, v in eval_fn(batch).items():
      totals[k] = totals.get(k, 0.0) + float(v)
    n += 1
  out = {k: v / max(n, 1) for k, v in totals.items()}
  if "loss" in out:
    out["ppl"] = math.exp(min(out["loss"], 700.0))
  return out
