"""The needle grid (eval/needle.py) on a loaded run: the haystack text, the grid checked before
anything is computed (or fine-tuned), the results file."""

from __future__ import annotations

import os
from collections.abc import Callable, Sequence
from typing import NamedTuple

import numpy as np

from ttt_jax.eval import needle as N
from ttt_jax.eval import perplexity as P
from ttt_jax.runs.load import Run


class Grid(NamedTuple):
  source: P.Source  # the haystacks' documents
  hay: np.ndarray  # their running text without document markers


def check_grid(run: Run, ctxs: Sequence[int], depths: Sequence[float], *,
               data: str | None = None, split: str | None = None, needles: int = 4,
               distractors: int = 9, seed: int = 0, chunk: int | None = None) -> Grid:
  """Reads the haystack text and builds every prompt of the grid (cheap), so that a context
  length the model cannot stream or the text cannot fill fails in one line naming --ctx (or
  --data) before anything is computed, fine-tuning included."""
  N.context_chunks(run.config.model, ctxs, run.config.eval.chunk if chunk is None else chunk)
  src = P.open_source(run, data, split)
  hay = N.haystack_tokens(src.stream, run.data.tokenizer)
  N.grid_prompts(hay, run.data.tokenizer, ctxs, depths, needles, distractors, seed)
  return Grid(src, hay)


def evaluate_run(run: Run, ctxs: Sequence[int], depths: Sequence[float], *,
                 data: str | None = None, split: str | None = None, needles: int = 4,
                 distractors: int = 9, seed: int = 0, chunk: int | None = None,
                 batch_size: int | None = None, progress: bool = True,
                 echo: Callable[[str], None] | None = print,
                 partial: Callable[[dict], None] | None = None) -> dict:
  """The grid on a loaded run, haystacks from `split` (default validation) of its data or of
  the source `data` (default split: all of it). `partial` gets the results so far after each
  cell ("complete": False)."""
  chunk = run.config.eval.chunk if chunk is None else chunk
  grid = check_grid(run, ctxs, depths, data=data, split=split, needles=needles,
                    distractors=distractors, seed=seed, chunk=chunk)
  tok, m = run.data.tokenizer, run.config.model
  if echo is not None:
    echo(f"{run.workdir} (step {run.step}, {m.kind}/{m.mixer}): haystacks from "
         f"{grid.source.dataset.source} ({grid.source.split}, {len(grid.hay):,} tokens), "
         f"{needles} needles x {len(ctxs)} contexts x {len(depths)} depths, "
         f"{distractors} distractors")
  head = P.run_header(run, grid.source)
  res = N.evaluate_needles(
      run.graphdef, run.params, m, tok, grid.hay, ctxs, depths, needles=needles,
      distractors=distractors, seed=seed, chunk=chunk,
      batch_size=run.config.eval.batch_size if batch_size is None else batch_size,
      progress=progress, echo=echo,
      partial=None if partial is None else lambda r: partial({**head, **r}))
  return {**head, **res}


def write_results(res: dict | list, directory: str, name: str = "needle.json") -> str:
  """Writes `directory/<name>` (a run's eval/ folder or --out; never the checkpoints). Returns
  its path."""
  return P.write_json(res, os.path.join(directory, name))
