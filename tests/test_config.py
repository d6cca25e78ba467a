"""Config presets build and validate; bad knobs fail with the key named."""

import ml_collections
import pytest

from ttt_jax.config import (
    MODEL_KINDS,
    SCALES,
    ConfigError,
    build_config,
    parse_ctx,
    validate,
)


@pytest.mark.parametrize("kind", MODEL_KINDS)
@pytest.mark.parametrize("scale", list(SCALES))
def test_every_preset_builds_and_validates(kind, scale):
  c = build_config(f"model={kind},scale={scale},ctx=8k")
  validate(c)
  assert c.model.kind == kind
  assert c.data.seq_len == 8192
  layers, width, heads, _ = SCALES[scale]
  assert (c.model.num_layers, c.model.d_model, c.model.num_heads) == (layers, width, heads)


def test_published_widths():
  assert SCALES["125m"][:3] == (12, 768, 12)
  assert SCALES["3b"][:3] == (32, 2560, 32)


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


def test_wrong_type_names_the_key():
  d = build_config("model=swa,scale=tiny,ctx=1k").to_dict()
  d["train"]["lr"] = "fast"  # e.g. from a hand-edited JSON config
  with pytest.raises(ConfigError, match=r"train\.lr"):
    validate(ml_collections.ConfigDict(d))
