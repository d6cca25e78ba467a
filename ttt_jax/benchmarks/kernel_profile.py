"""Where a compiled step's device time goes: a `jax.profiler` trace of a few calls, read back
(`jax.profiler.ProfileData`) and attributed to the compiled program's own instructions.

Every kernel event of the trace names the HLO instruction that launched it (`hlo_op`). The
compiled HLO text says what that instruction is (`hlo_text.kind`: matmul, cudnn, pallas,
fusion, copy, ...), what it computes (`hlo_text.launch_flops`: matmuls and fused attention;
FLOPs over kernel time give the rate each part reaches) and where it comes from (its `op_name`
metadata): the model's named scopes (`SCOPES`, set with `jax.named_scope` in the model code; the
innermost one counts) and the phase of the outer step (forward, backward, or recomputed under
remat). Times are per call of the program. `busy` is the union of the kernels' intervals
(kernels that overlap count once), so `wall - busy` is time the device waited for the host
(launch gaps). On a GPU the events are those of the device's streams; on a CPU, those of XLA's
thunk threads (thunks of different threads overlap, so there `kernels` exceeds `busy`).

  python -m ttt_jax.benchmarks.kernel_profile --kind e2e-meta --preset cpu
profiles one train kind at a bench preset on this machine and prints the tables.
"""

from __future__ import annotations

import argparse
import collections
import dataclasses
import glob
import json
import os
import shutil
import sys
import tempfile
import time

import jax

from ttt_jax.benchmarks import hlo_text

# instructions whose events hold other instructions' events (not kernels of their own)
CONTAINERS = frozenset({"while", "conditional", "call"})


@dataclasses.dataclass(frozen=True)
class Event:
  module: str  # hlo_module
  op: str  # hlo_op: the instruction's name
  start_ns: float
  dur_ns: float


def instruction_index(text: str) -> tuple[str, dict[str, tuple[str, str, int]]]:
  """(module name, {instruction: (kind, op_name, FLOPs per call of the program)}) of a compiled
  program's HLO text. FLOPs go with the instruction's runs per call (`hlo_text.flops_per_call`),
  not with its trace events: one launch of a library call can show as several kernels."""
  head = text.split("\n", 1)[0]
  module = head.split()[1].rstrip(",") if head.startswith("HloModule") else ""
  comps, _ = hlo_text.computations(text)
  flops = hlo_text.flops_per_call(text)
  index = {name: (hlo_text.kind(op, after), hlo_text.op_name(after), flops.get(name, 0))
           for insts in comps.values() for name, op, after in insts}
  return module, index


def trace_events(profile) -> tuple[list[Event], str]:
  """(the kernel events of a `jax.profiler.ProfileData`, the plane they come from): the first
  GPU's stream lines if the trace has a GPU (its other lines are derived views of the same
  kernels), else the host's events that carry an `hlo_op` (XLA:CPU thunks)."""
  planes = list(profile.planes)
  devices = sorted((p for p in planes if p.name.startswith("/device:GPU")), key=lambda p: p.name)
  used = devices[:1] or [p for p in planes if p.name.startswith("/host:CPU")]
  out = []
  for plane in used:
    lines = list(plane.lines)
    for line in [ln for ln in lines if ln.name.startswith("Stream")] if devices else lines:
      for e in line.events:
        stats = dict(e.stats)
        if "hlo_op" in stats:
          out.append(Event(str(stats.get("hlo_module", "")), str(stats["hlo_op"]),
                           float(e.start_ns), float(e.duration_ns)))
  return out, ", ".join(p.name for p in used)


def busy_ns(events: list[Event]) -> float:
  """Length of the union of the events' intervals."""
  total, end = 0.0, float("-inf")
  for e in sorted(events, key=lambda e: e.start_ns):
    stop = e.start_ns + e.dur_ns
    if stop > end:
      total += stop - max(e.start_ns, end)
      end = stop
  return total


def summarize(events: list[Event], module: str, index: dict[str, tuple[str, str, int]],
              calls: int, wall_s: float | None = None, top: int = 12) -> dict:
  """Per call of `module`: kernel time by kind, scope and phase, the `top` instructions, busy
  time, launches, and (given `wall_s`, the traced calls' wall time) the host gaps; the counted
  FLOPs (`flops`) and the rate they ran at in kernel time (`tflops`, also `tflops_by_phase`
  and per top instruction; `index` as `instruction_index` makes it: FLOPs per call, counted
  once per instruction that has events). Events of other modules (e.g. the host-to-device
  copies of inputs) are left out."""
  mine = [e for e in events if e.module == module]
  # control flow runs its computations' kernels, which have events of their own (on a CPU the
  # while loop's event spans its body's): counted through those
  mine = [e for e in mine if index.get(e.op, ("",))[0] not in CONTAINERS]
  tflops = lambda flops, ns: flops / ns / 1e3 if ns else 0.0  # noqa: E731
  ms = lambda ns: ns / 1e6 / calls  # noqa: E731
  per_op: dict[str, list[float]] = collections.defaultdict(lambda: [0.0, 0])
  for e in mine:
    per_op[e.op][0] += e.dur_ns
    per_op[e.op][1] += 1
  labels = {}  # each instruction classified once: kind, scope, phase
  for op in per_op:
    what, source, _ = index.get(op, ("?", "", 0))
    labels[op] = {"kind": what, "scope": hlo_text.scope_of(source),
                  "phase": hlo_text.phase_of(source)}
  flops = {op: index.get(op, ("?", "", 0))[2] * calls for op in per_op}  # over all calls
  out = {"calls": calls, "launches": len(mine) / calls,
         "kernels_ms": ms(sum(e.dur_ns for e in mine)), "busy_ms": ms(busy_ns(mine)),
         "unmatched_ms": ms(sum(t for op, (t, _) in per_op.items() if op not in index))}
  out["flops"] = sum(flops.values()) / calls
  out["tflops"] = tflops(sum(flops.values()), sum(e.dur_ns for e in mine))
  if wall_s is not None:
    out["wall_ms"] = wall_s * 1e3 / calls
  for key in ("kind", "scope", "phase"):
    counter = collections.Counter()
    for op, (t, _) in per_op.items():
      counter[labels[op][key]] += t
    out[f"by_{key}"] = {k: ms(v) for k, v in counter.most_common()}
  phase_flops = collections.Counter()
  for op, f in flops.items():
    phase_flops[labels[op]["phase"]] += f
  out["tflops_by_phase"] = {k: tflops(phase_flops[k], v * 1e6 * calls)
                            for k, v in out["by_phase"].items() if phase_flops[k]}
  heavy = sorted(per_op.items(), key=lambda kv: -kv[1][0])[:top]
  out["top"] = [{"op": op, **labels[op], "ms": ms(t), "launches": n / calls,
                 "tflops": tflops(flops[op], t)} for op, (t, n) in heavy]
  return out


def profile_calls(fn, text: str, calls: int = 3, keep: str | None = None) -> dict:
  """Traces `calls` calls of `fn` (a compiled program's call; blocked on its result) and
  `summarize`s them against the program's HLO text. `keep`: copy the raw trace (.xplane.pb,
  for TensorBoard / XProf) to this path."""
  module, index = instruction_index(text)
  with tempfile.TemporaryDirectory() as tmp:
    with jax.profiler.trace(tmp):
      t0 = time.perf_counter()
      for _ in range(calls):
        jax.block_until_ready(fn())
      wall = time.perf_counter() - t0
    found = glob.glob(os.path.join(tmp, "**", "*.xplane.pb"), recursive=True)
    if not found:
      raise RuntimeError(f"kernel_profile: jax.profiler wrote no .xplane.pb under {tmp}")
    if keep:
      os.makedirs(os.path.dirname(os.path.abspath(keep)), exist_ok=True)
      shutil.copyfile(found[0], keep)
    events, source = trace_events(jax.profiler.ProfileData.from_file(found[0]))
  out = summarize(events, module, index, calls, wall)
  if not out["launches"]:
    seen = sorted({e.module for e in events})[:5]
    raise RuntimeError(f"kernel_profile: the trace holds no kernel event of {module} (read from "
                       f"{source or 'no CPU or GPU plane'}: programs {seen}; a GPU trace needs "
                       "CUPTI)")
  return {"source": source, **out}


PROFILE_ENV = "TTT_JAX_PROFILE_FILE"  # gpu-check sets it per task: where the raw trace goes


def profile_or_error(fn, text: str, calls: int = 3) -> dict:
  """`profile_calls`, or an error record (a profiler that fails costs the profile only); the raw
  trace is kept at $TTT_JAX_PROFILE_FILE when that is set."""
  from ttt_jax.benchmarks.common import error_record  # noqa: PLC0415

  try:
    return profile_calls(fn, text, calls, keep=os.environ.get(PROFILE_ENV) or None)
  except Exception as e:  # noqa: BLE001
    return error_record(e)


def markdown(name: str, p: dict, rows: int = 8) -> list[str]:
  """A profile summary as markdown lines (headline, then kind / scope / phase shares and the
  heaviest instructions)."""
  total = p["kernels_ms"] or 1.0
  share = lambda d: ", ".join(f"{k} {v:.2f} ms ({100 * v / total:.0f}%)"  # noqa: E731
                              for k, v in list(d.items())[:rows])
  wall = f"wall {p['wall_ms']:.2f} ms, " if "wall_ms" in p else ""
  out = [f"**{name}** ({p.get('source', '?')}): {wall}device busy {p['busy_ms']:.2f} ms, "
         f"kernel time {p['kernels_ms']:.2f} ms in {p['launches']:.0f} launches per call "
         f"({p['calls']} calls traced).", "",
         f"- by kind: {share(p['by_kind'])}", f"- by scope: {share(p['by_scope'])}",
         f"- by phase: {share(p['by_phase'])}"]
  if p.get("flops"):  # profiles read before FLOPs were counted have none
    rates = ", ".join(f"{k} {v:.1f}" for k, v in p["tflops_by_phase"].items())
    out.append(f"- counted {p['flops'] / 1e9:.1f} GFLOP per call (matmuls, fused attention) at "
               f"{p['tflops']:.1f} TFLOP/s of kernel time; by phase: {rates}")
  out += ["", "| instruction | kind | scope | phase | ms per call | launches per call | TFLOP/s |",
          "|---|---|---|---|---|---|---|"]
  rate = lambda r: f"{r['tflops']:.1f}" if r.get("tflops") else ""  # noqa: E731 (none counted)
  out += [f"| {r['op']} | {r['kind']} | {r['scope']} | {r['phase']} | {r['ms']:.3f} | "
          f"{r['launches']:.0f} | {rate(r)} |" for r in p["top"][:rows]]
  return out + [""]


def main(argv=None) -> int:
  from ttt_jax.benchmarks.common import PRESETS  # noqa: PLC0415

  p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  p.add_argument("--kind", default="transformer", help="comma list of gpu-check train kinds "
                 "(gpu_variants.train_kind: e.g. transformer, ttt_linear-dual, e2e-meta+chunkdots)")
  p.add_argument("--preset", default="cpu", choices=sorted(PRESETS))
  p.add_argument("--calls", type=int, default=3)
  p.add_argument("--keep", default=None, help="also write the raw trace (.xplane.pb) here "
                 "(one kind only)")
  p.add_argument("--json", default=None, help="also write the profiles, {kind: profile}, here")
  args = p.parse_args(argv)
  kinds = [k for k in args.kind.split(",") if k]
  if args.keep and len(kinds) > 1:
    p.error("--keep takes one --kind")
  profiles = {}
  for name in kinds:
    profiles[name] = profile_train_kind(name, args.preset, args.calls, args.keep)
    print(*markdown(name, profiles[name]), sep="\n", flush=True)
  if args.json:
    with open(args.json, "w") as f:
      json.dump(profiles, f, indent=1)
  return 0


def profile_train_kind(kind: str, preset: str, calls: int = 3, keep: str | None = None) -> dict:
  """`profile_calls` of one train step of gpu-check's train kind `kind` at bench preset
  `preset`, after one untraced warm-up step."""
  from ttt_jax.benchmarks.gpu_variants import setup_train_kind  # noqa: PLC0415

  compiled, state, batch, _ = setup_train_kind(kind, preset)
  holder = {"state": state}

  def step():
    holder["state"], _ = compiled(holder["state"], batch)
    return holder["state"]

  jax.block_until_ready(step())  # warm-up, untraced
  return profile_calls(step, compiled.as_text(), calls, keep)


if __name__ == "__main__":
  sys.exit(main())
