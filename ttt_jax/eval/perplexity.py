"""Perplexity at each context length and loss per position, by streaming with carried state.

Every model kind is evaluated through the model contract
`model(tokens, positions, cache) -> (logits, cache)`, `cache = model.init_cache(batch, capacity)`:
a sequence of L tokens is fed in fixed-size chunks by one jitted step (compiled once per shape;
eval/stream.py), and the cache (KV window, TTT hidden state, E2E inner weights + KV window) is
the carry. Memory for SWA / TTT / E2E models therefore does not grow with L; full attention
carries a KV cache of capacity L and attends to it blockwise (layers/attention.py), never
forming an L x L matrix.

Document rule (same documents at every length, so numbers are comparable): the first
`max_docs` documents (in stream order) of the run's validation split, or of any source given with
`--data` (`open_source`), with at least `max(ctx) + 1` tokens (`[BOS] text [EOS]`); shorter ones
are counted and reported, never dropped silently. The sequence of length L of a document is its
first L + 1 tokens (inputs plus shifted targets), starting at BOS; the NLL is averaged over all L
predicted positions.
On several devices (a loaded run's parameters lie on all) the steps split a batch over them:
its documents are rounded up to whole shares of the devices, the last batch filled up.
"""

from __future__ import annotations

import json
import math
import os
import time
from collections.abc import Callable, Sequence
from typing import NamedTuple

import ml_collections
import numpy as np
from tqdm.auto import tqdm

from ttt_jax import sharding as shd
from ttt_jax.config import ConfigError, parse_ctx
from ttt_jax.data.dataset import Dataset
from ttt_jax.data.pipeline import TokenStream
from ttt_jax.eval.stream import (  # noqa: F401 (the streaming loop, part of this module's API)
  fill_rows,
  init_cache,
  make_chunk_step,
  make_init_cache,
  make_logprob_step,
  make_one_shot_step,
  one_shot_nll,
  stream_chunks,
  stream_nll,
  stream_with_cache,
)
from ttt_jax.layers.mixers import mixer_spec
from ttt_jax.models.config import model_config
from ttt_jax.runs.load import Run
from ttt_jax.train.metrics import validation_metrics  # noqa: F401 (part of this module's API)


class EvalDocs(NamedTuple):
  names: tuple[str, ...]
  tokens: np.ndarray  # int32 [N, max_ctx + 1], each row a document prefix starting at BOS
  skipped_short: int = 0  # documents with fewer than max_ctx + 1 tokens passed over (`passed_over`)
  longest_skipped: int = 0  # tokens of the longest of them
  whole: tuple[np.ndarray, ...] = ()  # the same documents whole (views of the stream; strided.py)


# -- inputs -------------------------------------------------------------------------------------
def parse_ctx_list(value: str | Sequence[int | str]) -> list[int]:
  """'1k,2k,512' -> [512, 1024, 2048] (sorted, unique)."""
  items = value.split(",") if isinstance(value, str) else list(value)
  ctxs = sorted({parse_ctx(v) for v in items if str(v).strip()})
  if not ctxs or ctxs[0] <= 0:
    raise ConfigError(f"ctx={value!r}: expected a comma list of positive lengths like 1k,2k,8k")
  return ctxs


def stream_alignment(model_cfg: ml_collections.ConfigDict) -> int:
  """Streamed chunks must be whole multiples of this: the TTT / E2E inner mini-batch size."""
  align = mixer_spec(model_cfg.mixer).alignment(model_config(model_cfg))
  if model_cfg.kind == "e2e":
    align = math.lcm(align, model_cfg.e2e.mini_batch_size)
  return align


def chunk_for(ctx: int, chunk: int, align: int = 1) -> int:
  """The chunk size used at context `ctx`: `chunk`, or `ctx` itself when shorter."""
  c = min(chunk, ctx)
  if ctx % c:
    raise ConfigError(f"ctx={ctx} is not a multiple of the chunk size eval.chunk={chunk}; "
                      f"use context lengths that are multiples of {chunk}")
  if c % align:
    raise ConfigError(f"chunk size {c} (ctx={ctx}, eval.chunk={chunk}) must be a multiple of the "
                      f"model's inner mini-batch size {align}")
  return c


def passed_over(lengths: np.ndarray, idx: np.ndarray, max_docs: int, need: int) -> np.ndarray:
  """Lengths of the documents shorter than `need` that a selection `idx` (the first `max_docs`
  long enough) passed over: those before its last document, or every one when it ran out."""
  end = int(idx[-1]) + 1 if len(idx) and len(idx) == max_docs else len(lengths)
  head = lengths[:end]
  return head[head < need]


def select_documents(stream, max_ctx: int, max_docs: int,
                     what: str = "the validation split") -> EvalDocs:
  """The first `max_docs` documents of `stream` with >= max_ctx + 1 tokens (module docstring);
  `what` names the documents in the error when none is long enough."""
  need = max_ctx + 1
  lengths = stream.doc_lengths
  idx = np.flatnonzero(lengths >= need)[:max_docs]
  short = passed_over(lengths, idx, max_docs, need)
  if len(idx) == 0:
    longest = int(lengths.max())
    raise ConfigError(f"ctx={max_ctx} is larger than the data allows: no document of {what} has "
                      f"{need} tokens (the longest has {longest}, so ctx <= {longest - 1})")
  rows = np.stack([stream.tokens[s:s + need] for s in stream.doc_starts[idx]]).astype(np.int32)
  whole = tuple(stream.tokens[s:s + n] for s, n in zip(stream.doc_starts[idx], lengths[idx],
                                                       strict=True))
  return EvalDocs(tuple(stream.names[i] for i in idx), rows, len(short),
                  int(short.max()) if len(short) else 0, whole)


class Source(NamedTuple):
  """The documents a run is evaluated on (`open_source`)."""
  dataset: Dataset  # the run's data, or `--data` tokenized with the run's tokenizer
  split: str  # resolved: 'validation' of the run's own data, 'all' of --data by default
  stream: TokenStream


def open_source(run: Run, source: str | None, split: str | None) -> Source:
  """The documents a run is evaluated on: `split` (default validation) of the run's own data
  (`source` None) or of `source` (`--data`: any source kind, tokenized with the run's tokenizer;
  default split all). Any problem with `source` is one line naming --data."""
  split = split or ("validation" if source is None else "all")
  data = run.data
  try:
    if source is not None:
      data = run.data.with_source(source)
    return Source(data, split, data.stream(split))
  except ConfigError as e:
    if source is None or "--data" in str(e):
      raise
    raise ConfigError(f"--data {source!r}: {e}") from None


def run_header(run: Run, src: Source) -> dict:
  """The fields every evaluation result of a run starts with: the run and what it read."""
  m = run.config.model
  return {"workdir": run.workdir, "step": run.step, "kind": m.kind, "mixer": m.mixer,
          "train_ctx": run.config.data.seq_len, "source": src.dataset.source,
          "split": src.split, "tokenizer": src.dataset.tokenizer.name}


def count_of(n: int, noun: str) -> str:
  """'1 document', '3 documents'."""
  return f"{n:,} {noun}{'s' * (n != 1)}"


def skipped_note(docs_skipped: int, longest: int, need: int) -> str:
  """The line that reports documents too short to be scored."""
  return (f"skipped {count_of(docs_skipped, 'document')} shorter than {need:,} tokens (the "
          f"longest of them has {longest:,})")


# -- summaries ----------------------------------------------------------------------------------
def bucket_edges(length: int, first: int) -> list[int]:
  """Log-spaced position buckets [0, first), [first, 2 first), [2 first, 4 first) ... up to L."""
  edges, e = [0], first
  while e < length:
    edges.append(e)
    e *= 2
  return edges + [length]


def position_buckets(nll: np.ndarray, first: int) -> list[dict[str, float]]:
  """Mean NLL per log-spaced position bucket of `nll` [B, L] (position = index of the input)."""
  edges = bucket_edges(nll.shape[1], first)
  out = []
  for lo, hi in zip(edges[:-1], edges[1:], strict=True):
    part = nll[:, lo:hi].astype(np.float64)
    out.append({"start": lo, "end": hi, "mean_nll": float(part.mean()), "tokens": part.size})
  return out


def context_summary(ctx: int, nll: np.ndarray) -> dict[str, float]:
  mean = float(nll.astype(np.float64).mean())
  return {"ctx": ctx, "mean_nll": mean, "ppl": math.exp(mean), "tokens": int(nll.size),
          "docs": int(nll.shape[0])}


# -- whole evaluation ---------------------------------------------------------------------------
def evaluate_model(graphdef, params, model_cfg: ml_collections.ConfigDict, docs: EvalDocs,
                   ctxs: Sequence[int], *, chunk: int, batch_size: int, first_bucket: int,
                   progress: bool = True, echo: Callable[[str], None] | None = print,
                   done: Callable[[list[dict]], None] | None = None) -> dict:
  """Perplexity at every context length in `ctxs` + loss per position bucket at the longest.
  `done(contexts)` gets the lengths finished so far after each one (kept if a longer one
  fails)."""
  ctxs = sorted(ctxs)
  if docs.tokens.shape[1] < ctxs[-1] + 1:
    raise ConfigError(f"ctx={ctxs[-1]} needs documents of {ctxs[-1] + 1} tokens; "
                      f"the selected ones have {docs.tokens.shape[1]}")
  align = stream_alignment(model_cfg)
  chunks = {L: chunk_for(L, chunk, align) for L in ctxs}  # fail before any compute
  step_fn, init_fn = make_chunk_step(graphdef), make_init_cache(graphdef)
  n_docs = docs.tokens.shape[0]
  batch_size = shd.whole_shares(params, max(1, min(batch_size, n_docs)))
  rows = batch_size if shd.batch_ways(params) > 1 else 0  # on a mesh every batch full: split
  per_ctx, buckets = [], []
  for L in ctxs:
    t0 = time.perf_counter()
    bar = tqdm(total=max(n_docs, -(-n_docs // batch_size) * rows) * L, desc=f"eval ctx {L}",
               unit="tok", unit_scale=True, disable=not progress, dynamic_ncols=True,
               leave=False)
    parts = [stream_nll(graphdef, params, fill_rows(docs.tokens[i:i + batch_size, :L + 1], rows),
                        chunks[L], step_fn=step_fn, init_fn=init_fn, progress=bar)[:n_docs - i]
             for i in range(0, n_docs, batch_size)]
    bar.close()
    nll = np.concatenate(parts)
    summary = dict(context_summary(L, nll), chunk=chunks[L],
                   seconds=round(time.perf_counter() - t0, 3))
    per_ctx.append(summary)
    if done is not None:
      done(list(per_ctx))
    if echo is not None:
      echo(f"ctx {L:>7}: ppl {summary['ppl']:9.3f}  nll {summary['mean_nll']:.4f}  "
           f"({summary['tokens']:,} tokens, {summary['seconds']:.1f}s)")
    if L == ctxs[-1]:
      buckets = position_buckets(nll, first_bucket)
  return {"contexts": per_ctx, "position_buckets": {"ctx": ctxs[-1], "buckets": buckets},
          "documents": list(docs.names)}


# -- trained runs (loaded by runs/load.py) ----------------------------------------------------
def evaluate_run(run: Run, ctxs: Sequence[int], *, data: str | None = None,
                 split: str | None = None, max_docs: int | None = None,
                 chunk: int | None = None, batch_size: int | None = None,
                 progress: bool = True, echo: Callable[[str], None] | None = print,
                 extra: Callable[[EvalDocs], dict] | None = None,
                 partial: Callable[[dict], None] | None = None) -> dict:
  """Selects the documents for max(ctxs) from `split` (default: validation) of the run's data, or
  of the source `data` (default split: all), and evaluates. `extra(docs)` adds more results over
  the same documents (eval/strided.py); `partial(results)` gets the results of the context
  lengths finished so far after each one ("complete": False)."""
  ev = run.config.eval
  ctxs = sorted(ctxs)
  max_docs = ev.max_docs if max_docs is None else max_docs
  chunk = ev.chunk if chunk is None else chunk
  batch_size = ev.batch_size if batch_size is None else batch_size
  align = stream_alignment(run.config.model)
  for L in ctxs:
    chunk_for(L, chunk, align)
  src = open_source(run, data, split)
  what = f"of {src.dataset.source} ({src.split})"
  need = ctxs[-1] + 1
  docs = select_documents(src.stream, ctxs[-1], max_docs, f"the {src.split} split"
                          if data is None else f"--data {data} (--split {src.split})")
  if echo is not None:
    echo(f"{run.workdir} (step {run.step}, {run.config.model.kind}/{run.config.model.mixer}): "
         f"{count_of(len(docs.names), 'document')} {what} with >= {need} tokens, chunk {chunk}")
    if docs.skipped_short:
      echo(skipped_note(docs.skipped_short, docs.longest_skipped, need))
  header = {**run_header(run, src), "chunk": chunk, "max_docs": max_docs,
            "selection": f"first {max_docs} documents {what} with >= max(ctx)+1 tokens",
            "skipped_short": docs.skipped_short, "longest_skipped": docs.longest_skipped}
  done = None if partial is None else \
      lambda contexts: partial({**header, "complete": False, "contexts": contexts})
  out = evaluate_model(run.graphdef, run.params, run.config.model, docs, ctxs, chunk=chunk,
                       batch_size=batch_size, first_bucket=ev.first_bucket, progress=progress,
                       echo=echo, done=done)
  if extra is not None:
    out.update(extra(docs))
  return {**header, **out}


PARTIAL_RESULTS = "results.partial.json"  # scripts/evaluate.py: the context lengths done so far


def write_json(obj: dict | list, path: str) -> str:
  """Writes `obj` as indented JSON at `path`, making its folder, through a temporary file
  renamed over it: a kill while writing leaves the previous file whole. Returns the path."""
  os.makedirs(os.path.dirname(path) or ".", exist_ok=True)
  tmp = f"{path}.tmp-{os.getpid()}"
  try:
    with open(tmp, "w") as f:
      json.dump(obj, f, indent=2)
    os.replace(tmp, path)
  finally:
    if os.path.exists(tmp):
      os.remove(tmp)
  return path


def write_results(results: dict | list, workdir: str, name: str = "results.json") -> str:
  """Writes `workdir/eval/<name>` (never touches the checkpoints). Returns its path."""
  return write_json(results, os.path.join(workdir, "eval", name))
