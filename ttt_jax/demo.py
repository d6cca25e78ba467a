"""`make demo`: meta-train a tiny TTT-E2E model on the embedded corpus, report what it learned."""

from __future__ import annotations

import math
import os
import signal
import threading
import time

from ttt_jax.config import build_config
from ttt_jax.data import pipeline
from ttt_jax.data.dataset import Dataset
from ttt_jax.eval import perplexity, plots
from ttt_jax.runs.load import load_run
from ttt_jax.train import distributed
from ttt_jax.train.loop import train_and_evaluate

# TTT-E2E, meta-learned: a sliding-window Transformer whose last block keeps learning as it reads
# (context 256, window 128, inner mini-batches of 64 tokens: two chunks per training sequence)
DEMO_ARG = "model=e2e,scale=tiny,ctx=256,mode=meta"
DEMO_CTX = "256,512,1k,2k"
EXPECTED_MINUTES = 4  # measured: 3 min 57 s end to end on 2 CPU cores shared with other jobs


def demo_config(arg: str = DEMO_ARG):
  c = build_config(arg)
  c.model.window = 128
  c.model.e2e.mini_batch_size = 64
  c.train.steps = 150
  c.train.warmup_steps = 15
  c.model.e2e.ilr_warmup_steps = 15
  c.train.log_every = 25
  c.train.eval_every = 75
  c.data.batch_size = 8
  return c


def run_demo(workdir: str, arg: str = DEMO_ARG) -> dict:
  config = demo_config(arg)
  # the resumed run loads what the first compiled
  distributed.enable_compilation_cache(config.train.compilation_cache)
  print(f"make demo: meta-trains a tiny TTT-E2E model for {config.train.steps} steps, is "
        f"preempted and resumes, then evaluates perplexity at contexts {DEMO_CTX}; about "
        f"{EXPECTED_MINUTES} minutes on 2 CPU cores")
  stream = Dataset.from_config(config.data).stream("train")  # tokenized once, cached
  h = pipeline.unigram_entropy(stream.tokens, config.model.vocab_size)
  print(f"embedded corpus: {len(stream.names)} train documents, {len(stream.tokens):,} tokens; "
        f"byte-unigram entropy {h:.3f} nats/token (ppl {math.exp(h):.2f})")
  out = train_with_preemption(config, workdir, at_step=config.train.steps // 3)
  train_loss = out["history"][-1]["loss"]
  val_loss = out["val"]["loss"]
  print(f"\nfinal train loss {train_loss:.3f}, validation loss {val_loss:.3f} nats/token vs "
        f"unigram entropy {h:.3f}: {h - val_loss:.3f} nats/token below the no-context baseline")
  results = evaluate_contexts(workdir, DEMO_CTX)
  return {"unigram_entropy": h, "train_loss": train_loss, "val_loss": val_loss,
          "eval": results}


def train_with_preemption(config, workdir: str, at_step: int) -> dict:
  """Trains from scratch, sends this process SIGTERM once the checkpoint at `at_step` exists
  (as a preemptible machine would), then resumes in a second call and reports the continuation."""
  fresh = config.copy_and_resolve_references()
  fresh.checkpoint.resume, fresh.checkpoint.overwrite = False, True
  fresh.checkpoint.every_steps = at_step
  marker, finished = os.path.join(workdir, "checkpoints", str(at_step)), threading.Event()

  def preempt():
    while not finished.is_set():
      if os.path.isdir(marker):
        os.kill(os.getpid(), signal.SIGTERM)
        return
      time.sleep(0.02)

  threading.Thread(target=preempt, daemon=True).start()
  first = train_and_evaluate(fresh, workdir)
  finished.set()
  if not first["preempted"]:
    return first
  print("\nsimulated preemption: the run saved its state and exited; starting it again")
  second = train_and_evaluate(config, workdir)
  before, after = first["history"][-1], second["history"][0]
  print(f"resumed from step {second['start_step']}: train loss {before['loss']:.3f} at step "
        f"{before['step']} before the preemption, {after['loss']:.3f} at step {after['step']} "
        f"after it (step-{first['history'][0]['step']} loss was "
        f"{first['history'][0]['loss']:.3f}); the curve continues where it stopped")
  second["history"] = first["history"] + second["history"]
  return second


def evaluate_contexts(workdir: str, ctx: str) -> dict:
  """Streams the trained run over validation documents at several context lengths and prints
  the per-context perplexity table; writes workdir/eval/results.json and the PNG plots."""
  run = load_run(workdir)
  print(f"\nperplexity per context length (trained at {run.config.data.seq_len} tokens):")
  res = perplexity.evaluate_run(run, perplexity.parse_ctx_list(ctx), echo=None)
  perplexity.write_results(res, workdir)
  pngs = plots.write_plots([res], os.path.join(workdir, "eval"))
  print(plots.ppl_table(res))
  print(f"{len(res['documents'])} validation documents; results in "
        f"{os.path.join(workdir, 'eval', 'results.json')}; plots {', '.join(pngs)}")
  return res
