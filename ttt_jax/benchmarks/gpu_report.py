"""The markdown summary of `make gpu-check` (ttt_jax/benchmarks/gpu_check.py)."""

from __future__ import annotations

from ttt_jax.benchmarks.common import fmt_len
from ttt_jax.benchmarks.common import result_status as _status
from ttt_jax.benchmarks.kernel_profile import markdown as profile_markdown


def _ms(s: float) -> str:
  return f"{s * 1e3:.2f} ms"


def _correctness(results: dict) -> list[str]:
  out = ["## Correctness of the GPU-only paths", ""]
  att = results.get("attention", {})
  if _status(att):
    out += [f"attention: {_status(att)}", ""]
  elif att:
    out += ["Attention fwd+bwd at [1, 8192, 8 heads x 64], bf16 inputs, vs the package's "
            "blockwise attention in fp32 (highest precision):", "",
            "| window | impl | value rel. err | grad rel. err | fwd+bwd |", "|---|---|---|---|---|"]
    for window, row in att.items():
      if not isinstance(row, dict):
        continue
      for impl, r in row.items():
        if _status(r):
          out.append(f"| {window} | {impl} | {_status(r)} | | |")
        else:
          out.append(f"| {window} | {impl} | {r['value_rel_err']:.1e} | {r['grad_rel_err']:.1e} "
                     f"| {_ms(r['fwd_bwd_s'])} |")
    out.append("")
  pal = results.get("pallas", {})
  if _status(pal):
    out += [f"Pallas TTT kernels: {_status(pal)}", ""]
  elif pal:
    out += ["Pallas (Triton) TTT kernels vs the XLA dual form, fp32, 8 mini-batches of 16, "
            "head dim 64 unless said (values and gradients w.r.t. every input):", ""]
    padded = [(k, f"TTT-{'Linear' if k.startswith('linear') else 'MLP'}, head dim "
                  f"{k.split('-hd')[1]} (run padded)") for k in pal if "-hd" in k]
    for kind, label in (("linear", "TTT-Linear"), ("mlp", "TTT-MLP"),
                        ("linear-xla", "TTT-Linear, output by XLA (Tuning.linear_output)"),
                        ("linear-stream", "TTT-Linear streaming (the last 2 updates left out)"),
                        *padded):
      r = pal.get(kind)
      if r and _status(r):
        out.append(f"- {label}: {_status(r)}")
      elif r:
        out.append(f"- {label}: value {r['value_rel_err']:.1e}, gradients "
                   f"{r['grad_rel_err']:.1e}")
    timed = [(*name.split("/"), r) for name, r in pal.items() if "/" in name]
    if timed:  # none when the task was cut short before its layer timings
      out += ["", "One TTT layer fwd+bwd at the gpu preset's [8, 2048, 512]:", "",
              "| layer | impl | compile | fwd+bwd |", "|---|---|---|---|"]
    for layer, impl, r in timed:
      out.append(f"| {layer} | {impl} | {_status(r)} | |" if _status(r) else
                 f"| {layer} | {impl} | {r['compile_s']:.1f} s | {_ms(r['fwd_bwd_s'])} |")
    out.append("")
  e2e = results.get("e2e", {})
  if _status(e2e):
    out += [f"TTT-E2E: {_status(e2e)}", ""]
  elif e2e:
    out += [f"TTT-E2E meta loss, fp32, GPU vs CPU: {e2e['fp32_loss_gpu']:.6f} vs "
            f"{e2e['fp32_loss_cpu']:.6f}; gradients within {e2e['fp32_grad_rel_err']:.1e} "
            f"(relative). A bf16 meta train step with the GPU defaults (prefix attention "
            f"{e2e['bf16_kernels']['prefix']}, inner loop {e2e['bf16_kernels']['inner_loop']}): "
            f"loss {e2e['bf16_meta_step_loss']:.4f}.", ""]
  return out


def _train(results: dict) -> list[str]:
  rows = {k.split(":", 1)[1] + (" (125m, 8K)" if k.startswith("train125m:") else ""): r
          for k, r in results.items() if k.startswith(("train:", "train125m:"))}
  if not rows:
    return []
  peak = results.get("env", {}).get("bf16_matmul_flops_per_s")
  out = ["## Train step, `gpu` preset (bf16, d_model 512, 8 layers, 2048 x 8, remat full; "
         "'+noremat' without layer remat, '+cmdbuf' with while loops in CUDA graphs, "
         "'+nofusiontune' with only GEMMs autotuned) and the "
         "`125m` presets at 8K x 8", "",
         "| kind | compile | step (median of 7) | vs transformer | counted FLOPs: vs transformer, "
         "TFLOP/s | tokens/s | MFU | loss first -> last (non-finite steps) |",
         "|---|---|---|---|---|---|---|---|"]
  for kind, r in rows.items():
    if _status(r):
      out.append(f"| {kind} | {_status(r)} | | | | | |")
      continue
    tps = r["tokens_per_step"] / r["median_s"]
    mfu = (f"{100 * r['model_flops_per_token'] * tps / peak:.1f}%" if peak else "")
    base = rows.get("transformer (125m, 8K)" if "125m" in kind else "transformer", {})
    ratio = f"{r['median_s'] / base['median_s']:.2f}x" if "median_s" in base else ""
    counted = r.get("counted_flops_per_step")
    flops = ""
    if counted:
      flops = (f"{counted / base['counted_flops_per_step']:.2f}x, "
               if base.get("counted_flops_per_step") else "")
      flops += f"{counted / r['median_s'] / 1e12:.0f}"
    losses = r.get("losses") or [r.get("loss", float("nan"))]
    trend = f"{losses[0]:.3f} -> {losses[-1]:.3f} ({r.get('nonfinite_steps', '?')})"
    out.append(f"| {kind} | {r['compile_s']:.1f} s | {_ms(r['median_s'])} | {ratio} | {flops} | "
               f"{tps:,.0f} | {mfu} | {trend} |")
  out += ["", "Counted FLOPs: the matmuls and cuDNN attention of the compiled step, every loop "
          "trip and recomputation included, the Pallas kernels' not (hlo_text.census); "
          "TFLOP/s is that count over the step time."]
  if peak:
    out += [f"MFU: model FLOPs (6N + attention) per second over the measured bf16 matmul "
            f"ceiling, {peak / 1e12:.0f} TFLOP/s (8192^3)."]
  return out + [""]


def _profiles(results: dict) -> list[str]:
  """Where each train step's device time goes (the `profile` of the train tasks)."""
  rows = {k.split(":", 1)[1] + (" (125m, 8K)" if k.startswith("train125m:") else ""): r["profile"]
          for k, r in results.items()
          if k.startswith(("train:", "train125m:")) and isinstance(r.get("profile"), dict)}
  if not rows:
    return []
  out = ["## Where the train steps' time goes (jax.profiler, 3 steps after the timed ones; "
         "benchmarks/kernel_profile.py)", "",
         "| kind | wall | device busy | kernels | launches | counted TFLOP/s of kernel time "
         "| largest kinds | largest scopes |", "|---|---|---|---|---|---|---|---|"]
  top = lambda d, p: ", ".join(f"{k} {100 * v / (p['kernels_ms'] or 1):.0f}%"  # noqa: E731
                               for k, v in list(d.items())[:3])
  for kind, p in rows.items():
    if _status(p):
      out.append(f"| {kind} | {_status(p)} | | | | | | |")
    else:
      rate = f"{p['tflops']:.1f}" if p.get("tflops") else ""
      out.append(f"| {kind} | {p.get('wall_ms', 0):.2f} ms | {p['busy_ms']:.2f} ms | "
                 f"{p['kernels_ms']:.2f} ms | {p['launches']:.0f} | {rate} | "
                 f"{top(p['by_kind'], p)} | {top(p['by_scope'], p)} |")
  out.append("")
  for kind, p in rows.items():
    if not _status(p):
      out += profile_markdown(kind, p, rows=6)
  return out


def _stream(results: dict) -> list[str]:
  rows = {}
  for name, r in results.items():
    if name.startswith("stream:"):  # one kind, or several timed together under "kinds"
      rows.update(r["kinds"] if "kinds" in r else {name.split(":", 1)[1]: r})
  if not rows:
    return []
  out = ["## Streaming, `gpu` preset (batch 1, chunks of 512)", "",
         "| kind | context | compile | prefill per token | decode per token |",
         "|---|---|---|---|---|"]
  for kind, r in rows.items():
    if _status(r):
      out.append(f"| {kind} | {_status(r)} | | | |")
      continue
    for length, e in r.items():
      if not isinstance(e, dict):
        continue
      if _status(e):
        out.append(f"| {kind} | {fmt_len(int(length))} | {_status(e)} | | |")
        continue
      pre = e.get("prefill", {}).get("per_token_s")
      dec = e.get("decode", {}).get("per_token_s")
      out.append(f"| {kind} | {fmt_len(int(length))} | {e.get('compile_s', 0):.1f} s | "
                 f"{pre * 1e6:.1f} us | " if pre else f"| {kind} | {length} | | | ")
      out[-1] += f"{dec * 1e3:.2f} ms |" if dec else " |"
  for name, r in results.items():  # kinds timed together: per-token speed over the transformer's
    for phase, per in (r.get("ratios", {}) if name.startswith("stream:") else {}).items():
      ratios = [f"{kind} {p['speedup_over_full_attention_at_longest']:.2f}x"
                for kind, p in per.items() if "speedup_over_full_attention_at_longest" in p]
      if ratios:
        out += ["", f"{phase} at the longest context, speed over the transformer's (Triton "
                f"cache kernel), same process: " + ", ".join(ratios)]
  return out + [""]


def _learn(results: dict) -> list[str]:
  rows = results.get("learn", {})
  if not rows:
    return []
  if _status(rows):
    return ["## Does the transformer learn?", "", f"learn: {_status(rows)}", ""]
  out = ["## Does the transformer learn? (gpu preset, first steps on one batch, same init)", "",
         "| attention | compile | loss per step | grad norm, first -> last | non-finite steps |",
         "|---|---|---|---|---|"]
  for name, r in rows.items():
    if not isinstance(r, dict):
      continue  # not a row
    if _status(r):
      out.append(f"| {name} | {_status(r)} | | | |")
      continue
    losses = " ".join(f"{x:.3f}" for x in r["loss"])
    out.append(f"| {name} | {r['compile_s']:.1f} s | {losses} | {r['grad_norm'][0]:.3g} -> "
               f"{r['grad_norm'][-1]:.3g} | {sum(f == 0 for f in r['finite'])} |")
  return out + [""]


def _tune(results: dict, task: str = "tune", layer: str = "TTT-Linear") -> list[str]:
  rows = results.get(task, {})
  if not rows:
    return []
  if _status(rows):
    return [f"{layer} kernel tuning: {_status(rows)}", ""]
  out = [f"## {layer} layer fwd+bwd at [8, 2048, 512]: matmul precision and Triton launch "
         "parameters (wN: warps, sN: pipeline stages, bN: hidden units per block; -kernel / -xla: "
         "TTT-Linear's output made in the kernels or by XLA, Tuning.linear_output; -unrolled: "
         "TTT-MLP's hidden blocks written out instead of loops, Tuning.mlp_unroll; /hdN: the "
         "same heads N wide, which the kernels run padded to a power of two, errors against "
         "that width's IEEE dual)", "",
         "| impl / precision / launch | compile | fwd+bwd | rel. err vs IEEE dual |",
         "|---|---|---|---|"]
  for name, r in rows.items():
    if not isinstance(r, dict):
      continue  # not a row
    if _status(r):
      out.append(f"| {name} | {_status(r)} | | |")
    else:
      out.append(f"| {name} | {r['compile_s']:.1f} s | {_ms(r['fwd_bwd_s'])} | "
                 f"{r['rel_err_vs_ieee_dual']:.1e} |")
  return out + [""]


def _cache_attention(results: dict) -> list[str]:
  rows = results.get("cache_attention", {})
  if not rows:
    return []
  if _status(rows):
    return [f"Cache attention: {_status(rows)}", ""]
  out = ["## Queries against a 128K full-attention cache (bf16, 8 heads x 64): Triton kernel vs "
         "masked cuDNN", "", "| call | impl | time | TFLOP/s (filled slots) | rel. err vs fp32 |",
         "|---|---|---|---|---|"]
  for call, row in rows.items():
    if not isinstance(row, dict):
      continue  # not a row
    for impl, r in row.items():
      if _status(r) or "median_s" not in r:
        out.append(f"| {call} | {impl} | {_status(r) or 'not timed'} | | |")
      else:
        out.append(f"| {call} | {impl} | {_ms(r['median_s'])} | {r['tflops_per_s']:.1f} | "
                   f"{r['rel_err']:.1e} |")
  return out + [""]


def _phases(results: dict) -> list[str]:
  """Where each task's wall time went, phase by phase (`gpu_tasks.mark`): each phase's seconds,
  from the end of the one before (the first from the task's spawn); 'rest' is what followed the
  last mark: the exit, or for a task that ran out of time, the phase it was in."""
  timed = {k: r for k, r in results.items() if r.get("phases")}
  if not timed:
    return []
  names = list(dict.fromkeys(p for r in timed.values() for p in r["phases"]))
  out = ["## Where each task's time went", "",
         "Seconds per phase, each from the end of the one before: 'started' is process start and "
         "imports, 'rest' what followed the last mark (the exit, or for a task that ran out of "
         "time, the phase it was in).", "",
         "| task | wall | " + " | ".join(names) + " | rest |",
         "|---|---|" + "---|" * (len(names) + 1)]
  for task, r in timed.items():
    cells, prev = [], 0.0
    for name in names:
      at = r["phases"].get(name)
      cells.append("" if at is None else f"{at - prev:.1f}")
      prev = prev if at is None else at
    rest = r.get("task_s", prev) - prev
    said = f"{r.get('cut_short', '')} {r.get('error', '')}"
    note = " (timed out)" if "timed out" in said else ""
    out.append(f"| {task}{note} | {r.get('task_s', 0):.0f} s | " + " | ".join(cells)
               + f" | {rest:.1f} |")
  return out + [""]


def _rng_kernel(same: bool | str | None) -> str:
  """What the `env` task found of JAX's threefry kernel, which initialises the tasks' models
  (a string: the error drawing through it; None: not asked)."""
  if same is None:
    return ""
  if isinstance(same, str):
    return (f" **Drawing through JAX's threefry kernel failed** ({same}); "
            "`train.init_rng_kernel=off` initialises without it.")
  kernel = "JAX's threefry kernel (`models.gpu_rng_kernels`)"
  return (f" {kernel} draws the same bits as the inlined hash." if same else
          f" **{kernel} draws other bits than the inlined hash: initial parameters differ from "
          "CPU's.**")


# gpu_check's own records of a task beside the task's result: its wall time, phase marks, and
# what cut short a task whose finished rows were kept (its time limit, or a crash)
RUN_KEYS = ("task_s", "phases", "cut_short")


def write_markdown(results: dict, path: str, shared_autotuning: bool = False) -> str:
  """`shared_autotuning`: the run's tasks shared XLA's autotuning cache (gpu_check's default),
  which the summary says where it gives compile times."""
  timings = results
  results = {k: {f: v for f, v in r.items() if f not in RUN_KEYS} for k, r in results.items()}
  env = results.get("env", {})
  lines = ["# gpu-check", ""]
  if env and not _status(env):
    v = env["versions"]
    lines += [f"Device {env['device']}; " + ", ".join(f"{k} {x}" for k, x in v.items() if x)
              + f"; bf16 matmul {env['bf16_matmul_flops_per_s'] / 1e12:.0f} TFLOP/s."
              + _rng_kernel(env.get("rng_kernel_same_bits")), ""]
  lines += (_correctness(results) + _learn(results) + _tune(results)
            + _tune(results, "tune_mlp", "TTT-MLP") + _train(results) + _profiles(results)
            + _cache_attention(results) + _stream(results))
  timing = ", ".join(f"{k} {r.get('task_s', 0):.0f} s" for k, r in timings.items())
  lines += [f"Task wall times (each in its own process, compilation included): {timing}.", ""]
  cut = [f"{k} ({r['cut_short']})" for k, r in timings.items() if r.get("cut_short")]
  if cut:
    lines += ["Cut short by their time limit or a crash (the rows above are those they finished): "
              + "; ".join(cut) + ".", ""]
  lines += _phases(timings)
  lines += ["Compile times: " + (
      "the tasks shared one XLA autotuning cache, in the order above, so a task's compile leaves "
      "out the autotuning of fusions an earlier task had tuned (`--cold_compile`: each task "
      "tunes its own)." if shared_autotuning else
      "each task autotuned its own fusions (`--cold_compile`)."), ""]
  with open(path, "w") as f:
    f.write("\n".join(lines))
  return path
