"""Each `train` / `data` / top-level config key set to a non-default value changes what its name
says: the learning-rate schedule and its warm-up and floor, AdamW's betas, clipping and weight
decay, how many validation batches a periodic evaluation reads, the training window order, the
.jsonl text field, and the seed's reach into parameters and batch order."""

from __future__ import annotations

import json
import math

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from ttt_jax.config import ConfigError, build_config
from ttt_jax.data import pipeline
from ttt_jax.data.dataset import Dataset
from ttt_jax.train import trainer as trainer_lib
from ttt_jax.train.loop import train_and_evaluate
from ttt_jax.train.optim import lr_schedule, make_optimizer
from ttt_jax.train.trainer import Trainer

SEQ_LEN, BATCH = 16, 2


def train_config(**kw):
  """The `train` section of a tiny preset with `kw` set (e.g. lr, steps, warmup_steps)."""
  tr = build_config("model=transformer,scale=tiny,ctx=64").train
  for k, v in kw.items():
    tr[k] = v
  return tr


def rel_err(a, b) -> float:
  a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
  return float(np.max(np.abs(a - b)) / max(np.max(np.abs(b)), 1e-30))


def lrs(tr, steps) -> np.ndarray:
  sched = lr_schedule(tr)
  return np.array([float(sched(jnp.asarray(s))) for s in steps])


# -- train.schedule, train.min_lr_ratio, train.warmup_steps ----------------------------------------
def expected_lr(schedule: str, step: int, lr: float, warmup: int, steps: int, ratio: float):
  """The schedule as documented: linear warm-up from 0 to lr over `warmup` steps, then over the
  remaining `steps - warmup` steps cosine or linear decay to lr * ratio, or lr held."""
  if step < warmup:
    return lr * step / warmup
  t, d = min(step - warmup, steps - warmup), steps - warmup
  if schedule == "cosine":
    return lr * (ratio + (1 - ratio) * 0.5 * (1 + math.cos(math.pi * t / d)))
  if schedule == "linear":
    return lr + (lr * ratio - lr) * t / d
  return lr


@pytest.mark.parametrize("schedule", ["cosine", "linear", "constant"])
def test_schedule_values_follow_the_documented_curve(schedule):
  """train.schedule: after warm-up the lr follows cosine / linear decay or stays at lr, checked
  against the formula at mid and late steps; the three schedules differ from each other there."""
  rng = np.random.default_rng()
  lr, ratio = float(rng.uniform(1e-4, 1e-2)), float(rng.uniform(0.05, 0.5))
  warmup, steps = 10, 110
  tr = train_config(lr=lr, min_lr_ratio=ratio, warmup_steps=warmup, steps=steps,
                    schedule=schedule)
  probe = [10, 35, 60, 85, 100, 109, 110]
  got = lrs(tr, probe)
  want = [expected_lr(schedule, s, lr, warmup, steps, ratio) for s in probe]
  assert rel_err(got, want) < 1e-5, (schedule, got, want)
  others = {s: lrs(train_config(lr=lr, min_lr_ratio=ratio, warmup_steps=warmup, steps=steps,
                                schedule=s), [60, 85]) for s in ("cosine", "linear", "constant")}
  for name, vals in others.items():
    if name != schedule:
      assert rel_err(got[2:4], vals) > 1e-2, (schedule, name)


@pytest.mark.parametrize("schedule", ["cosine", "linear"])
def test_min_lr_ratio_sets_the_final_lr(schedule):
  """train.min_lr_ratio: the lr at (and past) `train.steps` is lr * ratio, for two ratios."""
  rng = np.random.default_rng()
  lr = float(rng.uniform(1e-4, 1e-2))
  for ratio in (float(rng.uniform(0.01, 0.1)), float(rng.uniform(0.3, 0.7))):
    tr = train_config(lr=lr, min_lr_ratio=ratio, warmup_steps=5, steps=50, schedule=schedule)
    got = lrs(tr, [50, 60])
    assert rel_err(got, [lr * ratio] * 2) < 1e-5, (schedule, ratio, got)


def test_warmup_steps_ramp_linearly_to_lr():
  """train.warmup_steps: lr * step / warmup over the first `warmup` steps, lr at `warmup`; with
  warmup 0 the first step already has lr."""
  lr = float(np.random.default_rng().uniform(1e-4, 1e-2))
  for warmup in (4, 17):
    tr = train_config(lr=lr, warmup_steps=warmup, steps=200, schedule="constant")
    probe = list(range(1, warmup + 1))
    got = lrs(tr, probe)
    assert rel_err(got, [lr * s / warmup for s in probe]) < 1e-5, (warmup, got)
    assert float(lr_schedule(tr)(0)) == 0.0
  tr = train_config(lr=lr, warmup_steps=0, steps=200, schedule="constant")
  assert rel_err(lrs(tr, [0, 1]), [lr, lr]) < 1e-6


# -- train.b1, train.b2, train.grad_clip, train.weight_decay ---------------------------------------
def params_and_grads(rng):
  """A model-shaped tree: weight matrices (decayed) and embedding / norm scale / bias (not)."""
  def r(*shape):
    return jnp.asarray(rng.standard_normal(shape), jnp.float32)

  params = {"embed": {"embedding": r(12, 8)},
            "blocks": {"0": {"mixer": {"wq": {"kernel": r(8, 8)}, "conv": {"bias": r(8)}},
                             "mlp": {"w1": r(8, 16)}, "mlp_norm": {"scale": r(8)}}},
            "head": r(8, 12)}
  grads = jax.tree.map(lambda p: r(*p.shape), params)
  return params, grads


def find_state(state, cls):
  hits = [s for s in jax.tree.leaves(state, is_leaf=lambda x: isinstance(x, cls))
          if isinstance(s, cls)]
  assert len(hits) == 1, hits
  return hits[0]


def leaves(tree) -> np.ndarray:
  return np.concatenate([np.ravel(np.asarray(x, np.float64)) for x in jax.tree.leaves(tree)])


def test_b1_b2_set_the_adam_moments_and_second_update():
  """train.b1 / train.b2: after two updates (fixed lr, no clipping, no decay) the moments are
  b-weighted sums of the gradients and the second update is Adam's bias-corrected ratio; other
  betas give other updates."""
  rng = np.random.default_rng()
  params, g1 = params_and_grads(rng)
  _, g2 = params_and_grads(rng)
  lr, eps = 1e-3, 1e-8
  results = {}
  for b1, b2 in ((0.8, 0.99), (0.5, 0.7)):
    tr = train_config(lr=lr, warmup_steps=0, schedule="constant", weight_decay=0.0,
                      grad_clip=0.0, b1=b1, b2=b2)
    opt = make_optimizer(tr, "full")
    state = opt.init(params)
    _, state = opt.update(g1, state, params)
    u2, state = opt.update(g2, state, params)
    adam = find_state(state, optax.ScaleByAdamState)
    a, b = leaves(g1), leaves(g2)
    mu, nu = b1 * (1 - b1) * a + (1 - b1) * b, b2 * (1 - b2) * a * a + (1 - b2) * b * b
    assert rel_err(leaves(adam.mu), mu) < 1e-5 and rel_err(leaves(adam.nu), nu) < 1e-5
    want = -lr * (mu / (1 - b1 ** 2)) / (np.sqrt(nu / (1 - b2 ** 2)) + eps)
    assert rel_err(leaves(u2), want) < 1e-4, (b1, b2)
    results[b1, b2] = leaves(u2)
  first, second = results.values()
  assert rel_err(first, second) > 1e-2


def test_grad_clip_caps_the_global_norm_and_zero_turns_it_off():
  """train.grad_clip: a gradient of global norm 1e4 reaches Adam's first moment unscaled with
  grad_clip 0 and scaled to norm `grad_clip` (same direction) with grad_clip 0.5."""
  rng = np.random.default_rng()
  params, g = params_and_grads(rng)
  g = jax.tree.map(lambda x: x * (1e4 / np.linalg.norm(leaves(g))), g)
  flat = leaves(g)
  assert abs(np.linalg.norm(flat) / 1e4 - 1) < 1e-5
  b1 = 0.9
  moments = {}
  for clip in (0.0, 0.5):
    tr = train_config(lr=1e-3, warmup_steps=0, schedule="constant", weight_decay=0.0,
                      grad_clip=clip, b1=b1)
    opt = make_optimizer(tr, "full")
    _, state = opt.update(g, opt.init(params), params)
    moments[clip] = leaves(find_state(state, optax.ScaleByAdamState).mu) / (1 - b1)
  assert rel_err(moments[0.0], flat) < 1e-5
  assert abs(np.linalg.norm(moments[0.5]) / 0.5 - 1) < 1e-5
  assert rel_err(moments[0.5], flat * (0.5 / np.linalg.norm(flat))) < 1e-5


def test_weight_decay_adds_lr_wd_param_on_weight_matrices_only():
  """train.weight_decay: with decay 0.5 the update differs from the decay-0 update by exactly
  -lr * 0.5 * param on the weight matrices (kernel, w1, head) and not at all on the embedding,
  norm scale and bias."""
  rng = np.random.default_rng()
  params, g = params_and_grads(rng)
  lr, wd = 2e-3, 0.5
  updates = {}
  for decay in (0.0, wd):
    tr = train_config(lr=lr, warmup_steps=0, schedule="constant", weight_decay=decay,
                      grad_clip=1.0)
    opt = make_optimizer(tr, "full")
    updates[decay], _ = opt.update(g, opt.init(params), params)
  diff = jax.tree.map(lambda a, b: np.asarray(a, np.float64) - np.asarray(b, np.float64),
                      updates[wd], updates[0.0])
  decayed = [diff["blocks"]["0"]["mixer"]["wq"]["kernel"], diff["blocks"]["0"]["mlp"]["w1"],
             diff["head"]]
  want = [params["blocks"]["0"]["mixer"]["wq"]["kernel"], params["blocks"]["0"]["mlp"]["w1"],
          params["head"]]
  for d, p in zip(decayed, want, strict=True):
    assert rel_err(d, -lr * wd * np.asarray(p)) < 1e-4
  for d in (diff["embed"]["embedding"], diff["blocks"]["0"]["mixer"]["conv"]["bias"],
            diff["blocks"]["0"]["mlp_norm"]["scale"]):
    assert np.max(np.abs(d)) == 0.0


# -- data and loop keys on a small .jsonl corpus ---------------------------------------------------
def random_text(rng, n: int) -> str:
  letters = np.array(list("abcdefghijklmnopqrstuvwxyz     .,"))
  return "".join(rng.choice(letters, n))


@pytest.fixture
def corpus(tmp_path):
  """`corpus(field)`: a .jsonl file of 40 random documents (60-300 chars) under `field`;
  returns (path, texts)."""
  rng = np.random.default_rng()

  def write(field="body"):
    texts = [random_text(rng, int(rng.integers(60, 300))) for _ in range(40)]
    path = tmp_path / f"docs_{field}.jsonl"
    path.write_text("".join(json.dumps({"id": i, field: t}) + "\n" for i, t in enumerate(texts)))
    return str(path), texts

  return write


def tiny_config(source, text_field="body", **data):
  c = build_config(f"model=transformer,scale=tiny,ctx={SEQ_LEN}")
  c.model.num_layers, c.model.d_model, c.model.num_heads, c.model.intermediate_size = 1, 32, 2, 64
  c.data.source, c.data.text_field, c.data.val_fraction = source, text_field, 0.3
  c.data.batch_size, c.data.prefetch = BATCH, 0
  for k, v in data.items():
    c.data[k] = v
  return c


def batches(trainer, n):
  ds = trainer.dataset("train")
  return np.stack([np.asarray(ds[i]["tokens"]) for i in range(n)])


def test_text_field_reads_the_named_field(corpus):
  """data.text_field: records holding text under "body" are read (byte tokens, one [BOS] doc
  [EOS] per record, in file order) when text_field='body'; the default 'text' fails in one line
  naming the field."""
  path, texts = corpus("body")
  data = Dataset.from_config(tiny_config(path).data)
  tok = data.tokenizer
  stream = data.stream("all")
  want = np.concatenate([np.concatenate([[tok.bos_id], tok.encode(t), [tok.eos_id]])
                         for t in texts])
  np.testing.assert_array_equal(stream.tokens, want)
  assert len(stream.names) == len(texts)
  with pytest.raises(ConfigError, match="no string field 'text'"):
    Dataset.from_config(tiny_config(path, text_field="text").data).stream("all")


def test_shuffle_off_reads_consecutive_windows_the_same_for_every_seed(corpus):
  """data.shuffle=False: train batch i holds windows 2i, 2i+1, i.e. stream tokens
  [16k, 16k + 17) in order, whatever the seed; shuffle=True permutes the windows (each once per
  epoch) in a seed-dependent order."""
  path, _ = corpus()
  runs = {}
  for shuffle in (False, True):
    for seed in (0, 1):
      c = tiny_config(path, shuffle=shuffle)
      c.seed = seed
      trainer = Trainer.create(c)
      n = len(trainer.data.window_source("train", SEQ_LEN)) // BATCH
      runs[shuffle, seed] = batches(trainer, n).reshape(n * BATCH, SEQ_LEN + 1)
  tokens = Dataset.from_config(tiny_config(path).data).stream("train").tokens
  windows = np.stack([tokens[k * SEQ_LEN:k * SEQ_LEN + SEQ_LEN + 1]
                      for k in range((len(tokens) - 1) // SEQ_LEN)])
  ordered = windows[:len(runs[False, 0])]  # an odd count leaves the last window to epoch 2
  np.testing.assert_array_equal(runs[False, 0], ordered)
  np.testing.assert_array_equal(runs[False, 1], ordered)
  every = set(map(bytes, windows.astype(np.int32)))
  for seed in (0, 1):
    shuffled = runs[True, seed]
    assert not np.array_equal(shuffled, ordered)
    rows = list(map(bytes, shuffled.astype(np.int32)))
    assert len(set(rows)) == len(rows) and set(rows) <= every  # each window at most once
  assert not np.array_equal(runs[True, 0], runs[True, 1])


def test_seed_changes_initial_parameters_and_batch_order(corpus):
  """seed: seeds 0 and 1 give different random initial weights (the same seed the same ones;
  constant-initialised leaves stay equal) and, with shuffle on, different first batches."""
  path, _ = corpus()
  params, first = {}, {}
  for seed in (0, 1):
    c = tiny_config(path, shuffle=True)
    c.seed = seed
    trainer = Trainer.create(c)
    params[seed] = jax.tree.leaves(trainer.init_state().params)
    first[seed] = batches(trainer, 1)
    if seed == 0:
      np.testing.assert_array_equal(leaves(trainer.init_state().params), leaves(params[0]))
  random_leaves = 0
  for a, b in zip(params[0], params[1], strict=True):
    a, b = np.asarray(a), np.asarray(b)
    if np.ptp(a) == 0:  # constant initialisation (norm scales, biases): the same for any seed
      np.testing.assert_array_equal(a, b)
    else:
      random_leaves += 1
      assert rel_err(a, b) > 0.3
  assert random_leaves >= 3
  assert not np.array_equal(first[0], first[1])


def test_eval_batches_sets_how_many_validation_batches_each_evaluation_reads(corpus, tmp_path,
                                                                             monkeypatch):
  """train.eval_batches: every periodic evaluation of a run (eval_every 1, 2 steps) reads exactly
  3 batches, the first 3 unshuffled validation batches."""
  path, _ = corpus()
  c = tiny_config(path)
  c.train.steps, c.train.warmup_steps, c.train.eval_every, c.train.eval_batches = 2, 1, 1, 3
  c.checkpoint.every_steps = 0
  seen = []
  real = trainer_lib.validation_metrics

  def counting(eval_fn, batches):
    got = []

    def tap():
      for b in batches:
        got.append(np.asarray(b["tokens"]))
        yield b

    out = real(eval_fn, tap())
    seen.append(got)
    return out

  monkeypatch.setattr(trainer_lib, "validation_metrics", counting)
  result = train_and_evaluate(c, str(tmp_path / "run"), echo=lambda s: None)
  assert [len(g) for g in seen] == [3, 3]
  val = result["trainer"].dataset("validation", shuffle=False)
  for got in seen:
    for i, b in enumerate(got):
      np.testing.assert_array_equal(b, np.asarray(val[i]["tokens"]))
  assert math.isfinite(result["val"]["loss"])


def test_val_fraction_holds_out_that_share_of_documents_nested(tmp_path):
  """data.val_fraction: about that share of the documents (within 4 binomial standard errors of
  400) form the validation split, the rest the training split, disjoint; a larger fraction
  keeps every document a smaller one held out (the split is by a hash of the name)."""
  rng = np.random.default_rng()
  n = 400
  path = tmp_path / "docs.jsonl"
  path.write_text("".join(json.dumps({"body": random_text(rng, 40)}) + "\n" for _ in range(n)))
  held = {}
  for vf in (0.1, 0.5):
    data = Dataset.from_config(tiny_config(str(path), val_fraction=vf).data)
    val, train = set(data.stream("validation").names), set(data.stream("train").names)
    assert not val & train and len(val) + len(train) == n
    assert abs(len(val) - vf * n) < 4 * math.sqrt(n * vf * (1 - vf)), (vf, len(val))
    held[vf] = val
  assert held[0.1] < held[0.5]


def test_grad_accum_runs_the_loss_on_microbatches(corpus, monkeypatch):
  """train.grad_accum: one train step traces the loss on batch_size / grad_accum rows (a scan
  over the microbatches), while grad_accum=1 traces it on the whole batch."""
  path, _ = corpus()
  shapes = []
  real = Trainer.loss_fn

  def recording(self, params, batch, step):
    shapes.append(tuple(batch["tokens"].shape))
    return real(self, params, batch, step)

  monkeypatch.setattr(Trainer, "loss_fn", recording)
  for accum in (1, 2, 4):
    c = tiny_config(path, batch_size=4)
    c.train.grad_accum = accum
    trainer = Trainer.create(c)
    shapes.clear()
    batch = trainer.device_batch(trainer.dataset("train")[0])
    trainer.train_step.lower(trainer.init_state(), batch)
    assert shapes and set(shapes) == {(4 // accum, SEQ_LEN + 1)}, (accum, shapes)


@pytest.mark.parametrize("pack", [True, False])
def test_min_doc_len_leaves_the_shorter_documents_out_of_every_window(tmp_path, pack):
  """data.min_doc_len=N: documents of fewer than N tokens are in no training or validation
  window, packed or one document at a time; N=0 keeps them. The short documents are the only
  ones written with 'Q', so a window holding a 'Q' token holds part of a short one."""
  rng = np.random.default_rng()
  long_texts = [random_text(rng, int(rng.integers(80, 200))) for _ in range(24)]
  # at least SEQ_LEN - 1 tokens: one window each when documents are not packed
  short_texts = ["Q" * int(rng.integers(SEQ_LEN, 30)) for _ in range(16)]
  texts = [t for pair in zip(long_texts[:16], short_texts, strict=True) for t in pair]
  texts += long_texts[16:]
  path = tmp_path / "mixed.jsonl"
  path.write_text("".join(json.dumps({"body": t}) + "\n" for t in texts))
  seen = {}
  for n in (0, 40):
    data = Dataset.from_config(tiny_config(str(path), pack_docs=pack, min_doc_len=n).data)
    q = data.tokenizer.encode("Q")[0]
    windows = {s: pipeline.stack_windows(data.window_source(s, SEQ_LEN))
               for s in ("train", "validation")}
    seen[n] = {s: int((w == q).sum()) for s, w in windows.items()}
    kept = sum(len(t) + 2 for t in texts if len(t) >= n)  # [BOS] doc [EOS] of the kept ones
    total = sum(len(w) for w in windows.values())
    if pack:  # every kept token is in the packed stream, less one window's tail per split
      assert kept - 2 * (SEQ_LEN + 1) <= total * SEQ_LEN <= kept
  assert seen[0]["train"] > 0 and seen[0]["validation"] > 0
  assert seen[40] == {"train": 0, "validation": 0}


@pytest.mark.parametrize("prefetch", [0, 3])
def test_prefetch_is_how_far_ahead_training_reads(monkeypatch, prefetch):
  """data.prefetch: the training loop reads its batches through `pipeline.make_iterator` with
  that many batches of read-ahead (tests/data/test_pipeline.py: what the read-ahead does)."""
  asked, real = [], pipeline.make_iterator
  monkeypatch.setattr(pipeline, "make_iterator",
                      lambda ds, k, *a, **kw: (asked.append(k), real(ds, k, *a, **kw))[1])
  c = build_config("model=transformer,scale=tiny,ctx=16")
  c.model.num_layers, c.model.d_model, c.model.num_heads, c.model.intermediate_size = 1, 32, 2, 64
  c.data.batch_size, c.data.prefetch = BATCH, prefetch
  c.train.steps, c.train.eval_every, c.train.eval_batches = 2, 100, 1
  out = train_and_evaluate(c, None, echo=lambda s: None)
  assert asked == [prefetch] and len(out["history"]) >= 1
