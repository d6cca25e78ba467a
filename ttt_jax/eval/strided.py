"""Strided (sliding-window) perplexity: every token of whole documents scored exactly once, with
up to `ctx` tokens of context (the Hugging Face perplexity recipe, llama-perplexity).

Definition. A document x_0 .. x_{N-1} (`[BOS] text [EOS]`) has N - 1 scored positions: position p
predicts x_{p+1}. Windows of `ctx` positions advance by the stride S (1 <= S <= ctx): window k
reads x_{kS} .. x_{e_k} with e_k = min(kS + ctx, N - 1) as a sequence of its own (positions
0, 1, .. and an empty cache: for TTT and E2E models an independent forward from the initial
state, the inner loop learning on that window only) and scores the positions no earlier window
scored: all of the first window, the last S of every later one (fewer in the last window, the
first to reach the end of the document). So every position is scored exactly once; position p
sees min(p + 1, ctx) tokens when S = 1, and with a larger S p + 1 tokens in the first window and
ctx - S + 1 .. ctx after it. S = ctx is non-overlapping windows. Reading costs about
(N - 1) * ctx / S tokens per document.

Windows of all documents are batched (`eval.batch_size` windows), a short last window and a
short last batch are padded to the one shape (padding comes after the real tokens and is never
scored: `perplexity.stream_chunks`), so each context length compiles the chunk step once.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Sequence

import ml_collections
import numpy as np
from tqdm.auto import tqdm

from ttt_jax.config import ConfigError
from ttt_jax.eval import perplexity as P
from ttt_jax.runs.load import Run
from ttt_jax.sharding import whole_shares


def check_stride(stride: int, ctxs: Sequence[int], option: str = "--stride") -> None:
  """One line naming `option` unless 1 <= stride <= every context length."""
  if stride < 1:
    raise ConfigError(f"{option} {stride}: the stride must be a positive number of tokens")
  if stride > min(ctxs):
    raise ConfigError(f"{option} {stride} is larger than ctx {min(ctxs)}: windows would skip "
                      f"tokens; use {option} <= {min(ctxs)}")


def stride_windows(length: int, ctx: int, stride: int) -> list[tuple[int, int, int]]:
  """(begin, end, first) of the windows over a document of `length` tokens: the window reads
  tokens begin .. end (positions begin .. end - 1) and scores positions first .. end - 1."""
  if not 1 <= stride <= ctx:
    raise ValueError(f"stride {stride} must be in [1, ctx={ctx}]")
  windows, begin, scored = [], 0, 0
  while scored < length - 1:
    end = min(begin + ctx, length - 1)
    windows.append((begin, end, scored))
    scored, begin = end, begin + stride
  return windows


def strided_nll(graphdef, params, docs: Sequence[np.ndarray], ctx: int, stride: int, *,
                chunk: int, batch_size: int, step_fn: Callable | None = None,
                init_fn: Callable | None = None, progress=None) -> list[np.ndarray]:
  """NLL of every position of each document (`docs`: token arrays starting at BOS), each
  scored once by its window (module docstring): a list of float32 [len(doc) - 1]. Batches of
  `batch_size` windows [B, ctx + 1] are streamed in chunks of `chunk`; `step_fn` / `init_fn`
  (perplexity.make_chunk_step / make_init_cache) are built once by callers that call again."""
  windows = [(d, *w) for d, doc in enumerate(docs) for w in stride_windows(len(doc), ctx, stride)]
  out = [np.full(max(len(doc) - 1, 0), np.nan, np.float32) for doc in docs]
  step_fn = P.make_chunk_step(graphdef) if step_fn is None else step_fn
  init_fn = P.make_init_cache(graphdef) if init_fn is None else init_fn
  rows = whole_shares(params, max(1, min(batch_size, len(windows))))  # empty windows fill up
  for i in range(0, len(windows), rows):
    group = windows[i:i + rows]
    tokens = np.zeros((rows, ctx + 1), np.int32)
    for r, (d, begin, end, _) in enumerate(group):
      tokens[r, :end + 1 - begin] = docs[d][begin:end + 1]
    nll = P.stream_nll(graphdef, params, tokens, chunk, step_fn=step_fn, init_fn=init_fn,
                       progress=progress)
    for r, (d, begin, end, first) in enumerate(group):
      out[d][first:end] = nll[r, first - begin:end - begin]
  return out


def window_count(docs: Sequence[np.ndarray], ctx: int, stride: int) -> int:
  return sum(len(stride_windows(len(doc), ctx, stride)) for doc in docs)


def evaluate_strided(graphdef, params, model_cfg: ml_collections.ConfigDict,
                     docs: Sequence[np.ndarray], ctxs: Sequence[int], stride: int, *, chunk: int,
                     batch_size: int, progress: bool = True,
                     echo: Callable[[str], None] | None = print) -> dict:
  """Strided perplexity of whole documents at every context length in `ctxs`:
  {"stride", "contexts": [{"ctx", "stride", "mean_nll", "ppl", "tokens", "docs", "windows",
  "chunk", "seconds"}]}; `tokens` = sum of (len(doc) - 1), every position once."""
  ctxs = sorted(ctxs)
  check_stride(stride, ctxs)
  align = P.stream_alignment(model_cfg)
  chunks = {L: P.chunk_for(L, chunk, align) for L in ctxs}  # fail before any compute
  step_fn, init_fn = P.make_chunk_step(graphdef), P.make_init_cache(graphdef)
  per_ctx = []
  for L in ctxs:
    t0 = time.perf_counter()
    n = window_count(docs, L, stride)
    rows = whole_shares(params, max(1, min(batch_size, n)))
    bar = tqdm(total=-(-n // rows) * rows * L, desc=f"strided ctx {L}", unit="tok",
               unit_scale=True, disable=not progress, dynamic_ncols=True, leave=False)
    nll = np.concatenate(strided_nll(graphdef, params, docs, L, stride, chunk=chunks[L],
                                     batch_size=batch_size, step_fn=step_fn, init_fn=init_fn,
                                     progress=bar))
    bar.close()
    mean = float(nll.astype(np.float64).mean())
    summary = {"ctx": L, "stride": stride, "mean_nll": mean, "ppl": float(np.exp(mean)),
               "tokens": int(nll.size), "docs": len(docs), "windows": n, "chunk": chunks[L],
               "seconds": round(time.perf_counter() - t0, 3)}
    per_ctx.append(summary)
    if echo is not None:
      echo(f"ctx {L:>7}, stride {stride}: ppl {summary['ppl']:9.3f}  nll {mean:.4f}  "
           f"({summary['tokens']:,} tokens in {n:,} windows, {summary['seconds']:.1f}s)")
  return {"stride": stride, "contexts": per_ctx}


def evaluate_run(run: Run, ctxs: Sequence[int], *, stride: int | None = None,
                 option: str = "--stride", chunk: int | None = None,
                 batch_size: int | None = None, progress: bool = True,
                 echo: Callable[[str], None] | None = print, **kwargs) -> dict:
  """`perplexity.evaluate_run` (the per-length table; `kwargs`: data, split, max_docs) and, with
  a stride (default eval.stride; 0 = none), the strided perplexity at each context length over
  the same documents, whole: results key "strided". `option` names the stride in errors."""
  ev = run.config.eval
  stride = ev.stride if stride is None else stride
  chunk = ev.chunk if chunk is None else chunk
  batch_size = ev.batch_size if batch_size is None else batch_size
  common = dict(chunk=chunk, batch_size=batch_size, progress=progress, echo=echo)
  if not stride:
    return P.evaluate_run(run, ctxs, **common, **kwargs)
  check_stride(stride, ctxs, option)

  def strided(docs: P.EvalDocs) -> dict:
    return {"strided": evaluate_strided(run.graphdef, run.params, run.config.model, docs.whole,
                                        ctxs, stride, **common)}

  return P.evaluate_run(run, ctxs, **common, **kwargs, extra=strided)
