"""Paper-scale compile check: AOT-compile the real train step of a preset on a forced-device mesh.

For every (model kind, scale) the train step that `scripts/train.py` would run is lowered with
abstract inputs (`jax.ShapeDtypeStruct`s carrying the Trainer's shardings; no weight is ever
allocated) and compiled by XLA, without executing it. `compiled.memory_analysis()` then gives
XLA's per-device buffer assignment: argument, output, aliased (donated), temporary and
generated-code bytes.

Each config compiles in its own subprocess with `--xla_force_host_platform_device_count` set,
under a wall-clock budget: a compile that runs over it is stopped and reported as a timeout, and
one that fails is reported with its error, without stopping the others. Results are printed as a
table and written as JSON.

With `--target cpu` (the default) the devices are forced host CPU devices and the numbers are
XLA:CPU's buffer assignment for the partitioned per-device program; XLA:CPU neither
rematerializes nor schedules for memory as a GPU or TPU compiler does (docs/scaling.md), so treat
them as the size of the program's working set. With `--target h200` XLA:GPU compiles the same
step for `--devices` H200s in one host of a deviceless topology (JAX's CUDA plugin, as `make
gpu-census` installs it; no GPU or driver needed): its buffer assignment is the one a node of
H200s would run with, after XLA:GPU's own rematerialization and scheduling.
"""

from __future__ import annotations

import contextlib
import json
import math
import os
import subprocess
import sys
import time
import traceback

import jax
import jax.numpy as jnp
import ml_collections
from absl import flags

from ttt_jax.argtypes import check_flags, non_negative_int, positive_float, positive_int
from ttt_jax.benchmarks import lowering
from ttt_jax.benchmarks.common import memory_stats
from ttt_jax.benchmarks.gpu_census import gpu_devices
from ttt_jax.benchmarks.presets import load_preset, preset_spec
from ttt_jax.config import MODEL_KINDS, SCALES, ConfigError, parse_ctx
from ttt_jax.eval.perplexity import write_json
from ttt_jax.models import count_params
from ttt_jax.sharding import make_mesh
from ttt_jax.train.trainer import Trainer, TrainState

# unoptimized CPU code generation: the program and its buffer assignment are the same, only the
# machine code is slower (and smaller); for quick checks of tiny configs
FAST_COMPILE = "--xla_backend_optimization_level=0 --xla_llvm_disable_expensive_passes=true"

FLAGS = flags.FLAGS
flags.DEFINE_list("kinds", list(MODEL_KINDS), "Model kinds to compile.")
flags.DEFINE_list("scales", ["125m"], f"Scales ({', '.join(SCALES)}).")
flags.DEFINE_string("ctx", "8k", "Training context of the configs/pretrain.py presets (the e2e "
                    "preset fixes its own: configs/e2e.py stage=pretrain, 8K (tiny 512); 32k "
                    "and 128k pick its stages ext32k and ext128k, 32K and 128K (tiny 2K and "
                    "8K)).")
# --target -> what the devices are (the table's and the JSON's description)
TARGETS = {"cpu": "forced host CPU devices (XLA:CPU)",
           "h200": "H200s in one host, deviceless (XLA:GPU)"}
flags.DEFINE_enum("target", "cpu", list(TARGETS), "Compile for forced host CPU devices (cpu) or "
                  "for H200s without a GPU (h200; needs JAX's CUDA plugin).")
flags.DEFINE_integer("devices", 8, "Devices of the mesh (forced host CPUs or H200s).")
flags.DEFINE_string("mesh", "1,-1,1", "Mesh sizes data,fsdp,tensor (-1 = the remaining devices).")
flags.DEFINE_integer("batch_size", 0, "Global batch in sequences (0 = the preset's).")
flags.DEFINE_list("set", [], "Config overrides key=value applied to every preset, e.g. "
                  "model.remat=dots,data.tokenizer=sp:/path/tokenizer.model")
flags.DEFINE_float("timeout", 300.0, "Wall-clock budget of one config, seconds.")
flags.DEFINE_float("total_budget", 1500.0, "Configs not started within this many seconds "
                   "are skipped.")
flags.DEFINE_bool("fast_compile", False, "Unoptimized CPU code generation (" + FAST_COMPILE
                  + "); --target cpu only.")
flags.DEFINE_string("json", "runs/compile_check.json", "Where to write the results ('' = no).")


# -- one config (runs in the child process) -----------------------------------------------------
def abstract_inputs(trainer: Trainer, batch_size: int, seq_len: int):
  """(TrainState, batch) of ShapeDtypeStructs with the Trainer's shardings: nothing allocated."""
  opt = jax.eval_shape(trainer.optimizer.init, trainer.abstract_params)
  state = TrainState(step=jax.ShapeDtypeStruct((), jnp.int32), params=trainer.abstract_params,
                     opt_state=opt)
  state = jax.tree.map(lambda x, s: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=s),
                       state, trainer.state_shardings)
  tokens = jax.ShapeDtypeStruct((batch_size, seq_len + 1), jnp.int32,
                                sharding=trainer.batch_sharding)
  return state, {"tokens": tokens}


def bytes_per_device(tree) -> int:
  """Bytes one device holds of a tree of ShapeDtypeStructs, as laid out by their shardings."""
  return sum(math.prod(x.sharding.shard_shape(x.shape)) * x.dtype.itemsize
             for x in jax.tree.leaves(tree))


def apply_overrides(cfg: ml_collections.ConfigDict, items) -> None:
  """`key=value` strings (dotted keys of existing fields) parsed as the field's type."""
  for item in items:
    key, sep, text = item.partition("=")
    node, *path = cfg, *key.strip().split(".")
    for part in path[:-1]:
      node = node.get(part) if isinstance(node, ml_collections.ConfigDict) else None
    if not sep or not isinstance(node, ml_collections.ConfigDict) or path[-1] not in node:
      raise ConfigError(f"--set {item!r}: expected key=value with an existing dotted key, "
                        "e.g. model.remat=dots")
    old, text = node[path[-1]], text.strip()
    if isinstance(old, bool):
      if text.lower() not in ("1", "0", "true", "false"):
        raise ConfigError(f"--set {item!r}: {key} takes true or false")
      value = text.lower() in ("1", "true")
    elif isinstance(old, int | float):
      try:
        value = type(old)(text)
      except ValueError:
        raise ConfigError(f"--set {item!r}: {key} takes a {type(old).__name__}") from None
    else:
      value = text
    node[path[-1]] = value


def lower_for(target: str, cfg, devices: int):
  """(trainer, abstract state, abstract batch, lowered train step) of `cfg` on `devices` devices
  of `target` (`TARGETS`): the visible (forced CPU) devices, or H200s built for and lowered for
  CUDA."""
  gpu = target == "h200"
  with lowering.for_gpu() if gpu else contextlib.nullcontext():
    trainer = Trainer.create(cfg, make_mesh(cfg.mesh, gpu_devices(devices)) if gpu else None)
    state, batch = abstract_inputs(trainer, cfg.data.batch_size, cfg.data.seq_len)
    lowered = trainer.train_step.trace(state, batch).lower(
        lowering_platforms=("cuda",) if gpu else None)
    return trainer, state, batch, lowered


def compile_one(kind: str, scale: str, ctx: str, mesh: tuple[int, int, int],
                batch_size: int = 0, overrides=(), target: str = "cpu",
                devices: int | None = None) -> dict:
  """Lowers and compiles the train step of one preset on all visible devices (`target` cpu) or
  on `devices` H200s (`target` h200)."""
  spec = preset_spec(kind, scale, ctx)
  cfg = load_preset(spec)
  apply_overrides(cfg, overrides)
  cfg.mesh.data, cfg.mesh.fsdp, cfg.mesh.tensor = mesh
  if batch_size:
    cfg.data.batch_size = batch_size
  t0 = time.perf_counter()
  trainer, state, batch, lowered = lower_for(target, cfg, devices or jax.device_count())
  t1 = time.perf_counter()
  compiled = lowered.compile()
  t2 = time.perf_counter()
  batch_devices = math.prod(trainer.mesh.shape[a] for a in ("data", "fsdp"))
  return {
      "kind": kind, "scale": scale, "config": spec, "seq_len": cfg.data.seq_len,
      "batch_size": cfg.data.batch_size,
      "per_device_batch": cfg.data.batch_size / batch_devices,
      "mesh": dict(trainer.mesh.shape), "devices": trainer.mesh.size, "target": target,
      "params": count_params(trainer.abstract_params),
      "compute_dtype": cfg.model.compute_dtype, "remat": cfg.model.remat,
      "state_bytes": bytes_per_device(state), "state_arrays": len(jax.tree.leaves(state)),
      "batch_bytes": bytes_per_device(batch),
      "lower_s": t1 - t0, "compile_s": t2 - t1, "memory": memory_stats(compiled),
  }


def child_main(request: str) -> None:
  """Child process: compile the config described by the JSON `request`, print one JSON line."""
  r = json.loads(request)
  try:
    out = compile_one(r["kind"], r["scale"], r["ctx"], tuple(r["mesh"]), r["batch_size"],
                      r["overrides"], r["target"], r["devices"])
    out["status"] = "ok"
  except ConfigError as e:
    out = {"status": "error", "error": f"config error: {e}"}
  except Exception as e:  # reported in the table; the other configs still run
    out = {"status": "error", "error": f"{type(e).__name__}: {str(e).splitlines()[0][:300]}",
           "traceback": traceback.format_exc()[-3000:]}
  sys.stdout.write("RESULT " + json.dumps(out) + "\n")
  sys.stdout.flush()


# -- the parent: one subprocess per config, a table, a JSON file ---------------------------------
def child_env(devices: int, fast_compile: bool, target: str = "cpu") -> dict[str, str]:
  xla = [f for f in os.environ.get("XLA_FLAGS", "").split()
         if not f.startswith("--xla_force_host_platform_device_count")]
  if target == "cpu":
    xla.append(f"--xla_force_host_platform_device_count={devices}")
    if fast_compile:
      xla.append(FAST_COMPILE)
  return dict(os.environ, JAX_PLATFORMS="cpu", TF_CPP_MIN_LOG_LEVEL="2", XLA_FLAGS=" ".join(xla))


def run_config(kind: str, scale: str, ctx: str, mesh: tuple[int, int, int], *, devices: int,
               batch_size: int, overrides, timeout: float, fast_compile: bool,
               target: str = "cpu") -> dict:
  """Compiles one config in a subprocess under `timeout` seconds of wall clock."""
  request = json.dumps({"kind": kind, "scale": scale, "ctx": ctx, "mesh": list(mesh),
                        "batch_size": batch_size, "overrides": list(overrides),
                        "target": target, "devices": devices})
  cmd = [sys.executable, "-c", "import sys; from ttt_jax.benchmarks.compile_check import "
         "child_main; child_main(sys.argv[1])", request]
  base = {"kind": kind, "scale": scale, "config": preset_spec(kind, scale, ctx)}
  t0 = time.perf_counter()
  proc = subprocess.Popen(cmd, env=child_env(devices, fast_compile, target),
                          stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
  try:
    stdout, stderr = proc.communicate(timeout=timeout)
  except subprocess.TimeoutExpired:
    proc.kill()
    proc.communicate()
    return dict(base, status="timeout", error=f"not compiled within {timeout:.0f} s",
                wall_s=time.perf_counter() - t0)
  wall = time.perf_counter() - t0
  for line in stdout.splitlines():
    if line.startswith("RESULT "):
      return dict(base, **json.loads(line[len("RESULT "):]), wall_s=wall)
  tail = stderr.strip().splitlines()[-1:] or [f"exit code {proc.returncode}"]
  return dict(base, status="error", error=f"no result ({tail[0][:300]})", wall_s=wall)


def parse_mesh(text: str) -> tuple[int, int, int]:
  parts = [s.strip() for s in text.split(",")]
  try:
    sizes = tuple(int(s) for s in parts)
  except ValueError:
    sizes = ()
  if len(sizes) != 3:
    raise ConfigError(f"--mesh={text!r}: expected data,fsdp,tensor sizes, e.g. 1,-1,1")
  return sizes


def check(kinds, scales, ctx: str = "8k", mesh=(1, -1, 1), *, devices: int = 8,
          batch_size: int = 0, overrides=(), timeout: float = 300.0,
          total_budget: float = 1500.0, fast_compile: bool = False, target: str = "cpu",
          echo=print) -> dict:
  """Compiles every (scale, kind), one at a time. Returns {"config": ..., "results": [...]}."""
  for kind in kinds:
    if kind not in MODEL_KINDS:
      raise ConfigError(f"--kinds: {kind!r} unknown; allowed: {', '.join(MODEL_KINDS)}")
  for scale in scales:
    if scale not in SCALES:
      raise ConfigError(f"--scales: {scale!r} unknown; allowed: {', '.join(SCALES)}")
  parse_ctx(ctx)
  if target == "h200" and fast_compile:
    raise ConfigError("--fast_compile is for --target cpu (XLA:CPU's code generation)")
  if target == "h200":
    try:
      gpu_devices(1)  # the CUDA plugin's deviceless topology, as each child builds it
    except ImportError as e:
      raise ConfigError(f"--target h200: {e}") from None
  apply_overrides(load_preset(preset_spec(kinds[0], scales[0], ctx)), overrides)  # fail early
  results, start = [], time.perf_counter()
  for scale in scales:
    for kind in kinds:
      if time.perf_counter() - start > total_budget:
        results.append({"kind": kind, "scale": scale, "config": preset_spec(kind, scale, ctx),
                        "status": "skipped",
                        "error": f"total budget of {total_budget:.0f} s spent"})
        echo(f"{scale} {kind}: skipped (total budget spent)")
        continue
      echo(f"{scale} {kind}: compiling {preset_spec(kind, scale, ctx)} ...")
      r = run_config(kind, scale, ctx, mesh, devices=devices, batch_size=batch_size,
                     overrides=overrides, timeout=timeout, fast_compile=fast_compile,
                     target=target)
      results.append(r)
      if r["status"] == "ok":
        echo(f"  compiled in {r['compile_s']:.1f} s (lowering {r['lower_s']:.1f} s), peak "
             f"{r['memory'].get('peak_bytes', 0) / 2**30:.3f} GiB per device")
      else:
        echo(f"  {r['status']}: {r['error']}")
  return {"config": {"kinds": list(kinds), "scales": list(scales), "ctx": ctx,
                     "mesh": list(mesh), "devices": devices, "batch_size": batch_size,
                     "overrides": list(overrides),
                     "timeout_s": timeout, "fast_compile": fast_compile,
                     "target": target, "backend": TARGETS[target], "jax": jax.__version__},
          "total_s": time.perf_counter() - start, "results": results}


def unit_of(report: dict) -> tuple[str, int]:
  """GiB, or MiB when every peak is under 1 GiB."""
  peaks = [r["memory"].get("peak_bytes", 0) for r in report["results"] if r["status"] == "ok"]
  return ("MiB", 2**20) if peaks and max(peaks) < 2**30 else ("GiB", 2**30)


def table(report: dict) -> str:
  """Markdown table: per-device memory and compile time of every config."""
  unit, size = unit_of(report)
  fmt = lambda n: f"{n / size:.3f}" if n < size else f"{n / size:.2f}"
  head = (f"| scale | kind | ctx | batch (per device) | params | arguments {unit} "
          f"| outputs | aliased | temporaries | code | peak {unit} | lower s | compile s |")
  lines = [head, "|" + "---|" * 13]
  for r in report["results"]:
    if r["status"] != "ok":
      lines.append(f"| {r['scale']} | {r['kind']} | | | | {r['status']}: {r['error']} "
                   "| | | | | | | |")
      continue
    m = r["memory"]
    per = r["per_device_batch"]
    per = int(per) if float(per).is_integer() else per
    lines.append(
        f"| {r['scale']} | {r['kind']} | {r['seq_len']} | {r['batch_size']} ({per}) "
        f"| {r['params'] / 1e6:.0f}M | {fmt(m['argument_bytes'])} | {fmt(m['output_bytes'])} "
        f"| {fmt(m['alias_bytes'])} | {fmt(m['temp_bytes'])} "
        f"| {fmt(m['generated_code_bytes'])} | {fmt(m['peak_bytes'])} "
        f"| {r['lower_s']:.1f} | {r['compile_s']:.1f} |")
  return "\n".join(lines)


def main(argv) -> None:
  """scripts/compile_check.py (absl flags above)."""
  if len(argv) > 1:
    raise SystemExit(f"unexpected arguments: {' '.join(argv[1:])}")
  check_flags({"--devices": (FLAGS.devices, positive_int),  # ConfigError: one line
               "--batch_size": (FLAGS.batch_size, non_negative_int),
               "--timeout": (FLAGS.timeout, positive_float),
               "--total_budget": (FLAGS.total_budget, positive_float)})
  try:
    report = check(FLAGS.kinds, FLAGS.scales, FLAGS.ctx, parse_mesh(FLAGS.mesh),
                   devices=FLAGS.devices, batch_size=FLAGS.batch_size, overrides=FLAGS.set,
                   timeout=FLAGS.timeout,
                   total_budget=FLAGS.total_budget, fast_compile=FLAGS.fast_compile,
                   target=FLAGS.target)
  except ConfigError as e:
    raise SystemExit(f"config error: {e}") from None
  print()
  print(f"per-device memory ({unit_of(report)[0]}) of the compiled train step, {FLAGS.devices} "
        f"{TARGETS[FLAGS.target]}, mesh data,fsdp,tensor = {FLAGS.mesh}; "
        f"{report['total_s']:.0f} s in all")
  print(table(report))
  if FLAGS.json:
    write_json(report, FLAGS.json)
    print(f"wrote {FLAGS.json}")
  if any(r["status"] != "ok" for r in report["results"]):
    print("not compiled: " + ", ".join(f"{r['scale']} {r['kind']} ({r['status']})"
                                       for r in report["results"] if r["status"] != "ok"))
