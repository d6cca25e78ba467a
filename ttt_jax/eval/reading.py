"""Reading curves: how the loss at position p of a whole document (a book, a long source file)
changes as the model reads it from the first token to the last.

Each document is streamed once (batch 1, chunks of `eval.chunk`, the cache carried:
`perplexity.stream_chunks`, the loop every evaluation uses), and the NLL of every position is
summed into log-spaced position buckets [0, b), [b, 2b), [2b, 4b), ... (`perplexity.bucket_edges`,
b = `eval.first_bucket`) as soon as its chunk is scored. What is kept per document is those sums,
never a per-position array, so reading a 1M-token document costs the memory of the model's cache
alone: constant for SWA / TTT / E2E, a KV cache of `capacity` positions for full attention (a
longer document is truncated to it, and the output says so).

The length of a document is the number of positions scored: `[BOS] text [EOS]` has
len(text tokens) + 1 of them. The curve is, per bucket, the mean NLL over every scored position
of every document that reaches the bucket (token-weighted). Its "reading slope" is the
least-squares slope of the bucket means against log2(position) (the bucket's geometric middle)
over the buckets after the first: nats per doubling of the position read; negative means the
model keeps gaining from what it has read, zero that it stopped using the context.
"""

from __future__ import annotations

import argparse
import math
import time
from collections.abc import Callable, Sequence

import ml_collections
import numpy as np
from tqdm.auto import tqdm

from ttt_jax.config import ConfigError, parse_ctx
from ttt_jax.eval import perplexity as P
from ttt_jax.layers.mixers import mixer_spec
from ttt_jax.runs.load import Run

DEFAULT_MIN_LEN = 64 * 1024  # reading curves are about book-length documents


def parse_length(text: str) -> int:
  """argparse type: a positive token count such as 4096, 64k or 1m."""
  s = str(text).strip().lower()
  try:
    value = int(float(s[:-1]) * 1024 * 1024) if s.endswith("m") else parse_ctx(s)
  except (ValueError, ConfigError):
    value = 0
  if value < 1:
    raise argparse.ArgumentTypeError(f"expected a length like 4096, 64k or 1m, got {text!r}")
  return value


class PositionSums:
  """Running NLL sums per position bucket: O(buckets) memory whatever the documents' lengths."""

  def __init__(self, edges: Sequence[int]):
    self.edges = np.asarray(edges, np.int64)
    k = len(self.edges) - 1
    self.nll = np.zeros(k, np.float64)
    self.tokens = np.zeros(k, np.int64)
    self.docs = np.zeros(k, np.int64)  # documents that reach each bucket
    self.longest = 0

  def add(self, start: int, nll: np.ndarray) -> None:
    """Adds the NLL of positions start, start + 1, ... (`nll` [n])."""
    k = len(self.nll)
    idx = np.searchsorted(self.edges, np.arange(start, start + len(nll)), side="right") - 1
    self.nll += np.bincount(idx, weights=np.asarray(nll, np.float64), minlength=k)
    self.tokens += np.bincount(idx, minlength=k)

  def end_document(self, length: int) -> None:
    self.docs += self.edges[:-1] < length
    self.longest = max(self.longest, length)

  def buckets(self) -> list[dict]:
    """[{start, end, mean_nll, tokens, docs}] of the buckets any document reached."""
    return [{"start": int(lo), "end": int(min(hi, self.longest)), "mean_nll": float(s / n),
             "tokens": int(n), "docs": int(d)}
            for lo, hi, s, n, d in zip(self.edges[:-1], self.edges[1:], self.nll, self.tokens,
                                       self.docs, strict=True) if n]


def reading_slope(buckets: Sequence[dict]) -> float | None:
  """Least-squares slope of mean NLL vs log2(position) over the buckets after the first (module
  docstring); None with fewer than two such buckets."""
  pts = [(0.5 * math.log2(b["start"] * b["end"]), b["mean_nll"]) for b in buckets
         if b["start"] > 0]
  if len(pts) < 2:
    return None
  x, y = np.asarray(pts, np.float64).T
  return float(np.polyfit(x, y, 1)[0])


def grows_with_length(model_cfg: ml_collections.ConfigDict) -> bool:
  """Whether the model's streaming state grows with the context: full attention's KV cache."""
  return mixer_spec(model_cfg.mixer).state_grows


def read_documents(graphdef, params, model_cfg: ml_collections.ConfigDict,
                   docs: Sequence[tuple[str, np.ndarray]], *, chunk: int, first_bucket: int,
                   capacity: int | None = None, progress: bool = True) -> dict:
  """Streams each (name, tokens [n + 1] starting at BOS) document once and returns the reading
  curve: {"buckets", "reading_slope", "documents": [{name, tokens, mean_nll}], "tokens",
  "mean_nll", "kv_capacity"}.

  Documents must already fit `capacity` when the model is full attention (`read_run` truncates
  them); the KV cache is then one fixed size, so one compiled step serves every document.
  """
  align = P.stream_alignment(model_cfg)
  if chunk % align:
    raise ConfigError(f"--chunk {chunk} must be a multiple of the model's inner mini-batch size "
                      f"{align}")
  lengths = [len(t) - 1 for _, t in docs]
  kv = chunk  # ignored by windowed / recurrent mixers: their state has a fixed size
  if grows_with_length(model_cfg):
    capacity = max(lengths) if capacity is None else capacity
    if max(lengths) > capacity:
      raise ConfigError(f"a document of {max(lengths)} tokens does not fit the full-attention KV "
                        f"capacity {capacity}; truncate it (read_run does)")
    kv = -(-capacity // chunk) * chunk
  sums = PositionSums(P.bucket_edges(max(lengths), first_bucket))
  step_fn, init_fn = P.make_chunk_step(graphdef), P.make_init_cache(graphdef)
  bar = tqdm(total=sum(lengths), desc="reading", unit="tok", unit_scale=True,
             disable=not progress, dynamic_ncols=True, leave=False)
  per_doc = []
  for (name, tokens), length in zip(docs, lengths, strict=True):
    total = 0.0
    for start, nll in P.stream_chunks(graphdef, params, tokens[None], chunk, step_fn=step_fn,
                                      init_fn=init_fn, capacity=kv, progress=bar):
      sums.add(start, nll[0])
      total += float(nll.sum(dtype=np.float64))
    sums.end_document(length)
    per_doc.append({"name": name, "tokens": length, "mean_nll": total / length})
  bar.close()
  buckets = sums.buckets()
  scored = int(sums.tokens.sum())
  return {"buckets": buckets, "reading_slope": reading_slope(buckets), "documents": per_doc,
          "tokens": scored, "mean_nll": float(sums.nll.sum() / scored),
          "kv_capacity": kv if grows_with_length(model_cfg) else None}


def read_run(run: Run, *, data: str | None = None, split: str | None = None,
             min_len: int = DEFAULT_MIN_LEN, max_docs: int | None = None,
             max_len: int | None = None, capacity: int | None = None, chunk: int | None = None,
             progress: bool = True, echo: Callable[[str], None] | None = print) -> dict:
  """The reading curve of a trained run over the first `max_docs` documents (stream order) of at
  least `min_len` tokens in `split` of the run's data (default validation) or of the source
  `data` (default split all), each truncated to `max_len` (and, for full attention, to the KV
  `capacity`, default max(eval.ctx)). Shorter documents are counted and reported."""
  ev, m = run.config.eval, run.config.model
  max_docs = ev.max_docs if max_docs is None else max_docs
  chunk = ev.chunk if chunk is None else chunk
  src = P.open_source(run, data, split)
  stream = src.stream
  what = f"of {src.dataset.source} ({src.split})"
  lengths = stream.doc_lengths - 1  # positions scored per document
  idx = np.flatnonzero(lengths >= min_len)[:max_docs]
  short = P.passed_over(lengths, idx, max_docs, min_len)
  if not len(idx):
    raise ConfigError(f"--min_len {min_len}: none of the documents {what} is that long (the "
                      f"longest has {int(lengths.max())} tokens); lower --min_len")
  limit = max_len
  if grows_with_length(m):
    capacity = max(P.parse_ctx_list(ev.ctx)) if capacity is None else capacity
    limit = capacity if limit is None else min(limit, capacity)
  docs = [(stream.names[i], stream.tokens[s:s + 1 + min(int(lengths[i]), limit or lengths[i])])
          for i, s in zip(idx, stream.doc_starts[idx], strict=True)]
  wanted = lengths[idx] if max_len is None else np.minimum(lengths[idx], max_len)
  cut = int(sum(wanted > capacity)) if grows_with_length(m) else 0
  if echo is not None:
    if capacity is not None and not grows_with_length(m):
      echo(f"note: --capacity is ignored: {m.kind}/{m.mixer} keeps a fixed-size state")
    echo(f"{run.workdir} (step {run.step}, {m.kind}/{m.mixer}): reading "
         f"{P.count_of(len(docs), 'document')} {what} with >= {min_len:,} tokens, chunk {chunk}")
    if len(short):
      echo(P.skipped_note(len(short), int(short.max()), min_len))
    if cut:
      echo(f"full attention: {P.count_of(cut, 'document')} truncated to the KV capacity "
           f"{capacity:,} tokens (--capacity)")
  t0 = time.perf_counter()
  out = read_documents(run.graphdef, run.params, m, docs, chunk=chunk,
                       first_bucket=ev.first_bucket, capacity=capacity, progress=progress)
  return {**P.run_header(run, src), "chunk": chunk, "min_len": min_len, "max_len": max_len,
          "max_docs": max_docs, "docs": len(docs), "skipped_short": len(short),
          "longest_skipped": int(short.max()) if len(short) else 0,
          "truncated_to_capacity": cut, **out, "seconds": round(time.perf_counter() - t0, 3)}


def write_reading(results: dict | list, path: str) -> str:
  """Writes reading results as JSON at `path` (under a run's eval/ folder). Returns the path."""
  return P.write_json(results, path)
