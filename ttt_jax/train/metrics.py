"""Metric logging: stdout, `metrics.jsonl`, TensorBoard events in the workdir (process 0 only).

`metrics.jsonl` is strict JSON, one record per line: non-finite values are written as `null`
(Python's json would write bare `NaN`, which strict readers reject). Each record, and its
TensorBoard event (train/events.py), is on disk when `write` returns, appended whole: a killed
run loses nothing it logged and a full disk cuts no line short (diskspace.append_whole). A run
that resumes from step S first drops the records past S that the interrupted run had logged
(and TensorBoard purges its events past S), so every step appears once.

Nothing is deleted for being damaged: lines of metrics.jsonl that are not records (binary
bytes, text that is not JSON, a line cut short) are moved to `metrics.jsonl.damaged.<n>` with
one warning naming the file and the line numbers, and the good records stay; a directory (or
anything else that is not a file) where metrics.jsonl belongs, or a file that cannot be read,
is moved to `metrics.jsonl.<n>`.
"""

from __future__ import annotations

import json
import math
import os
import time
from collections.abc import Callable, Iterable
from typing import Any

import jax
import numpy as np
from jax.experimental import multihost_utils

from ttt_jax.runs.diskspace import append_whole, close_all
from ttt_jax.train.events import EventFile

METRICS_FILE = "metrics.jsonl"


def json_value(v: float) -> float | None:
  return v if math.isfinite(v) else None


def unused_path(path: str) -> str:
  """`path.<n>` for the first n >= 1 that does not exist."""
  n = 1
  while os.path.lexists(f"{path}.{n}"):
    n += 1
  return f"{path}.{n}"


def _record(raw: bytes) -> dict | None:
  """The record of one line, None if it is not one (not UTF-8, not JSON, no integer step)."""
  try:
    rec = json.loads(raw.decode("utf-8"))
  except ValueError:  # UnicodeDecodeError is one
    return None
  return rec if isinstance(rec, dict) and type(rec.get("step")) is int else None


def scan_metrics(path: str) -> tuple[list[dict], list[tuple[int, bytes]]]:
  """(records, damaged lines as (line number, raw bytes)) of a metrics file; blank lines are
  neither."""
  with open(path, "rb") as f:
    lines = f.read().split(b"\n")
  records, damaged = [], []
  for number, raw in enumerate(lines, 1):
    if raw.strip():
      rec = _record(raw)
      records.append(rec) if rec is not None else damaged.append((number, raw))
  return records, damaged


def line_numbers(numbers: list[int], most: int = 8) -> str:
  """'line 4' / 'lines 2, 9-12' (runs of consecutive numbers as ranges; `most` ranges)."""
  runs: list[list[int]] = []
  for n in numbers:
    if runs and n == runs[-1][1] + 1:
      runs[-1][1] = n
    else:
      runs.append([n, n])
  text = ", ".join(f"{a}" if a == b else f"{a}-{b}" for a, b in runs[:most])
  more = sum(b - a + 1 for a, b in runs[most:])
  return (f"line{'s' if len(numbers) > 1 else ''} {text}"
          + (f" and {more} more" if more else ""))


def _write_file(path: str, data: bytes, what: str) -> None:
  """Writes a new file whole (removed again if that fails; DiskFull names `what`)."""
  fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_APPEND, 0o644)
  try:
    append_whole(fd, data, path, what)
  except BaseException:
    os.close(fd)
    os.remove(path)
    raise
  os.close(fd)


def _move_aside(path: str, why: str, echo) -> None:
  dest = unused_path(path)
  os.replace(path, dest)
  echo(f"warning: {path} {why}; moved it to {dest} (this run writes a new {METRICS_FILE})")


def _prepare(path: str, last_step: int, echo) -> tuple[int, list[dict]]:
  """Drops the records of steps > `last_step` from the metrics file (atomically) and moves its
  damaged lines aside; (records dropped, records kept)."""
  if os.path.lexists(path) and not os.path.isfile(path):
    what = "a directory" if os.path.isdir(path) else "not a regular file"
    _move_aside(path, f"is {what}, not a metrics file", echo)
  if not os.path.isfile(path):
    return 0, []
  try:
    records, damaged = scan_metrics(path)
  except OSError as e:
    _move_aside(path, f"could not be read ({e.strerror or type(e).__name__})", echo)
    return 0, []
  kept = [{k: _clean(v) for k, v in r.items()} for r in records if r["step"] <= last_step]
  if damaged:
    dest = unused_path(path + ".damaged")
    _write_file(dest, b"".join(raw + b"\n" for _, raw in damaged), f"the damaged lines {dest}")
    verb = "is" if len(damaged) == 1 else "are"
    echo(f"warning: {path}: {line_numbers([n for n, _ in damaged])} {verb} damaged (not a JSON "
         f"record); kept its {len(records)} good records, moved the damaged lines to {dest}")
  if damaged or len(kept) < len(records):
    tmp = path + ".tmp"
    _write_file(tmp, "".join(json.dumps(r, allow_nan=False) + "\n" for r in kept).encode(),
                f"a rewrite of {path}")
    os.replace(tmp, path)
  return len(records) - len(kept), kept


def truncate_metrics(workdir: str, last_step: int, echo=print) -> int:
  """Drops the records of steps > `last_step` from metrics.jsonl (atomically); returns how many
  were dropped. Damaged lines are moved aside with a warning (see the module docstring)."""
  return _prepare(os.path.join(workdir, METRICS_FILE), last_step, echo)[0]


def _keep_history_of_a_previous_run(workdir: str, echo) -> None:
  """A run starting at step 0 in a workdir whose metrics.jsonl holds records (its checkpoints
  were deleted or moved): the file is moved to metrics.jsonl.<n>, never truncated away."""
  path = os.path.join(workdir, METRICS_FILE)
  if not os.path.isfile(path) or os.path.getsize(path) == 0:
    return
  dest = unused_path(path)
  os.replace(path, dest)
  echo(f"notice: {path} held the records of an earlier run without checkpoints here; kept as "
       f"{dest} (this run starts at step 0)")


def _clean(v: Any) -> Any:
  return json_value(v) if isinstance(v, float) else v


class MetricWriter:
  """`first_step`: the step the run starts from; records past it are dropped first."""

  def __init__(self, workdir: str | None, *, echo=print, first_step: int = 0):
    self.enabled = jax.process_index() == 0 and workdir is not None
    self.echo = echo
    self._fd = None
    self._tb = None
    self._logged: set[tuple[str, int]] = set()  # (split, step) of the records in the file
    if self.enabled:
      os.makedirs(workdir, exist_ok=True)
      self.path = os.path.join(workdir, METRICS_FILE)
      if first_step == 0:
        _keep_history_of_a_previous_run(workdir, echo)
      dropped, kept = _prepare(self.path, first_step, echo)
      if dropped:
        echo(f"metrics.jsonl: dropped {dropped} records past step {first_step} (logged by the "
             "interrupted run; they are logged again)")
      self._logged = {(r.get("split"), r["step"]) for r in kept}
      self._fd = os.open(self.path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)
      try:  # TensorBoard ignores earlier events at steps >= first_step + 1
        self._tb = EventFile(os.path.join(workdir, "tensorboard"), purge_step=first_step + 1)
      except BaseException:
        self.close()
        raise

  def logged(self, step: int, split: str) -> bool:
    """Whether metrics.jsonl holds a `split` record of `step`, as process 0 read it (on several
    processes every one must call this: the answer is broadcast)."""
    found = (split, step) in self._logged
    if jax.process_count() > 1:
      found = bool(multihost_utils.broadcast_one_to_all(np.int32(found)))
    return found

  def write(self, step: int, metrics: dict[str, float], prefix: str = "train") -> None:
    if jax.process_index() != 0:
      return
    scalars = {k: float(v) for k, v in metrics.items()}
    self.echo(f"[{prefix}] step {step}: " + ", ".join(f"{k}={_fmt(v)}" for k, v in scalars.items()))
    if not self.enabled:
      return
    rec = {"step": step, "split": prefix, "time": time.time(),
           **{k: json_value(v) for k, v in scalars.items()}}
    append_whole(self._fd, (json.dumps(rec, allow_nan=False) + "\n").encode(), self.path)
    self._logged.add((prefix, step))
    self._tb.scalars(step, {f"{prefix}/{k}": v for k, v in scalars.items() if math.isfinite(v)})

  def close(self) -> None:
    fd, tb, self._fd, self._tb = self._fd, self._tb, None, None
    close_all(None if fd is None else lambda: os.close(fd),
              None if tb is None else tb.close, failing=False)


class Throughput:
  """Tokens/s between calls, excluding the first (compiling) interval."""

  def __init__(self, tokens_per_step: int):
    self.tokens_per_step = tokens_per_step
    self._t = None
    self._step = None

  def update(self, step: int) -> float | None:
    now = time.perf_counter()
    rate = None
    if self._t is not None and step > self._step:
      rate = (step - self._step) * self.tokens_per_step / (now - self._t)
    self._t, self._step = now, step
    return rate


def _fmt(v: float) -> str:
  return f"{v:.4g}" if not math.isfinite(v) or abs(v) < 1e4 else f"{v:.0f}"


def read_metrics(workdir: str, split: str = "train") -> list[dict]:
  """All records of one split from `metrics.jsonl` (later records for a step win; damaged lines
  are skipped)."""
  path = os.path.join(workdir, METRICS_FILE)
  if not os.path.isfile(path):
    return []
  by_step = {rec["step"]: rec for rec in scan_metrics(path)[0] if rec.get("split") == split}
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
