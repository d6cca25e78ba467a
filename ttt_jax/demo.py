"""`make demo`: pretrain a tiny model on the embedded corpus and report what it learned."""

from __future__ import annotations

import math

from ttt_jax.config import build_config
from ttt_jax.data import pipeline


def demo_config(arg: str = "model=swa,scale=tiny,ctx=512"):
  c = build_config(arg)
  c.train.steps = 300
  c.train.log_every = 25
  c.train.eval_every = 100
  c.data.batch_size = 8
  return c


def run_demo(workdir: str, arg: str = "model=swa,scale=tiny,ctx=512") -> dict:
  from ttt_jax.train.trainer import train_and_evaluate  # noqa: PLC0415

  config = demo_config(arg)
  stream = pipeline.load_stream(config.data.source, config.data.tokenizer, "train",
                                config.data.val_fraction)
  h = pipeline.unigram_entropy(stream.tokens, config.model.vocab_size)
  print(f"embedded corpus: {len(stream.names)} train documents, {len(stream.tokens):,} tokens; "
        f"byte-unigram entropy {h:.3f} nats/token (ppl {math.exp(h):.2f})")
  out = train_and_evaluate(config, workdir)
  train_loss = out["history"][-1]["loss"]
  val_loss = out["val"]["loss"]
  print(f"\nfinal train loss {train_loss:.3f}, validation loss {val_loss:.3f} nats/token vs "
        f"unigram entropy {h:.3f}: {h - val_loss:.3f} nats/token below the no-context baseline")
  return {"unigram_entropy": h, "train_loss": train_loss, "val_loss": val_loss}
