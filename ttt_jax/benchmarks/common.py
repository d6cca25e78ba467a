"""Shared benchmark pieces: sizes, model configs, interleaved timing, FLOPs and memory counts."""

from __future__ import annotations

import dataclasses
import datetime
import os
import platform
import statistics
import time
import warnings
from collections.abc import Callable
from typing import Any

import jax
import ml_collections
import numpy as np

from ttt_jax.benchmarks.hlo_text import census
from ttt_jax.config import build_config, parse_ctx, round_up, validate

TRAIN_KINDS = ("transformer", "swa", "ttt_linear", "ttt_mlp", "e2e-pretrain", "e2e-meta")
STREAM_KINDS = ("transformer", "swa", "ttt_linear", "e2e")
SECTIONS = ("matmul", "train", "ttt_impl", "ttt_memory", "prefill", "decode", "memory")


def tree_rel_err(a, b) -> float:
  """The worst leaf's largest |a - b| over its largest |b| (in float64; NaN if any leaf has one;
  the leaves of `a` and `b` paired in order, so two revisions' trees may name them differently,
  but each pair must have one shape)."""
  def rel(x, y) -> float:
    if np.shape(x) != np.shape(y):
      raise ValueError(f"leaves of shapes {np.shape(x)} and {np.shape(y)} compared")
    return float(np.max(np.abs(np.subtract(x, y, dtype=np.float64)))
                 / max(np.max(np.abs(np.asarray(y, np.float64))), 1e-30))
  return float(np.max([rel(x, y) for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b),
                                                    strict=True)]))


@dataclasses.dataclass(frozen=True)
class Size:
  """Model and run sizes of one benchmark preset."""

  d_model: int
  num_layers: int
  num_heads: int
  intermediate: int
  seq_len: int  # training context
  batch: int  # training batch
  window: int  # SWA / E2E attention window
  ttt_mini_batch: int
  e2e_chunk: int  # E2E inner mini-batch; also the streaming chunk
  lengths: tuple[int, ...]  # prefill/decode context lengths
  matmul_n: int
  repeats: int
  warmup: int
  decode_steps: int
  dtype: str = "float32"
  remat: str = "none"
  ttt_memory_lengths: tuple[int, ...] = (8192, 32768)  # TTT layer fwd+bwd memory, remat on/off

  def describe(self) -> str:
    return (f"d_model={self.d_model}, layers={self.num_layers}, heads={self.num_heads}, "
            f"mlp={self.intermediate}, window={self.window}, TTT mini-batch="
            f"{self.ttt_mini_batch}, E2E mini-batch={self.e2e_chunk}, dtype={self.dtype}, "
            f"remat={self.remat}")


PRESETS = {
    # Toy sizes: every section in seconds (smoke test).
    "quick": Size(32, 1, 2, 96, 64, 1, 32, 16, 32, (64, 128), 128, 2, 1, 2,
                  ttt_memory_lengths=(128, 256)),
    # 2 CPU cores: the whole bench in well under 30 minutes.
    "cpu": Size(256, 4, 4, 768, 1024, 2, 512, 16, 256, (2048, 4096, 8192, 16384), 2048, 5, 1,
                16),
    # One accelerator.
    "gpu": Size(512, 8, 8, 1536, 2048, 8, 1024, 16, 512,
                (2048, 4096, 8192, 16384, 32768, 65536), 8192, 7, 2, 32, "bfloat16", "full"),
}


def default_preset() -> str:
  return "cpu" if jax.default_backend() == "cpu" else "gpu"


def parse_lengths(text: str) -> tuple[int, ...]:
  return tuple(parse_ctx(s) for s in text.split(",") if s.strip())


def machine_info() -> dict[str, Any]:
  """Where the numbers come from: cores, device kind, versions, date."""
  dev = jax.devices()[0]
  cpu = platform.processor() or platform.machine()
  try:
    with open("/proc/cpuinfo") as f:
      names = [ln.split(":", 1)[1].strip() for ln in f if ln.startswith("model name")]
    cpu = names[0] if names else cpu
  except OSError:
    pass
  try:
    cores = len(os.sched_getaffinity(0))
  except AttributeError:
    cores = os.cpu_count() or 0
  return {
      "platform": dev.platform,
      "device_kind": dev.device_kind,
      "device_count": jax.device_count(),
      "cpu": cpu,
      "cores": cores,
      "jax": jax.__version__,
      "python": platform.python_version(),
      "date": datetime.datetime.now(datetime.UTC).strftime("%Y-%m-%d %H:%M UTC"),
  }


def machine_key(info: dict[str, Any]) -> str:
  """Results of different machines are kept side by side under this key."""
  if info["platform"] == "cpu":
    return f"cpu-{info['cores']}cores"
  return f"{info['platform']}-{info['device_kind']}".replace(" ", "_")


def model_config(kind: str, size: Size, seq_len: int | None = None,
                 batch: int | None = None,
                 overrides: dict | None = None) -> ml_collections.ConfigDict:
  """The validated config of benchmark kind `kind` (TRAIN_KINDS or 'e2e') at preset `size`;
  `overrides` {'ttt.impl': 'pallas', ...} set keys of the model section ('train.K': of the
  train section, `apply_overrides`)."""
  seq_len = size.seq_len if seq_len is None else seq_len
  base, mode = kind, "meta"
  if kind.startswith("e2e"):
    base, _, mode = kind.partition("-")
    mode = mode or "meta"
  c = build_config(f"model={base},scale=tiny,ctx={seq_len},mode={mode}")
  m = c.model
  m.num_layers, m.d_model, m.num_heads = size.num_layers, size.d_model, size.num_heads
  m.intermediate_size = size.intermediate
  m.window = min(size.window, seq_len)
  m.compute_dtype = size.dtype
  m.remat = size.remat
  m.ttt.mini_batch_size = size.ttt_mini_batch
  if base == "e2e":
    e = m.e2e
    e.suffix_len = max(1, size.num_layers // 4)
    e.mini_batch_size = min(size.e2e_chunk, seq_len)
    # Same parameter-matching rule as the presets: prime MLPs paid for by narrower MLPs.
    width = round_up(size.intermediate * size.num_layers / (size.num_layers + e.suffix_len), 32)
    m.intermediate_size = e.prime_intermediate_size = width
  c.data.batch_size = size.batch if batch is None else batch
  c.train.warmup_steps = 1
  apply_overrides(c, overrides)
  return validate(c)


def apply_overrides(cfg, overrides: dict | None) -> None:
  """Sets keys of a run config's model section ('remat', 'e2e.suffix_remat', ...), or of its
  train section where a key starts with 'train.' ('train.group_leaves')."""
  for key, value in (overrides or {}).items():
    node = cfg.model
    if key.startswith("train."):
      node, key = cfg.train, key.removeprefix("train.")
    section, _, name = key.rpartition(".")
    (node[section] if section else node)[name] = value


def block(x):
  return jax.block_until_ready(x)


def summarize(times: list[float]) -> dict[str, float]:
  return {"median_s": statistics.median(times), "min_s": min(times), "max_s": max(times),
          "runs": len(times)}


def interleaved(fns: dict[str, Callable[..., Any]], repeats: int, warmup: int, echo=print,
                setups: dict[str, Callable[[], Any]] | None = None) -> dict[str, dict[str, float]]:
  """Times each callable `repeats` times, round-robin after `warmup` rounds.

  Round-robin order spreads machine noise (other processes, thermal state) evenly over the
  compared variants. With `setups`, `fns[name](setups[name]())` is called and only `fns[name]`
  is timed (e.g. a fresh cache is made untimed before each prefill). Returns per name:
  median/min/max seconds and the run count.
  """
  def call(name):
    arg = () if setups is None else (block(setups[name]()),)
    t0 = time.perf_counter()
    block(fns[name](*arg))
    return time.perf_counter() - t0

  for _ in range(warmup):
    for name in fns:
      call(name)
  times: dict[str, list[float]] = {k: [] for k in fns}
  for r in range(repeats):
    for name in fns:
      times[name].append(call(name))
    echo(f"  round {r + 1}/{repeats}: " +
         ", ".join(f"{k} {v[-1] * 1e3:.1f} ms" for k, v in times.items()))
  return {k: summarize(v) for k, v in times.items()}


def memory_stats(compiled) -> dict[str, int]:
  """XLA's compile-time buffer assignment, bytes per device (deterministic): arguments, outputs,
  aliased (donated), temporaries, generated code (0 on XLA:CPU), and `peak_bytes` = arguments +
  outputs - aliased + temporaries, the live-buffer bound of one call of the compiled program."""
  ma = compiled.memory_analysis()
  if ma is None:
    return {}
  arg, out = int(ma.argument_size_in_bytes), int(ma.output_size_in_bytes)
  alias, temp = int(ma.alias_size_in_bytes), int(ma.temp_size_in_bytes)
  return {"argument_bytes": arg, "output_bytes": out, "alias_bytes": alias, "temp_bytes": temp,
          "generated_code_bytes": int(ma.generated_code_size_in_bytes),
          "peak_bytes": arg + out - alias + temp}


def counted_flops(compiled) -> float | None:
  """FLOPs of the matmuls and fused attention one call of the compiled program runs, every loop
  trip counted (`hlo_text.census` of its HLO text; XLA's own count, `xla_flops`, takes a loop
  body once). None, with a warning, where the program's text cannot be read: a count is a
  figure beside the timing and never stops a benchmark."""
  try:
    r = census(compiled.as_text())
  except Exception as e:  # noqa: BLE001
    warnings.warn(f"counted_flops: the compiled program could not be read ({type(e).__name__}: "
                  f"{str(e)[:200]})", stacklevel=2)
    return None
  return float(r["matmul_flops"] + r["attention_flops"])


def xla_flops(compiled) -> float | None:
  """FLOPs XLA counts for one call of the compiled program (includes recomputation)."""
  try:
    ca = compiled.cost_analysis()
  except Exception:  # noqa: BLE001 (not every backend implements it)
    return None
  if isinstance(ca, list | tuple):
    ca = ca[0] if ca else None
  if not ca or "flops" not in ca:
    return None
  return float(ca["flops"])


def fmt_bytes(n: float) -> str:
  for unit in ("B", "KiB", "MiB", "GiB"):
    if abs(n) < 1024 or unit == "GiB":
      return f"{n:.1f} {unit}" if unit != "B" else f"{int(n)} B"
    n /= 1024
  return f"{n:.1f} GiB"


def fmt_len(n: int) -> str:
  return f"{n // 1024}K" if n % 1024 == 0 else str(n)


# -- reading results (tables and figures) --------------------------------------------------------
def error_record(e: BaseException, limit: int = 300) -> dict:
  """A failed case's record: the exception's type and message on one line (`result_status`)."""
  return {"error": f"{type(e).__name__}: {' '.join(str(e).split())[:limit]}"}


def result_status(r: dict) -> str | None:
  """'skipped (why)' / 'error (what)' for a result that has no numbers, else None."""
  if "skipped" in r:
    return f"skipped ({r['skipped']})"
  if "error" in r:
    return f"error ({r['error']})"
  return None


def stream_memory_of(sections: dict) -> dict | None:
  if "memory" in sections and "stream" in sections["memory"]:
    return sections["memory"]["stream"]
  st = sections.get("streaming")
  if not st:
    return None
  return {k: (r if result_status(r) else {n: e["memory"] for n, e in r.items() if "memory" in e})
          for k, r in st["kinds"].items()}


def train_memory_of(sections: dict) -> dict | None:
  if "memory" in sections and "train" in sections["memory"]:
    return sections["memory"]["train"]
  tr = sections.get("train")
  if not tr:
    return None
  return {k: (r if result_status(r) else r["memory"]) for k, r in tr["kinds"].items()}
