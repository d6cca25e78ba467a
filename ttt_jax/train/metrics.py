"""Metric logging: stdout, `metrics.jsonl`, TensorBoard events in the workdir (process 0 only)."""

from __future__ import annotations

import json
import os
import time

import jax


class MetricWriter:

  def __init__(self, workdir: str | None, *, echo=print):
    self.enabled = jax.process_index() == 0 and workdir is not None
    self.echo = echo
    self._jsonl = None
    self._tb = None
    if self.enabled:
      os.makedirs(workdir, exist_ok=True)
      self._jsonl = open(os.path.join(workdir, "metrics.jsonl"), "a", buffering=1)  # noqa: SIM115
      from tensorboardX import SummaryWriter  # noqa: PLC0415

      self._tb = SummaryWriter(os.path.join(workdir, "tensorboard"))

  def write(self, step: int, metrics: dict[str, float], prefix: str = "train") -> None:
    if jax.process_index() != 0:
      return
    scalars = {k: float(v) for k, v in metrics.items()}
    self.echo(f"[{prefix}] step {step}: " + ", ".join(f"{k}={_fmt(v)}" for k, v in scalars.items()))
    if not self.enabled:
      return
    self._jsonl.write(json.dumps({"step": step, "split": prefix, "time": time.time(), **scalars})
                      + "\n")
    for k, v in scalars.items():
      self._tb.add_scalar(f"{prefix}/{k}", v, step)

  def close(self) -> None:
    if self._jsonl is not None:
      self._jsonl.close()
    if self._tb is not None:
      self._tb.close()


def _fmt(v: float) -> str:
  return f"{v:.4g}" if abs(v) < 1e4 else f"{v:.0f}"


def read_metrics(workdir: str, split: str = "train") -> list[dict]:
  """All records of one split from `metrics.jsonl` (later records for a step win)."""
  path = os.path.join(workdir, "metrics.jsonl")
  if not os.path.exists(path):
    return []
  by_step = {}
  with open(path) as f:
    for line in f:
      rec = json.loads(line)
      if rec.get("split") == split:
        by_step[rec["step"]] = rec
  return [by_step[s] for s in sorted(by_step)]
