"""Config presets build and validate; bad knobs fail with the key named."""

import ml_collections
import pytest
from flax import nnx

from ttt_jax.config import (
  MODEL_KINDS,
  RANGES,
  SCALES,
  ConfigError,
  base_config,
  build_config,
  parse_ctx,
  validate,
)
from ttt_jax.models import abstract_model, count_params
from ttt_jax.runs import checkpoint
from ttt_jax.runs.workdir import claim


@pytest.mark.parametrize("kind", MODEL_KINDS)
@pytest.mark.parametrize("scale", list(SCALES))
def test_every_preset_builds_and_validates(kind, scale):
  c = validate(build_config(f"model={kind},scale={scale},ctx=8k"))
  # what the kind means for the model (not the kind itself): its sequence mixer
  assert c.model.mixer == MIXER_OF_KIND[kind]


MIXER_OF_KIND = {"transformer": "full", "swa": "swa", "ttt_linear": "ttt_linear",
                 "ttt_mlp": "ttt_mlp", "e2e": "swa"}


# The papers' ladder (layers, width, heads) written out independently of config.SCALES.
PAPER_LADDER = {"125m": (12, 768, 12), "350m": (24, 1024, 16), "760m": (24, 1536, 16),
                "1b": (24, 2048, 32), "3b": (32, 2560, 32)}


@pytest.mark.parametrize("scale", list(PAPER_LADDER))
def test_transformer_presets_have_the_published_shape_and_parameter_count(scale):
  """The model a preset builds (not the table it reads) has the published depth/width and the
  parameter count of a Llama-style decoder with those sizes, counted by hand here."""
  c = build_config(f"model=transformer,scale={scale},ctx=8k")
  m = c.model
  assert (m.num_layers, m.d_model, m.num_heads) == PAPER_LADDER[scale]
  layers, d, f = m.num_layers, m.d_model, m.intermediate_size
  vocab = -(-m.vocab_size // 128) * 128
  per_block = 4 * d * d + 3 * d * f + 2 * d  # q,k,v,o + SwiGLU + two RMSNorm scales
  expected = layers * per_block + d + vocab * d * (1 if m.tie_embeddings else 2)
  assert count_params(nnx.to_pure_dict(abstract_model(m)[1])) == expected
  # the non-embedding size is the scale's name to within the papers' rounding
  nominal = {"125m": 125e6, "350m": 350e6, "760m": 760e6, "1b": 1.3e9, "3b": 2.7e9}[scale]
  assert 0.6 < layers * per_block / nominal < 1.1, layers * per_block


@pytest.mark.parametrize("scale", ["tiny", "125m", "350m"])
def test_e2e_preset_has_the_baseline_parameter_count(scale):
  """The E2E preset pays for its prime MLPs with narrower MLPs so the model it builds has the
  full-attention baseline's parameter count: off by no more than the width rounding (all its
  MLPs, prime ones included, one 128-wide step of width each: 3 x d_model x 128 parameters)."""
  base = build_config(f"model=transformer,scale={scale},ctx=8k").model
  e2e = build_config(f"model=e2e,scale={scale},ctx=8k").model
  count = lambda m: count_params(nnx.to_pure_dict(abstract_model(m)[1]))  # noqa: E731
  mlps = e2e.num_layers + e2e.e2e.suffix_len
  assert abs(count(e2e) - count(base)) < mlps * 3 * e2e.d_model * 128


@pytest.mark.parametrize("kind", MODEL_KINDS)
def test_paper_scale_ttt_and_e2e_presets_stack_their_blocks(kind):
  # the TTT and E2E presets stack their blocks from 125m up (a list's remat loses to XLA:GPU's
  # merged buffers: docs/scaling.md); the transformer and SWA ones, which gain nothing from it
  # and export to Hugging Face as a list, and the tiny presets, the demo's, keep the list
  for scale in ("125m", "3b"):
    m = build_config(f"model={kind},scale={scale},ctx=8k").model
    assert m.scan_layers == (kind in ("ttt_linear", "ttt_mlp", "e2e")), (kind, scale)
    assert m.remat == "full"
  assert not build_config(f"model={kind},scale=tiny").model.scan_layers


def test_e2e_preset_matches_paper_choices():
  c = build_config("model=e2e,scale=125m,ctx=8k")
  assert c.model.e2e.suffix_len == 3
  assert c.model.intermediate_size == 1664  # full-attention baseline: 2048
  assert c.model.qk_norm and c.model.post_norm and c.model.rope_theta == 5e5
  assert build_config("model=e2e,scale=3b,ctx=8k").model.e2e.suffix_len == 8


@pytest.mark.parametrize("text,value", [("1k", 1024), ("8K", 8192), ("128k", 131072),
                                        ("1000", 1000)])
def test_parse_ctx(text, value):
  assert parse_ctx(text) == value


@pytest.mark.parametrize("arg,needle", [
    ("model=rnn", "model="),
    ("scale=huge", "scale="),
    ("ctx=lots", "ctx="),
    ("color=red", "color"),
    ("model", "key=value"),
])
def test_bad_preset_args_name_the_key(arg, needle):
  with pytest.raises(ConfigError, match=needle):
    build_config(arg)


def _bad(mutate):
  c = build_config("model=swa,scale=tiny,ctx=1k")
  with c.unlocked():
    mutate(c)
  return c


@pytest.mark.parametrize("mutate,needle", [
    (lambda c: setattr(c.model, "mixer", "conv"), "model.mixer"),
    (lambda c: setattr(c.model, "window", 4096), "model.window"),
    (lambda c: setattr(c.model, "num_heads", 3), "model.d_model"),
    (lambda c: setattr(c.train, "steps", 0), "train.steps"),
    (lambda c: setattr(c.model, "remat", "some"), "model.remat"),
    (lambda c: setattr(c.train, "grad_accum", 3), "train.grad_accum"),
    (lambda c: setattr(c.mesh, "fsdp", 0), "mesh.fsdp"),
    (lambda c: setattr(c.checkpoint, "load_part", "everything"), "checkpoint.load_part"),
    (lambda c: c.train.__setattr__("bogus", 1), "train.bogus"),
])
def test_bad_knobs_fail_with_key(mutate, needle):
  with pytest.raises(ConfigError, match=needle.replace(".", r"\.")):
    validate(_bad(mutate))


def test_seq_len_must_divide_into_chunks():
  c = build_config("model=ttt_linear,scale=tiny,ctx=1k")
  c.data.seq_len = 1000
  with pytest.raises(ConfigError, match=r"model\.ttt\.mini_batch_size"):
    validate(c)
  c = build_config("model=e2e,scale=tiny,ctx=1k")
  c.data.seq_len = 1000
  with pytest.raises(ConfigError, match=r"model\.e2e\.mini_batch_size"):
    validate(c)


@pytest.mark.parametrize("rows,ok", [(-2, False), (-1, True), (0, True), (32, True), (48, False)])
def test_inner_attention_block_is_auto_off_or_a_divisor_of_the_chunk(rows, ok):
  c = build_config("model=e2e,scale=tiny,ctx=1k")  # chunks of 128
  c.model.e2e.inner_attention_block = rows
  if ok:
    validate(c)
  else:
    with pytest.raises(ConfigError, match=r"model\.e2e\.inner_attention_block"):
      validate(c)


def test_wrong_type_names_the_key():
  d = build_config("model=swa,scale=tiny,ctx=1k").to_dict()
  d["train"]["lr"] = "fast"  # e.g. from a hand-edited JSON config
  with pytest.raises(ConfigError, match=r"train\.lr"):
    validate(ml_collections.ConfigDict(d))


@pytest.mark.parametrize("key,value,needle", [
    ("train.min_lr_ratio", -3.0, "train.min_lr_ratio=-3.0 must be in [0, 1]"),
    ("train.b1", 1.5, "train.b1=1.5 must be in [0, 1)"),
    ("train.b2", 1.0, "train.b2=1.0 must be in [0, 1)"),
    ("train.weight_decay", -10.0, "train.weight_decay=-10.0 must be >= 0"),
    ("train.eval_batches", 0, "train.eval_batches=0 must be >= 1"),
    ("train.lr", float("inf"), "train.lr=inf must be a finite number >= 0"),
    ("train.lr", float("nan"), "train.lr=nan must be a finite number >= 0"),
    ("train.grad_clip", -1.0, "train.grad_clip=-1.0 must be >= 0"),
    ("model.rope_theta", 0.0, "model.rope_theta=0.0 must be > 0"),
    ("model.norm_eps", -1.0, "model.norm_eps=-1.0 must be > 0"),
    ("data.prefetch", -1, "data.prefetch=-1 must be >= 0"),
    ("model.ttt.conv_width", 0, "model.ttt.conv_width=0 must be >= 1"),
    ("model.e2e.prime_intermediate_size", 0, "model.e2e.prime_intermediate_size=0 must be >= 1"),
    ("checkpoint.step", -3, "checkpoint.step=-3 must be >= -1"),
    ("data.val_fraction", float("nan"), "data.val_fraction=nan must be a finite number in [0, 1)"),
    ("data.val_fraction", -0.5, "data.val_fraction=-0.5 must be in [0, 1)"),
    ("mesh.num_processes", -7, "mesh.num_processes=-7 must be >= -1"),
])
def test_numbers_out_of_range_fail_naming_key_and_range(key, value, needle):
  """Numbers that used to train garbage (a negative lr from min_lr_ratio=-3, perplexity 25,665,
  exit 0) or crash later (conv_width=0: a 73-line traceback) fail at validation in one line."""
  c = build_config("model=swa,scale=tiny,ctx=1k")
  *path, last = key.split(".")
  node = c
  for part in path:
    node = node[part]
  node[last] = value
  with pytest.raises(ConfigError) as e:
    validate(c)
  assert str(e.value) == needle


def test_every_numeric_knob_has_a_range():
  """RANGES covers every int and float knob of the base config except those with their own
  checks (mesh sizes, the seed, the vocab-dependent ones)."""
  flat = checkpoint.flat_config(base_config().to_dict())
  numeric = {k for k, v in flat.items() if type(v) in (int, float)}
  own_checks = {"seed", "mesh.data", "mesh.fsdp", "mesh.tensor", "model.num_kv_heads",
                "model.e2e.suffix_len"}
  assert numeric - own_checks == set(RANGES), sorted(numeric - own_checks ^ set(RANGES))


def test_an_empty_workdir_is_refused(tmp_path):
  with pytest.raises(ConfigError, match="--workdir '' is empty"), claim(
      build_config("model=swa,ctx=64"), ""):
    pass
