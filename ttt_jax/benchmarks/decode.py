"""Decode speed of an imported Llama-family run beside llama.cpp on the same GGUF file, batch 1,
greedy, the same prompt ids: time to first token (the prompt read and one token chosen) and
decode tokens/s (128 tokens after the first).

Each variant runs in its own worker process (its own XLA thread flags), loaded and compiled once;
the parent then asks every worker for one measurement per round, round-robin, so machine noise
falls on all of them alike, and reports the median of the rounds. Variants:
  llama          llama.cpp (llama-cpp-python) with n_threads=1, the run's source GGUF
  ours           Generator (eval/generate.py), XLA's default threading
  ours-1t        the same with --xla_cpu_multi_thread_eigen=false intra_op_parallelism_threads=1
                 (and one thread for the int8 kernel: TTT_JAX_CPU_THREADS=1)
  llama,threads=N      llama.cpp with N threads
  ...,dtype=bfloat16   weights (and compute) cast for decode (generate.decode_model); also int8
  ...,threads=N        ours: the int8 kernel's threads (TTT_JAX_CPU_THREADS)
  ...,seq_len=N        the run's context (KV cache slots) overridden
  ...,attention=dense  every cache slot read at each step (before: auto reads only filled ones)
  ...,src=DIR          the package of another checkout (a baseline: `git worktree add DIR REV`
                       and this file copied into it)
e.g. `ours-1t,dtype=bfloat16`. `--pin CPU` pins every worker to one CPU (os.sched_setaffinity).

llama.cpp is a benchmark-only dependency, not one of the package's (a source build, ~10 min):
  CMAKE_ARGS="-DGGML_NATIVE=ON -DGGML_OPENMP=OFF" \
    pip install --target /tmp/llamacpp llama-cpp-python==0.3.36
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import os
import statistics
import subprocess
import sys
import time

import ml_collections
import numpy as np

from ttt_jax.argtypes import int_in
from ttt_jax.config import ConfigError
from ttt_jax.eval.generate import Generator, prompt_ids
from ttt_jax.interop.llama import IMPORT_RECORD
from ttt_jax.runs.load import load_run

SINGLE_THREAD_XLA = ("--xla_cpu_multi_thread_eigen=false intra_op_parallelism_threads=1")
INSTALL = ('llama.cpp is missing: CMAKE_ARGS="-DGGML_NATIVE=ON -DGGML_OPENMP=OFF" pip install '
           '--target /tmp/llamacpp llama-cpp-python==0.3.36  (or give --llama_path)')


def parse_variant(spec: str) -> tuple[str, dict[str, str]]:
  """'ours-1t,dtype=bfloat16' -> ('ours-1t', {'dtype': 'bfloat16'})."""
  name, *opts = spec.split(",")
  if name not in ("llama", "ours", "ours-1t") or not all("=" in o for o in opts):
    raise ValueError(f"variant {spec!r}: expected llama, ours or ours-1t [,key=value ...]")
  return name, dict(o.split("=", 1) for o in opts)


def ours_worker(workdir: str, prompt: list[int], n_new: int, opts: dict[str, str]):
  """(measure() -> dict, description): the run's Generator, compiled for 1 and n_new + 1 tokens."""
  run = load_run(workdir)
  cfg, graphdef, params = run.config.model, run.graphdef, run.params
  if "attention" in opts:  # e.g. dense: every cache slot read at every step
    cfg = ml_collections.ConfigDict(cfg.to_dict())
    cfg.attention_algorithm = opts["attention"]
  if "attention" in opts or opts.get("dtype", "float32") != cfg.param_dtype:
    from ttt_jax.eval.generate import decode_model  # here: a baseline checkout (src=) may lack it
    cfg, graphdef, params = decode_model(cfg, params, opts.get("dtype", cfg.param_dtype))
  seq_len = int(opts.get("seq_len", run.config.data.seq_len))
  gen = Generator(graphdef, params, cfg, chunk=run.config.eval.chunk, max_len=seq_len)
  ids = np.asarray([prompt], np.int32)

  def measure():
    t0 = time.perf_counter()
    gen(ids, 1)
    t1 = time.perf_counter()
    toks = gen(ids, n_new + 1)
    t2 = time.perf_counter()
    return {"ttft_s": t1 - t0, "decode_tps": n_new / ((t2 - t1) - (t1 - t0)),
            "tokens": toks[0].tolist()}

  weights = opts.get("dtype", cfg.param_dtype)
  return measure, (f"{weights} weights, {seq_len} cache slots, attention "
                   f"{cfg.attention_algorithm}")


def llama_worker(gguf: str, prompt: list[int], n_new: int, opts: dict[str, str]):
  """(measure() -> dict, description): llama.cpp on `gguf`, greedy by argmax of its logits."""
  try:
    import llama_cpp
  except ImportError:
    sys.exit(INSTALL)
  threads = int(opts.get("threads", 1))
  llm = llama_cpp.Llama(gguf, n_ctx=int(opts.get("n_ctx", 2048)), n_threads=threads,
                        n_threads_batch=threads, n_batch=512, verbose=False)

  def greedy() -> int:  # argmax of the last token's logits
    return int(np.argmax(np.ctypeslib.as_array(llm._ctx.get_logits_ith(-1), shape=(vocab,))))

  vocab = llm.n_vocab()

  def measure():
    llm.reset()
    llm._ctx.kv_cache_clear()
    t0 = time.perf_counter()
    llm.eval(prompt)
    tok = greedy()
    t1 = time.perf_counter()
    toks = [tok]
    for _ in range(n_new):
      llm.eval([tok])
      tok = greedy()
      toks.append(tok)
    t2 = time.perf_counter()
    return {"ttft_s": t1 - t0, "decode_tps": n_new / (t2 - t1), "tokens": toks}

  return measure, f"llama-cpp-python {llama_cpp.__version__}, n_threads={threads}"


def worker_main(args) -> None:
  if args.pin is not None:
    os.sched_setaffinity(0, {args.pin})
  name, opts = parse_variant(args.worker)
  prompt = json.loads(args.prompt_ids)
  if name == "llama":
    sys.path.append(args.llama_path)
    measure, about = llama_worker(args.gguf, prompt, args.new_tokens, opts)
  else:
    measure, about = ours_worker(args.workdir, prompt, args.new_tokens, opts)
  measure()  # compile / warm up
  print(json.dumps({"ready": about}), flush=True)
  for _ in sys.stdin:
    print(json.dumps(measure()), flush=True)


def start_worker(spec: str, args, prompt: list[int]) -> subprocess.Popen:
  # imported here, not at the top: a baseline checkout (src=) running this file as its worker
  # lacks the module
  from ttt_jax.layers.cpu_kernel import THREADS_ENV
  env = dict(os.environ)
  name, opts = parse_variant(spec)
  if name == "ours-1t":
    env["XLA_FLAGS"] = (env.get("XLA_FLAGS", "") + " " + SINGLE_THREAD_XLA).strip()
    env[THREADS_ENV] = "1"  # the int8 kernel's own threads
  if name != "llama" and "threads" in opts:
    env[THREADS_ENV] = opts["threads"]
  src = opts.get("src")  # another checkout of the package (e.g. a baseline)
  if src:
    env["PYTHONPATH"] = os.path.abspath(src)
  cmd = [sys.executable, "-m", "ttt_jax.benchmarks.decode", "--worker", spec,
         "--workdir", os.path.abspath(args.workdir), "--gguf", args.gguf,
         "--llama_path", args.llama_path,
         "--prompt_ids", json.dumps(prompt), "--new_tokens", str(args.new_tokens)]
  if args.pin is not None:
    cmd += ["--pin", str(args.pin)]
  return subprocess.Popen(cmd, stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True, env=env,
                          cwd=os.path.abspath(src) if src else None)


def answer(proc: subprocess.Popen, spec: str) -> dict:
  line = proc.stdout.readline()
  if not line:
    raise SystemExit(f"worker {spec} ended (exit {proc.wait()})")
  return json.loads(line)


def main(args) -> dict:
  if any(parse_variant(v)[0] == "llama" for v in args.variants):
    sys.path.append(args.llama_path)
    if importlib.util.find_spec("llama_cpp") is None:
      sys.exit(INSTALL)
  run = load_run(args.workdir)
  if args.gguf is None:
    record = os.path.join(args.workdir, IMPORT_RECORD)
    try:
      with open(record) as f:
        args.gguf = json.load(f)["source"]
    except (OSError, ValueError, KeyError, TypeError):
      raise ConfigError(f"--workdir {args.workdir}: no readable {record} naming the GGUF it was "
                        "imported from; give --gguf FILE") from None
  prompt = prompt_ids(run.data.tokenizer, args.prompt).tolist()
  print(f"prompt: {len(prompt)} tokens; {args.new_tokens} decode tokens; load average "
        f"{os.getloadavg()[0]:.2f} on {os.cpu_count()} CPUs", flush=True)
  procs = {}
  for spec in args.variants:  # one at a time: compilation does not overlap another's start-up
    procs[spec] = start_worker(spec, args, prompt)
    print(f"{spec}: {answer(procs[spec], spec)['ready']}", flush=True)
  rounds: dict[str, list[dict]] = {s: [] for s in args.variants}
  loads = []
  for r in range(args.rounds):
    loads.append(os.getloadavg()[0])
    for spec, proc in procs.items():
      proc.stdin.write("run\n")
      proc.stdin.flush()
      rounds[spec].append(answer(proc, spec))
    print(f"round {r + 1}/{args.rounds} (load {loads[-1]:.2f}): " + ", ".join(
        f"{s} {v[-1]['decode_tps']:.1f} tok/s" for s, v in rounds.items()), flush=True)
  for proc in procs.values():
    proc.stdin.close()
    proc.wait()
  ref = rounds[args.variants[0]][0]["tokens"]
  table = {}
  print(f"\n{'variant':34s} {'decode tok/s':>13s} {'(min-max)':>13s} {'TTFT ms':>8s} "
        f"{'same greedy tokens as ' + args.variants[0]:>8s}")
  for spec, rs in rounds.items():
    tps, ttft = [x["decode_tps"] for x in rs], [x["ttft_s"] * 1e3 for x in rs]
    toks = rs[0]["tokens"]
    same = next((i for i, (a, b) in enumerate(zip(toks, ref, strict=False)) if a != b), len(toks))
    table[spec] = {"decode_tps": statistics.median(tps), "ttft_ms": statistics.median(ttft),
                   "same_prefix": same}
    print(f"{spec:34s} {statistics.median(tps):13.1f} {min(tps):6.1f}-{max(tps):<6.1f} "
          f"{statistics.median(ttft):8.0f} {same:>8d}")
  print(f"load average during the rounds: {min(loads):.2f}-{max(loads):.2f}")
  return table


def variant_list(text: str) -> list[str]:
  """--variants: ';'-separated, each checked (`parse_variant`)."""
  specs = [v for v in text.split(";") if v]
  try:
    for spec in specs:
      parse_variant(spec)
  except ValueError as e:
    raise argparse.ArgumentTypeError(str(e)) from None
  return specs


def build_parser() -> argparse.ArgumentParser:
  ap = argparse.ArgumentParser(description=__doc__,
                               formatter_class=argparse.RawDescriptionHelpFormatter)
  ap.add_argument("--workdir", default="runs/smollm2", help="an imported run (make pretrained)")
  ap.add_argument("--gguf", default=None, help="GGUF for llama.cpp (default: the run's source)")
  ap.add_argument("--llama_path", default="/tmp/llamacpp",
                  help="folder holding llama_cpp (pip install --target)")
  ap.add_argument("--prompt", default="To be, or not to be, that is the question:")
  ap.add_argument("--new_tokens", type=int_in(1), default=128,
                  help="decode tokens after the first")
  ap.add_argument("--rounds", type=int_in(1), default=3)
  ap.add_argument("--variants", type=variant_list, default=["llama", "ours-1t", "ours"],
                  help="';'-separated variants (module docstring)")
  ap.add_argument("--pin", type=int, default=None, help="pin every worker to this CPU")
  ap.add_argument("--worker", default=None, help=argparse.SUPPRESS)
  ap.add_argument("--prompt_ids", default=None, help=argparse.SUPPRESS)
  return ap



def cli_main(argv: list[str]) -> None:
  """scripts/compare_decode.py: the comparison, or (internal --worker) one variant's worker."""
  args = build_parser().parse_args(argv)
  worker_main(args) if args.worker else main(args)


if __name__ == "__main__":  # the workers: python -m ttt_jax.benchmarks.decode --worker SPEC ...
  cli_main(sys.argv[1:])
