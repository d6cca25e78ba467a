"""Needle-in-a-haystack retrieval at each context length and depth (passkey / single-needle task).

Task. A key-value fact, the needle `\\nThe secret number of <name> is <number>.\\n`, sits in a
haystack of real text; the prompt ends with the question `\\nWhat is the secret number of <name>?
The secret number of <name> is` and the answer is ` <number>`. Names are "<first> <last>" pairs,
numbers 10000-99999. Both are split once, by a hash of their text, into an evaluation quarter and
a training remainder (`partition`), so a model fine-tuned on the task format (`--train_task`,
eval/needle_train.py) has never seen an evaluated needle's name or number: retrieval, not recall.

Placement, in tokens, deterministic. A prompt has exactly `ctx` tokens: BOS, H haystack tokens
with the needle inserted, the question; H = ctx - 1 - len(needle) - len(question). The haystack is
H consecutive tokens of the source's token stream with its document markers (BOS/EOS/PAD) taken
out, from an offset the seed draws. The needle starts after haystack token round(depth * H) (half
up), moved to the nearest line start within min(16, H // 16) tokens so that it does not split a
word or a line (none there: exactly round(depth * H)); depth 0 and 100 % are the very start and
the very end of the haystack. One generator per (seed, ctx, needle index) draws the name, the
number, the distractors and the offset, so every depth of a context length reads the same needles
in the same haystacks: depth is the only thing that changes along a row of the grid.

Scoring. (a) Exact match: the greedy continuation (eval/generate.py:Generator, streaming with the
state carried, so E2E runs its inner loop while it reads) starts with the number: the first run of
digits after optional white space equals it. (b) Candidates: the log-probability of ` <number>`
and of K distractor numbers (same partition, distinct) after the prompt; the answer's rank among
the K + 1 (a tie counts against it), accuracy = rank 1 (chance 1 / (K + 1)), and its mean
log-probability. The prompt is streamed once in whole inner mini-batches (perplexity.py's
log-prob step), which gives every candidate's first token; each candidate then continues a copy
of that state token by token (its last token, a target only, never enters the state).
"""

from __future__ import annotations

import dataclasses
import functools
import hashlib
import re
import time
import zlib
from collections.abc import Callable, Sequence

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
from tqdm.auto import tqdm

from ttt_jax.config import ConfigError
from ttt_jax.data.tokenizers import Tokenizer
from ttt_jax.eval import perplexity as P
from ttt_jax.eval.generate import Generator

FIRST_NAMES = ("Amara", "Bodil", "Caspian", "Dalia", "Emeka", "Farida", "Gideon", "Hana", "Ilse",
               "Joaquin", "Kofi", "Leona", "Matteo", "Nadia", "Orla", "Priya", "Quentin",
               "Rosalind", "Soren", "Tamsin", "Umar", "Valeria", "Wren", "Xiomara", "Yusuf",
               "Zofia", "Anselm", "Beatrix", "Cyrus", "Delphine", "Elio", "Freya")
LAST_NAMES = ("Abernathy", "Bergstrom", "Castellanos", "Dimitriou", "Eriksen", "Fairweather",
              "Gallagher", "Halvorsen", "Iwasaki", "Jankowski", "Kowalczyk", "Lindqvist",
              "Marchetti", "Nakamura", "Okonkwo", "Petrovic", "Quintero", "Rasmussen", "Szabo",
              "Thorne", "Underwood", "Vasquez", "Whitlock", "Yamamoto")
NUMBERS = (10000, 100000)  # five-digit secret numbers, [low, high)
EVAL, TRAIN = "eval", "train"  # the two disjoint partitions of names and numbers
SNAP = 16  # a needle moves to a line start at most this many tokens (and H // 16) away
NEEDLE = "\nThe secret number of {name} is"
AFTER = ".\n"
QUESTION = "\nWhat is the secret number of {name}? The secret number of {name} is"
ANSWER = " {number}"


# -- names, numbers, prompts --------------------------------------------------------------------
def _is_eval(text: str) -> bool:
  """A quarter of all names / numbers, chosen by a hash of the text (no pattern a model could
  learn, such as a digit or a range, separates the partitions)."""
  return zlib.crc32(text.encode()) % 4 == 0


@functools.cache
def partition(part: str) -> tuple[tuple[str, ...], np.ndarray]:
  """(names, numbers) of partition EVAL or TRAIN; the two are disjoint."""
  keep = part == EVAL
  names = tuple(n for n in (f"{f} {s}" for f in FIRST_NAMES for s in LAST_NAMES)
                if _is_eval(n) == keep)
  numbers = np.array([n for n in range(*NUMBERS) if _is_eval(str(n)) == keep], np.int64)
  return names, numbers


@dataclasses.dataclass(frozen=True)
class Needle:
  """One drawn fact and its token pieces (the answer's ids are the very ones in the needle)."""

  name: str
  number: int
  distractors: tuple[int, ...]
  needle: np.ndarray  # int32: NEEDLE + ANSWER + AFTER
  question: np.ndarray  # int32
  answer: np.ndarray  # int32: ANSWER
  candidates: tuple[np.ndarray, ...]  # the answer, then the distractors' ANSWER tokens


@dataclasses.dataclass(frozen=True)
class NeedlePrompt:
  needle: Needle
  tokens: np.ndarray  # int32 [ctx]: BOS, haystack with the needle, question
  depth: float  # fraction of the haystack before the needle (0..1)
  needle_start: int  # index in `tokens` of the needle's first token
  target_start: int  # 1 + round(depth * H): where it starts before moving to a line start


def draw_needle(tok: Tokenizer, rng: np.random.Generator, part: str = EVAL,
                distractors: int = 0) -> Needle:
  names, numbers = partition(part)
  name = names[int(rng.integers(len(names)))]
  picks = [int(n) for n in numbers[rng.choice(len(numbers), distractors + 1, replace=False)]]
  enc = lambda text: np.asarray(tok.encode(text), np.int32)  # noqa: E731
  cands = tuple(enc(ANSWER.format(number=n)) for n in picks)
  needle = np.concatenate([enc(NEEDLE.format(name=name)), cands[0], enc(AFTER)])
  return Needle(name, picks[0], tuple(picks[1:]), needle, enc(QUESTION.format(name=name)),
                cands[0], cands)


def haystack_tokens(stream, tok: Tokenizer) -> np.ndarray:
  """A split's token stream without its document markers: running text to cut haystacks from."""
  tokens = np.asarray(stream.tokens)
  return tokens[~np.isin(tokens, [tok.bos_id, tok.eos_id, tok.pad_id])].astype(np.int32)


def line_start_near(window: np.ndarray, target: int, tok: Tokenizer) -> int:
  """The line start (or either end) of `window` nearest to `target` within min(SNAP, H // 16)
  tokens, the earlier on a tie; `target` itself when there is none."""
  h = len(window)
  reach = min(SNAP, h // 16)
  starts = [p for p in range(max(0, target - reach), min(h, target + reach) + 1)
            if p in (0, h) or tok.decode([int(window[p - 1])]).endswith("\n")]
  return min(starts, key=lambda p: (abs(p - target), p)) if starts else target


def place_needle(needle: Needle, hay: np.ndarray, tok: Tokenizer, ctx: int, depth: float,
                 rng: np.random.Generator, what: str = "") -> NeedlePrompt:
  """The prompt of exactly `ctx` tokens with `needle` at `depth` (module docstring). `what`
  names the length in errors (default `--ctx <ctx>`)."""
  what = what or f"--ctx {ctx}"
  h = ctx - 1 - len(needle.needle) - len(needle.question)
  if h < 1:
    raise ConfigError(f"{what} is too short: the needle and the question alone take "
                      f"{ctx - h - 1} tokens; use a context of at least {ctx - h + 31} tokens")
  if len(hay) < h:
    raise ConfigError(f"{what} needs a haystack of {h} tokens but the text has only "
                      f"{len(hay)}; use a shorter context or more text")
  offset = int(rng.integers(0, len(hay) - h + 1))
  window = hay[offset:offset + h]
  target = int(depth * h + 0.5)
  pos = line_start_near(window, target, tok)
  tokens = np.concatenate([[tok.bos_id], window[:pos], needle.needle, window[pos:],
                           needle.question]).astype(np.int32)
  return NeedlePrompt(needle, tokens, depth, 1 + pos, 1 + target)


def grid_prompts(hay: np.ndarray, tok: Tokenizer, ctxs: Sequence[int], depths: Sequence[float],
                 needles: int, distractors: int, seed: int) -> dict[tuple[int, float], list]:
  """The evaluation prompts of every (ctx, depth) cell: `needles` each, from partition EVAL."""
  out: dict[tuple[int, float], list[NeedlePrompt]] = {}
  for ctx in ctxs:
    for depth in depths:
      cell = []
      for i in range(needles):
        rng = np.random.default_rng([seed, ctx, i])  # the same draws at every depth
        needle = draw_needle(tok, rng, EVAL, distractors)
        cell.append(place_needle(needle, hay, tok, ctx, depth, rng))
      out[ctx, depth] = cell
  return out


def training_batch(hay: np.ndarray, tok: Tokenizer, length: int, batch: int,
                   rng: np.random.Generator) -> dict[str, np.ndarray]:
  """Fine-tuning rows of `length` + 1 tokens from partition TRAIN at uniform random depths: each
  a prompt followed by its answer, which ends the row. `loss_mask` [B, length] is 1 on the answer
  tokens only; `inner_loss_mask` (all ones) lets an E2E inner loop read the whole prompt, as it
  does at evaluation."""
  rows, mask = [], np.zeros((batch, length), np.float32)
  for b in range(batch):
    needle = draw_needle(tok, rng, TRAIN)
    n = len(needle.answer)
    prompt = place_needle(needle, hay, tok, length + 1 - n, float(rng.uniform()), rng,
                          f"the fine-tuning length (--ft_seq_len, default data.seq_len) {length}")
    rows.append(np.concatenate([prompt.tokens, needle.answer]))
    mask[b, length - n:] = 1.0
  return {"tokens": np.stack(rows).astype(np.int32), "loss_mask": mask,
          "inner_loss_mask": np.ones_like(mask)}


def prompt_fingerprint(prompts: dict) -> str:
  """sha1 of every prompt and candidate, in grid order: equal means identical prompts."""
  h = hashlib.sha1()
  for cell in prompts.values():
    for p in cell:
      h.update(p.tokens.tobytes())
      for c in p.needle.candidates:
        h.update(c.tobytes())
  return h.hexdigest()[:16]


# -- options ------------------------------------------------------------------------------------
def parse_ctxs(text: str) -> list[int]:
  """'256,512,1k' -> [256, 512, 1024]; one line naming --ctx otherwise."""
  try:
    return P.parse_ctx_list(text)
  except ConfigError:
    raise ConfigError(f"--ctx {text!r}: expected a comma list of positive context lengths like "
                      "256,512,1k") from None


def parse_depths(text: str) -> list[float]:
  """'0,25,50,75,100' (percent of the haystack before the needle) -> [0.0, 0.25, ..., 1.0]."""
  try:
    pcts = sorted({float(v) for v in text.split(",") if v.strip()})
  except ValueError:
    pcts = []
  if not pcts or not all(0 <= p <= 100 for p in pcts):  # nan too
    raise ConfigError(f"--depths {text!r}: expected a comma list of percentages in [0, 100] "
                      "like 0,25,50,75,100")
  return [p / 100 for p in pcts]


def needle_chunk(ctx: int, chunk: int, align: int) -> int:
  """The streamed chunk at `ctx`: the largest multiple of the model's inner mini-batch `align`
  that divides ctx and is at most `chunk` (so every chunk is whole). A context that is not a
  whole number of mini-batches cannot be streamed that way: one line naming --ctx."""
  if ctx % align:
    lo, hi = ctx // align * align, -(-ctx // align) * align
    raise ConfigError(f"--ctx {ctx}: this model streams whole inner mini-batches of {align} "
                      f"tokens, so a context must be a multiple of {align} (e.g. "
                      f"{f'{lo} or ' if lo else ''}{hi})")
  n = ctx // align
  best = max(d for d in range(1, n + 1) if n % d == 0 and d * align <= max(chunk, align))
  return P.chunk_for(ctx, best * align, align)


def context_chunks(model_cfg: ml_collections.ConfigDict, ctxs: Sequence[int],
                   chunk: int) -> dict[int, int]:
  """{ctx: streamed chunk} for a model; one line naming --ctx for a length it cannot stream."""
  align = P.stream_alignment(model_cfg)
  return {ctx: needle_chunk(ctx, chunk, align) for ctx in ctxs}


# -- scoring ------------------------------------------------------------------------------------
class NeedleScorer:
  """A model ready to answer needle prompts: its compiled steps are built once and reused by
  every cell (streaming step of perplexity.py, generation step of generate.py)."""

  def __init__(self, graphdef, params, model_cfg: ml_collections.ConfigDict, *, chunk: int):
    self.graphdef, self.params, self.chunk = graphdef, params, chunk
    self.align = P.stream_alignment(model_cfg)
    self.step_fn = P.make_chunk_step(graphdef)
    self.logprob_fn = P.make_logprob_step(graphdef)
    self.init_fn = P.make_init_cache(graphdef)
    self.generator = Generator(graphdef, params, model_cfg, chunk=chunk)

  def candidate_logprobs(self, prompts: np.ndarray, cands: np.ndarray,
                         lengths: np.ndarray) -> np.ndarray:
    """log p(candidate | prompt) [B, C] of `cands` [B, C, A] (row b's candidate c is its first
    `lengths[b, c]` tokens) after `prompts` [B, ctx]: the prompt is streamed once, and each
    candidate continues a copy of its state token by token (module docstring)."""
    b, ctx = prompts.shape
    c, a = needle_chunk(ctx, self.chunk, self.align), cands.shape[2]
    cache = self.init_fn(self.params, b, ctx + a)
    for s in range(0, ctx, c):  # whole chunks: ctx is a multiple of c
      first, cache = self.logprob_fn(self.params, cache, prompts[:, s:s + c], jnp.int32(s))
    first = np.asarray(first, np.float64)
    out = np.zeros(cands.shape[:2], np.float64)
    for j in range(cands.shape[1]):
      nll = np.zeros((b, a), np.float64)
      nll[:, 0] = -np.take_along_axis(first, cands[:, j, :1].astype(np.int64), axis=1)[:, 0]
      if a > 1:  # the candidate's own tokens but its last (targets never enter the cache)
        state = jax.tree.map(jnp.copy, cache)
        nll[:, 1:], _ = P.stream_with_cache(self.graphdef, self.params, cands[:, j], 1,
                                            step_fn=self.step_fn, cache=state, start=ctx)
      out[:, j] = -(nll * (np.arange(a) < lengths[:, j, None])).sum(axis=1)
    return out

  def greedy(self, prompts: np.ndarray, max_new_tokens: int, eos_id: int | None) -> np.ndarray:
    return self.generator(prompts, max_new_tokens, eos_id=eos_id)


def score_prompts(scorer: NeedleScorer, prompts: Sequence[NeedlePrompt], tok: Tokenizer,
                  batch_size: int) -> list[dict]:
  """One record per prompt: greedy continuation, exact match, answer rank and log-prob."""
  records = []
  for i in range(0, len(prompts), batch_size):
    part = prompts[i:i + batch_size]
    x = np.stack([p.tokens for p in part])
    n_cand = len(part[0].needle.candidates)
    width = max(len(c) for p in part for c in p.needle.candidates)
    cands = np.zeros((len(part), n_cand, width), np.int32)
    lengths = np.zeros((len(part), n_cand), np.int32)
    for r, p in enumerate(part):
      for j, c in enumerate(p.needle.candidates):
        cands[r, j, :len(c)], lengths[r, j] = c, len(c)
    logp = scorer.candidate_logprobs(x, cands, lengths)
    new = scorer.greedy(x, max(len(p.needle.answer) for p in part) + 2, tok.eos_id)
    for r, p in enumerate(part):
      row = new[r]
      stop = np.flatnonzero(row == tok.eos_id)
      text = tok.decode(row[:stop[0]] if len(stop) else row)
      digits = re.match(r"\s*(\d+)", text)
      records.append({
          "name": p.needle.name, "number": p.needle.number, "needle_start": p.needle_start,
          "greedy": text, "exact": bool(digits and digits.group(1) == str(p.needle.number)),
          "rank": 1 + int((~(logp[r, 1:] < logp[r, 0])).sum()),  # ties, NaN: against it
          "answer_logprob": float(logp[r, 0])})
  return records


def cell_summary(ctx: int, depth: float, chunk: int, records: list[dict]) -> dict:
  return {"ctx": ctx, "depth": round(depth * 100, 6), "chunk": chunk, "needles": len(records),
          "exact_match": float(np.mean([r["exact"] for r in records])),
          "candidate_accuracy": float(np.mean([r["rank"] == 1 for r in records])),
          "mean_rank": float(np.mean([r["rank"] for r in records])),
          "mean_answer_logprob": float(np.mean([r["answer_logprob"] for r in records])),
          "records": records}


# -- whole evaluation ---------------------------------------------------------------------------
def evaluate_needles(graphdef, params, model_cfg: ml_collections.ConfigDict, tok: Tokenizer,
                     hay: np.ndarray, ctxs: Sequence[int], depths: Sequence[float], *,
                     needles: int, distractors: int, seed: int, chunk: int, batch_size: int,
                     progress: bool = True, echo: Callable[[str], None] | None = print,
                     partial: Callable[[dict], None] | None = None) -> dict:
  """Every (ctx, depth) cell of the grid (`depths` as fractions): summaries and per-needle
  records, "complete": True. Bad context lengths fail before anything is computed. `partial`
  gets the results so far ("complete": False) after each cell."""
  chunks = context_chunks(model_cfg, ctxs, chunk)
  prompts = grid_prompts(hay, tok, ctxs, depths, needles, distractors, seed)
  scorer = NeedleScorer(graphdef, params, model_cfg, chunk=chunk)
  task = {"ctxs": list(ctxs), "depths": [round(d * 100, 6) for d in depths],
          "needles": needles, "distractors": distractors, "chance": 1 / (distractors + 1),
          "seed": seed, "needle": NEEDLE + ANSWER + AFTER, "question": QUESTION,
          "answer": ANSWER, "snap_tokens": SNAP}
  res = {"task": task, "prompt_fingerprint": prompt_fingerprint(prompts), "cells": [],
         "complete": False}
  bar = tqdm(total=len(prompts) * needles, desc="needles", unit="prompt", disable=not progress,
             dynamic_ncols=True, leave=False)
  for (ctx, depth), cell in prompts.items():
    t0 = time.perf_counter()
    summary = cell_summary(ctx, depth, chunks[ctx], score_prompts(scorer, cell, tok, batch_size))
    summary["seconds"] = round(time.perf_counter() - t0, 3)
    res["cells"].append(summary)
    bar.update(len(cell))
    if echo is not None:
      (tqdm.write if echo is print else echo)(
          f"ctx {ctx:>6} depth {depth * 100:5.1f}%: exact match {summary['exact_match']:.2f}, "
          f"candidates {summary['candidate_accuracy']:.2f} (mean rank "
          f"{summary['mean_rank']:.2f}), answer log-prob {summary['mean_answer_logprob']:.3f}")
    if partial is not None and len(res["cells"]) < len(prompts):
      partial(res)
  bar.close()
  return {**res, "complete": True}
