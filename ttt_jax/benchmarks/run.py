"""`scripts/bench.py` / `make bench`: run the selected sections, merge into the JSON, report."""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import time

from ttt_jax.argtypes import non_negative_int, positive_int
from ttt_jax.benchmarks import common, streaming, training
from ttt_jax.benchmarks.report import write_report
from ttt_jax.config import ConfigError, parse_ctx


def build_parser() -> argparse.ArgumentParser:
  p = argparse.ArgumentParser(description="Speed and memory benchmarks; writes "
                              "<out_dir>/benchmarks.md, benchmarks.json and benchmarks_*.png.")
  p.add_argument("--preset", choices=sorted(common.PRESETS), default=None,
                 help="sizes (default: cpu on a CPU backend, gpu otherwise)")
  p.add_argument("--quick", action="store_true", help="toy sizes (= --preset quick), for tests")
  p.add_argument("--sections", default=",".join(common.SECTIONS),
                 help=f"comma list of: {', '.join(common.SECTIONS)}")
  p.add_argument("--kinds", default=",".join(common.TRAIN_KINDS),
                 help="train-step kinds (memory section too)")
  p.add_argument("--stream_kinds", default=",".join(common.STREAM_KINDS),
                 help="prefill/decode kinds")
  p.add_argument("--ttt_layers", default="ttt_linear,ttt_mlp", help="dual vs primal layers")
  p.add_argument("--lengths", default="", help="prefill/decode context lengths, e.g. 2k,4k,8k")
  p.add_argument("--max_ctx", default="",
                 help="longest prefill/decode context: the preset's shortest length doubled up "
                      "to this (e.g. 64k); ignored with --lengths")
  p.add_argument("--repeats", type=positive_int, default=None,
                 help="timed rounds (default: preset)")
  p.add_argument("--warmup", type=non_negative_int, default=None,
                 help="warm-up rounds (default: preset)")
  p.add_argument("--out_dir", default="", help="default: docs (runs/bench_quick with --quick)")
  p.add_argument("--merge", action="store_true",
                 help="keep this machine's earlier results of the sections not run now (their "
                      "dates stay in the JSON's section_dates); default: replace them all")
  return p


def _choose(text: str, allowed, flag: str) -> list[str]:
  items = [s.strip() for s in text.split(",") if s.strip()]
  for s in items:
    if s not in allowed:
      raise ConfigError(f"{flag} {s!r} unknown; allowed: {', '.join(allowed)}")
  return items


def resolve(args) -> tuple[str, common.Size, list[str]]:
  preset = "quick" if args.quick else (args.preset or common.default_preset())
  size = common.PRESETS[preset]
  sections = _choose(args.sections, common.SECTIONS, "--sections")
  if args.lengths:
    lengths = common.parse_lengths(args.lengths)
  elif args.max_ctx:
    top, n, lengths = parse_ctx(args.max_ctx), min(size.lengths), []
    while n <= top:
      lengths.append(n)
      n *= 2
  else:
    lengths = size.lengths
  bad = [n for n in lengths if n % size.e2e_chunk or n <= 0]
  if bad or not lengths:
    raise ConfigError(f"--lengths/--max_ctx: context lengths must be positive multiples of the "
                      f"streaming chunk {size.e2e_chunk}; got {list(lengths)}")
  updates = {"lengths": tuple(lengths)}
  if args.repeats is not None:
    updates["repeats"] = args.repeats
  if args.warmup is not None:
    updates["warmup"] = args.warmup
  return preset, dataclasses.replace(size, **updates), sections


def run(args, echo=print) -> dict:
  """Runs the benchmark; returns the merged results (also written to <out_dir>)."""
  preset, size, sections = resolve(args)
  kinds = _choose(args.kinds, common.TRAIN_KINDS, "--kinds")
  stream_kinds = _choose(args.stream_kinds, common.STREAM_KINDS, "--stream_kinds")
  ttt_layers = _choose(args.ttt_layers, ("ttt_linear", "ttt_mlp"), "--ttt_layers")
  out_dir = args.out_dir or ("runs/bench_quick" if preset == "quick" else "docs")
  if os.path.exists(out_dir) and not os.path.isdir(out_dir):
    raise ConfigError(f"--out_dir {out_dir}: a file is there, not a folder; choose a folder")
  try:
    os.makedirs(out_dir, exist_ok=True)
  except OSError as e:
    raise ConfigError(f"--out_dir {out_dir}: cannot make the folder ({e.strerror})") from None
  info = common.machine_info()
  key = common.machine_key(info)
  echo(f"benchmark on {key} ({info['cpu']}, device {info['device_kind']}), preset {preset}: "
       f"{size.describe()}")
  t_start = time.perf_counter()
  out: dict = {}
  ceiling = None
  if "matmul" in sections or "train" in sections:
    ceiling = out["matmul"] = training.bench_matmul(size, echo)
  if "train" in sections:
    out["train"] = training.bench_train(size, kinds, ceiling, echo)
    out["train"]["context"], out["train"]["batch"] = size.seq_len, size.batch
  if "ttt_impl" in sections:
    out["ttt_impl"] = training.bench_ttt_impl(size, ttt_layers, echo)
  if "ttt_memory" in sections:
    out["ttt_memory"] = training.ttt_memory(size, ttt_layers, echo)
  phases = [p for p in ("prefill", "decode") if p in sections]
  if phases:
    out["streaming"] = streaming.bench_streaming(
        size, stream_kinds, size.lengths, prefill="prefill" in phases,
        decode="decode" in phases, echo=echo)
  if "memory" in sections:
    mem = {}
    if "train" not in out:
      mem["train"] = training.train_memory(size, kinds, echo)
    if "streaming" not in out:
      mem["stream"] = streaming.stream_memory(size, stream_kinds, size.lengths, echo)
    out["memory"] = mem
  config = (f"{size.describe()}; training context {size.seq_len} x batch {size.batch}; "
            f"medians of {size.repeats} runs after {size.warmup} warm-up round(s)")
  entry = {"machine": info, "preset": preset, "size": dataclasses.asdict(size),
           "config": config, "phases": phases, "sections": out,
           "wall_s": time.perf_counter() - t_start}
  json_path = os.path.join(out_dir, "benchmarks.json")
  results = {"machines": {}}
  if os.path.exists(json_path):
    with open(json_path) as f:
      results = json.load(f)
  previous = results.setdefault("machines", {}).get(key)
  entry["section_dates"] = {name: info["date"] for name in out}
  if args.merge and previous and previous.get("preset") == preset:
    kept = {k: v for k, v in previous["sections"].items() if k not in out}
    entry["sections"] = {**kept, **out}
    old_dates = previous.get("section_dates") or dict.fromkeys(previous["sections"],
                                                               previous["machine"]["date"])
    entry["section_dates"] = {**{k: old_dates.get(k) for k in kept}, **entry["section_dates"]}
  results["machines"][key] = entry
  with open(json_path, "w") as f:
    json.dump(results, f, indent=1, sort_keys=False)
  md = write_report(results, out_dir)
  echo(f"wrote {json_path} and {md} in {entry['wall_s']:.0f} s")
  echo(headline(entry))
  return results


def headline(entry: dict) -> str:
  """One paragraph of the ratios the benchmark exists to show."""
  sec, parts = entry["sections"], []
  tr = sec.get("train", {})
  t = tr.get("kinds", {}).get("transformer", {})
  if "mfu" in t:
    parts.append(f"transformer train step MFU {100 * t['mfu']:.1f}%")
  if "e2e_meta_over_pretrain" in tr.get("ratios", {}):
    parts.append(f"E2E meta / pretrain step {tr['ratios']['e2e_meta_over_pretrain']:.2f}x")
  for k, v in sec.get("ttt_impl", {}).get("ratios", {}).items():
    parts.append(f"{k.replace('_primal_over_dual', '')} primal/dual {v:.2f}x")
  for phase, per in sec.get("streaming", {}).get("ratios", {}).items():
    e2e = per.get("e2e", {})
    if e2e:
      parts.append(f"E2E {phase} per-token latency longest/shortest "
                   f"{e2e['longest_over_shortest']:.2f}x")
      sp = e2e.get("speedup_over_full_attention_at_longest")
      if sp:
        parts.append(f"E2E {phase} speedup over full attention at the longest context {sp:.2f}x")
  return "headline: " + ("; ".join(parts) if parts else "(no ratios available)")


def main(argv=None) -> None:
  args = build_parser().parse_args(argv)
  try:
    run(args)
  except ConfigError as e:
    raise SystemExit(f"bench: {e}") from None
