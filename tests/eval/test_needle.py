"""Needle-in-a-haystack: deterministic placement in tokens, disjoint train / eval needles, scoring
on hand-made models whose answers are known, candidate log-probs vs a one-shot forward, the loss
mask the fine-tuning relies on, the command line end to end (with --train_task)."""

from __future__ import annotations

import json
import os
import pathlib
import runpy

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import nnx

from ttt_jax.config import ConfigError, build_config
from ttt_jax.data.pipeline import TokenStream
from ttt_jax.data.tokenizers import ByteTokenizer
from ttt_jax.eval import needle as N
from ttt_jax.eval import needle_train
from ttt_jax.eval import perplexity as P
from ttt_jax.models import build_model
from ttt_jax.models.lm import split_batch
from ttt_jax.runs.load import load_run
from ttt_jax.train.trainer import Trainer

TOK = ByteTokenizer()
LINES = [f"line {i}: {' '.join(f'w{i}x{j}' for j in range(1 + i % 7))}\n" for i in range(400)]
HAY = N.haystack_tokens(TokenStream(TOK.encode("".join(LINES)), np.zeros(1, np.int64),
                                    ("hay",)), TOK)
FLAT = np.asarray(TOK.encode("".join(line.strip() + " " for line in LINES)), np.int32)
SCRIPT = pathlib.Path(__file__).resolve().parents[2] / "scripts" / "needle.py"
FULL = build_config("model=transformer").model  # the model section evaluate_needles reads


def prompts(seed=0, ctxs=(200, 333), depths=(0.0, 0.25, 0.5, 0.75, 1.0), hay=HAY, k=3):
  return N.grid_prompts(hay, TOK, ctxs, depths, needles=3, distractors=k, seed=seed)


# -- placement ----------------------------------------------------------------------------------
def test_prompt_has_ctx_tokens_and_the_needle_at_the_requested_depth():
  for (ctx, depth), cell in prompts().items():
    for p in cell:
      nd, t = p.needle, p.tokens
      h = ctx - 1 - len(nd.needle) - len(nd.question)
      assert len(t) == ctx and t[0] == TOK.bos_id
      assert p.target_start == 1 + int(depth * h + 0.5)
      assert abs(p.needle_start - p.target_start) <= min(N.SNAP, h // 16)
      np.testing.assert_array_equal(t[p.needle_start:p.needle_start + len(nd.needle)], nd.needle)
      np.testing.assert_array_equal(t[-len(nd.question):], nd.question)
      # at the nearest line start (or end of the haystack) within reach, else exactly at depth
      hay = np.concatenate([t[1:p.needle_start], t[p.needle_start + len(nd.needle):-len(
          nd.question)]])
      reach, target = min(N.SNAP, h // 16), p.target_start - 1
      starts = [q for q in range(max(0, target - reach), min(h, target + reach) + 1)
                if q in (0, h) or hay[q - 1] == ord("\n")]
      assert p.needle_start - 1 == (min(starts, key=lambda q: (abs(q - target), q)) if starts
                                    else target)
      assert TOK.decode(nd.needle) == f"\nThe secret number of {nd.name} is {nd.number}.\n"
      assert TOK.decode(nd.question).endswith(f"secret number of {nd.name} is")
    if depth == 0.0:
      assert all(p.needle_start == 1 for p in cell)
    if depth == 1.0:
      assert all(p.tokens[p.needle_start + len(p.needle.needle)] == p.needle.question[0]
                 for p in cell)


def test_without_line_starts_the_needle_is_exactly_at_the_depth():
  for cell in prompts(hay=FLAT).values():
    for p in cell:
      assert p.needle_start == p.target_start


def test_same_seed_same_prompts_other_seed_other_prompts():
  a, b, c = prompts(seed=0), prompts(seed=0), prompts(seed=1)
  fp = N.prompt_fingerprint
  assert fp(a) == fp(b) != fp(c)
  for key in a:
    for x, y, z in zip(a[key], b[key], c[key], strict=True):
      np.testing.assert_array_equal(x.tokens, y.tokens)
      assert x.needle.number == y.needle.number and x.needle.distractors == y.needle.distractors
      assert not np.array_equal(x.tokens, z.tokens)
  # the depths of a context length share their needles and haystack (only the depth changes)
  row = [a[200, d] for d in (0.0, 0.5, 1.0)]
  assert len({tuple(p.needle.number for p in cell) for cell in row}) == 1


def test_train_and_eval_needles_are_disjoint():
  (en, enum), (tn, tnum) = N.partition(N.EVAL), N.partition(N.TRAIN)
  assert not set(en) & set(tn) and not set(enum.tolist()) & set(tnum.tolist())
  assert len(en) + len(tn) == len(N.FIRST_NAMES) * len(N.LAST_NAMES)
  assert len(enum) + len(tnum) == N.NUMBERS[1] - N.NUMBERS[0]
  assert 0.2 < len(enum) / (len(enum) + len(tnum)) < 0.3 and len(en) > 100
  for cell in prompts().values():
    for p in cell:
      assert p.needle.name in en and p.needle.number in enum
      assert set(p.needle.distractors) <= set(enum.tolist())
      assert len({p.needle.number, *p.needle.distractors}) == 4
  batch = N.training_batch(HAY, TOK, 256, 8, np.random.default_rng(0))
  assert batch["tokens"].shape == (8, 257) and batch["loss_mask"].shape == (8, 256)
  assert (batch["inner_loss_mask"] == 1).all()
  for row, mask in zip(batch["tokens"], batch["loss_mask"], strict=True):
    answer = TOK.decode(row[1:][mask == 1])  # the targets the loss sees: the answer only
    assert answer.startswith(" ") and int(answer) in tnum and int(answer) not in enum
    assert TOK.decode(row).endswith(f"is{answer}")


# -- options ------------------------------------------------------------------------------------
def test_options_and_stream_chunks():
  assert N.parse_ctxs("256,512,1k") == [256, 512, 1024]
  assert N.parse_depths("100,0,50") == [0.0, 0.5, 1.0]
  for bad in ("1k,lots", "0", ""):
    with pytest.raises(ConfigError, match="--ctx"):
      N.parse_ctxs(bad)
  for bad in ("0,150", "-5", "half", ""):
    with pytest.raises(ConfigError, match="--depths"):
      N.parse_depths(bad)
  assert N.needle_chunk(768, 512, 1) == 384 and N.needle_chunk(1024, 512, 16) == 512
  assert N.needle_chunk(96, 64, 16) == 48 and N.needle_chunk(48, 8, 16) == 16
  with pytest.raises(ConfigError, match=r"--ctx 100: .* multiple of 16 \(e.g. 96 or 112\)"):
    N.needle_chunk(100, 512, 16)
  with pytest.raises(ConfigError, match="--ctx 60 is too short"):
    prompts(ctxs=(60,))


# -- scoring on models whose answers are known --------------------------------------------------
class CopyModel(nnx.Module):
  """A hand-written induction head (or a constant): it predicts the token that followed the
  earliest earlier occurrence of the last M tokens, so it copies the needle's number after the
  question's "... <name> is". The cache is the history of tokens seen."""

  M = 10

  def __init__(self, constant: bool = False):
    self.constant = constant
    self.unused = nnx.Param(jnp.zeros(()))

  def init_cache(self, batch_size: int, capacity: int):
    return {"hist": jnp.full((batch_size, capacity), -1, jnp.int32)}

  def __call__(self, tokens, positions, cache):
    hist = cache["hist"].at[:, positions].set(tokens)
    cap, m = hist.shape[1], self.M
    back = jnp.arange(m)
    keys = jnp.where((jnp.arange(cap)[:, None] >= back), hist[:, jnp.arange(cap)[:, None] - back],
                     -2)  # [B, cap, M]: the M tokens ending at each position
    query = keys[:, positions]  # [B, T, M]
    match = (query[:, :, None] == keys[:, None]).all(-1)
    match &= jnp.arange(cap)[None, None] < positions[None, :, None]
    first = jnp.argmax(match, axis=-1)
    nxt = jnp.take_along_axis(hist, jnp.minimum(first + 1, cap - 1), axis=1)
    logits = jnp.where(match.any(-1)[..., None], 30.0 * jax.nn.one_hot(nxt, TOK.vocab_size), 0.0)
    if self.constant:
      logits = jnp.zeros_like(logits)
    return logits, {"hist": hist}


@pytest.mark.parametrize("constant", [False, True])
def test_scores_of_a_copying_and_a_constant_model(constant):
  graphdef, state = nnx.split(CopyModel(constant))
  res = N.evaluate_needles(graphdef, nnx.to_pure_dict(state), FULL, TOK, HAY, [160, 256],
                           [0.0, 0.5, 1.0], needles=3, distractors=3, seed=0, chunk=64,
                           batch_size=2, progress=False, echo=None)
  assert len(res["cells"]) == 6 and res["task"]["chance"] == 0.25
  for cell in res["cells"]:
    assert cell["chunk"] == (40 if cell["ctx"] == 160 else 64)  # the largest divisor <= 64
    if constant:  # every candidate equally likely: ties count against the answer
      assert cell["exact_match"] == 0.0 and cell["candidate_accuracy"] == 0.0
      assert cell["mean_rank"] == 4.0
      np.testing.assert_allclose(cell["mean_answer_logprob"], -6 * np.log(TOK.vocab_size),
                                 rtol=1e-5)
    else:
      assert cell["exact_match"] == 1.0 and cell["candidate_accuracy"] == 1.0, cell["records"]
      assert cell["mean_answer_logprob"] > -1e-3
      assert all(r["greedy"].startswith(f" {r['number']}.") for r in cell["records"])


class NaNScorer:
  """Log-probs NaN for every candidate (a diverged model), or only for the answer."""

  def __init__(self, answer_only: bool):
    self.answer_only = answer_only

  def candidate_logprobs(self, prompts, cands, lengths):
    out = np.full(cands.shape[:2], np.nan) if not self.answer_only else -np.ones(cands.shape[:2])
    out[:, 0] = np.nan
    return out

  def greedy(self, prompts, max_new_tokens, eos_id):
    return np.zeros((len(prompts), max_new_tokens), np.int32)


@pytest.mark.parametrize("answer_only", [False, True])
def test_nan_log_probs_never_rank_the_answer_first(answer_only):
  cell = prompts(ctxs=(200,), depths=(0.5,))[200, 0.5]
  records = N.score_prompts(NaNScorer(answer_only), cell, TOK, batch_size=2)
  assert [r["rank"] for r in records] == [4] * 3  # last of the 3 distractors + 1


# -- candidate log-probs are the one-shot forward's ------------------------------------------------
def tiny(kind: str):
  m = build_config(f"model={kind},ctx=64").model
  m.num_layers = 2 if kind == "e2e" else 1
  m.d_model, m.num_heads, m.intermediate_size, m.window, m.init_std = 32, 2, 64, 16, 0.3
  m.ttt.mini_batch_size = 16
  m.e2e.mini_batch_size, m.e2e.suffix_len, m.e2e.prime_intermediate_size = 16, 1, 64
  m.e2e.ilr_init = m.e2e.inner_lr = 0.5
  graphdef, state = nnx.split(build_model(m, seed=3))
  return m, graphdef, nnx.to_pure_dict(state)


@pytest.fixture(scope="module", params=["transformer", "swa", "ttt_linear", "e2e"])
def scoring_case(request):
  """A tiny model of each kind, 2 prompts, 3 candidates each and the reference: the one-shot
  NLL of every prompt + candidate (one forward, shared by the chunk sizes tested)."""
  m, graphdef, params = tiny(request.param)
  rng = np.random.default_rng(0)
  prompt = rng.integers(0, 256, (2, 64)).astype(np.int32)
  cands = rng.integers(0, 256, (2, 3, 5)).astype(np.int32)
  # prompt + candidate j, padded to whole mini-batches: 80 positions; rows j * 2 + b
  seqs = np.concatenate([np.concatenate([prompt, cands[:, j], np.zeros((2, 12), np.int32)],
                                        axis=1) for j in range(3)])
  nll = P.one_shot_nll(graphdef, params, seqs).reshape(3, 2, -1)
  return m, graphdef, params, prompt, cands, nll


@pytest.mark.parametrize("chunk", [32, 64, 512])  # ctx > chunk, ctx == chunk, ctx < chunk
def test_candidate_logprobs_equal_one_shot(scoring_case, chunk):
  m, graphdef, params, prompt, cands, nll = scoring_case
  ctx = prompt.shape[1]
  lengths = np.array([[5, 3, 1], [2, 5, 4]])
  scorer = N.NeedleScorer(graphdef, params, m, chunk=chunk)
  got = scorer.candidate_logprobs(prompt, cands, lengths)
  for j in range(3):
    for b in range(2):
      want = -nll[j, b, ctx - 1:ctx - 1 + lengths[b, j]].astype(np.float64).sum()
      np.testing.assert_allclose(got[b, j], want, rtol=2e-5, atol=2e-5)


# -- the loss mask ------------------------------------------------------------------------------
def test_loss_mask_weights_the_plain_and_the_e2e_meta_loss():
  batch = N.training_batch(HAY, TOK, 256, 2, np.random.default_rng(1))
  batch = {k: jnp.asarray(v) for k, v in batch.items()}
  mask = batch["loss_mask"]
  inputs, targets = split_batch(batch)
  plain = build_model(tiny("swa")[0], seed=0)
  nll = optax.softmax_cross_entropy_with_integer_labels(plain(inputs)[0], targets)
  masked, _ = plain.compute_loss(batch)
  full, _ = plain.compute_loss({"tokens": batch["tokens"]})
  np.testing.assert_allclose(masked, (nll * mask).sum() / mask.sum(), rtol=1e-6)
  np.testing.assert_allclose(full, nll.mean(), rtol=1e-6)
  assert abs(float(masked) - float(full)) > 1e-3

  e2e = build_model(tiny("e2e")[0], seed=0)
  step = jnp.int32(10 ** 6)  # past the inner-LR warmup
  lr = e2e.cfg.e2e.inner_lr
  only, _ = e2e.compute_loss({"tokens": batch["tokens"], "loss_mask": mask}, step)
  reads, _ = e2e.compute_loss(batch, step)  # inner_loss_mask: the inner loop reads every token
  for inner_mask, loss in ((mask, only), (None, reads)):
    out = e2e.meta_forward(inputs, targets, inner_mask, lr)
    np.testing.assert_allclose(loss, (out.nll * mask).sum() / mask.sum(), rtol=1e-5)
  assert abs(float(only) - float(reads)) > 1e-4  # the inner mask changes the inner steps


# -- the command line ---------------------------------------------------------------------------
def test_cli_fine_tunes_evaluates_and_writes(trained_run, tmp_path, capsys):
  main = runpy.run_path(str(SCRIPT))["main"]
  ft = str(tmp_path / "ft")
  args = ["--workdir", trained_run, "--ctx", "160,256", "--depths", "0,50,100", "--needles", "2",
          "--distractors", "3", "--train_task", "2", "--ft_seq_len", "256", "--ft_workdir", ft,
          "--no_progress"]
  main(args)
  out = capsys.readouterr().out
  with open(os.path.join(ft, "eval", "needle.json")) as f:
    res = json.load(f)
  assert os.path.isfile(os.path.join(ft, "eval", "needle.png"))
  assert [(c["ctx"], c["depth"]) for c in res["cells"]] == [
      (x, d) for x in (160, 256) for d in (0.0, 50.0, 100.0)]
  for c in res["cells"]:
    assert 0 <= c["exact_match"] <= 1 and 1 <= c["mean_rank"] <= 4 and len(c["records"]) == 2
  report = res["fine_tune"]
  assert report["steps"] == 2 and report["seq_len"] == 256
  assert np.isfinite(report["probe_loss_before"]) and np.isfinite(report["probe_loss_after"])
  assert load_run(ft).step == 2 and load_run(ft).config.data.seq_len == 256
  assert "exact match / candidate accuracy" in out and "wrote" in out and res["complete"]
  main(args)  # the same fine-tune again: reused, not trained again
  assert "reusing the needle fine-tune" in capsys.readouterr().out
  assert load_run(ft).step == 2
  with pytest.raises(SystemExit):  # another fine-tune there: one line, nothing overwritten
    main([*args, "--ft_lr", "0.5"])
  assert "already holds another fine-tune (lr" in capsys.readouterr().err
  with pytest.raises(SystemExit):  # a config error names the flags typed
    main([*args[:-5], "--ft_seq_len", "8", "--ft_workdir", str(tmp_path / "ft8"),
          "--no_progress"])
  err = capsys.readouterr().err
  assert "--train_task 2 --ft_seq_len 8: model.window=16 must be <= data.seq_len=8" in err, err
  assert not os.path.exists(tmp_path / "ft8")


@pytest.mark.extended  # resume itself is in make test (tests/runs, tests/train)
def test_an_interrupted_fine_tune_resumes_where_it_stopped(trained_run, tmp_path, monkeypatch):
  run = load_run(trained_run)
  kw = dict(seq_len=256, progress=False, echo=lambda s: None)
  whole, _ = needle_train.fine_tune(run, 4, str(tmp_path / "whole"), **kw)
  train_step, calls = Trainer.train_step, []

  def interrupted(self):
    def step(state, batch):
      calls.append(1)
      if len(calls) > 2:
        raise KeyboardInterrupt
      return train_step.fget(self)(state, batch)
    return step

  monkeypatch.setattr(Trainer, "train_step", property(interrupted))
  part = str(tmp_path / "part")
  with pytest.raises(KeyboardInterrupt):
    needle_train.fine_tune(run, 4, part, **kw)
  assert load_run(part).step == 2  # saved every steps // 4 = 1 step
  monkeypatch.setattr(Trainer, "train_step", train_step)
  resumed, report = needle_train.fine_tune(run, 4, part, **kw)
  assert report["resumed_at"] == 2 and resumed.step == 4
  jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-6, atol=1e-7),
               whole.params, resumed.params)


def test_cli_checks_the_grid_before_fine_tuning(trained_run, tmp_path, capsys):
  main = runpy.run_path(str(SCRIPT))["main"]
  ft = str(tmp_path / "ft")
  with pytest.raises(SystemExit):
    main(["--workdir", trained_run, "--ctx", "60", "--train_task", "2", "--ft_workdir", ft,
          "--no_progress"])
  err = [line for line in capsys.readouterr().err.splitlines() if line.strip()]
  assert len(err) == 1 and "--ctx 60 is too short" in err[0], err
  assert not os.path.exists(ft)
