"""Config presets and the single place that validates them.

A config is an `ml_collections.ConfigDict` with sections `model`, `data`, `train`, `mesh`,
`checkpoint`, `eval`. `build_config(arg)` builds a preset from a comma list of `key=value`;
`validate(config)` rejects bad knobs with one line that names the key and what is allowed."""

from __future__ import annotations

import functools
import importlib
import math
from collections.abc import Callable

import ml_collections

MODEL_KINDS = ("transformer", "swa", "ttt_linear", "ttt_mlp", "e2e")
# model kind -> the model.mixer it presets; FIXED_MIXER_KINDS run only that mixer
KIND_MIXER = {"transformer": "full", "swa": "swa", "ttt_linear": "ttt_linear",
              "ttt_mlp": "ttt_mlp", "e2e": "swa"}
FIXED_MIXER_KINDS = ("ttt_linear", "ttt_mlp", "e2e")
# TTT kind -> (inner base LR, inner LR warms up over the outer warm-up: MLP, as the reference)
TTT_PRESETS = {"ttt_linear": (1.0, False), "ttt_mlp": (0.1, True)}
E2E_TRAIN_MODES, E2E_REMAT_POLICIES = ("meta", "pretrain"), ("full", "dots")
TTT_IMPLS, TTT_BACKBONES = ("auto", "dual", "primal", "pallas"), ("mamba", "base")
REMAT_POLICIES, DTYPES = ("none", "full", "dots", "kernels"), ("float32", "bfloat16")
SCHEDULES, INIT_RNG_KERNEL = ("cosine", "linear", "constant"), ("auto", "on", "off")
ATTENTION_ALGORITHMS = ("auto", "dense", "blocked", "blockwise")
ATTENTION_IMPLS = ("auto", "blockwise", "xla", "cudnn", "splash")
CACHE_ATTENTION_IMPLS = ("auto", "pallas", "inherit")
E2E_INNER_ATTENTION_IMPLS = ("auto", "blockwise", "xla")  # batched per sequence, 2nd order
E2E_WINDOW_RESIDUALS = ("auto", "chunks", "windows")

# name: (num_layers, d_model, num_heads, intermediate_size): the TTT-E2E paper's 125M-3B ladder
SCALES = {
    "tiny": (4, 128, 4, 384),
    "125m": (12, 768, 12, 2048),
    "350m": (24, 1024, 16, 2736),
    "760m": (24, 1536, 16, 4096),
    "1b": (24, 2048, 32, 5504),
    "3b": (32, 2560, 32, 6912),
}
# Sliding window and E2E inner mini-batch (chunk) per scale: 8K and 1K as in the paper, tiny: small
SWA_WINDOW = {"tiny": 256, **dict.fromkeys(("125m", "350m", "760m", "1b", "3b"), 8192)}
E2E_CHUNK = {"tiny": 128, **dict.fromkeys(("125m", "350m", "760m", "1b", "3b"), 1024)}
BYTE_VOCAB = 259  # 256 bytes + BOS, EOS, PAD

MESH_AXES = ("data", "fsdp", "tensor")
BATCH_AXES = ("data", "fsdp")
MeshAxes = str | tuple[str, ...] | None
Rules = tuple[tuple[str, MeshAxes], ...]
# logical axis -> mesh axis (or None = replicated); `mesh.rules` overrides entries. FSDP shards
# the model width of every weight (and so its optimizer moments); tensor parallelism splits
# heads, MLP hidden units and the vocab. ttt_jax/sharding.py applies them.
LOGICAL_RULES: Rules = (("batch", BATCH_AXES), ("embed", "fsdp"), ("mlp", "tensor"),
                        ("heads", "tensor"), ("vocab", "tensor"), ("layers", None),
                        ("head_dim", None), ("seq", None))


class ConfigError(ValueError):
  """A bad config value; the message names the key and what is allowed."""


def parse_ctx(value: str | int) -> int:
  """'8k' -> 8192, '128K' -> 131072, '1000' -> 1000."""
  s = str(value).strip().lower()
  try:
    if s.endswith("k"):
      return int(float(s[:-1]) * 1024)
    return int(s)
  except ValueError:
    raise ConfigError(f"ctx={value!r}: expected an integer or a size like 2k, 8k, 128k") from None


def parse_rules(text: str) -> Rules:
  """'embed=fsdp,mlp=tensor,batch=data+fsdp,vocab=' -> rules overriding `LOGICAL_RULES`.

  Each item is `logical=mesh_axis[+mesh_axis...]`; an empty right side means replicated.
  Logical names not mentioned keep their default rule.
  """
  overrides: dict[str, MeshAxes] = {}
  for item in (s.strip() for s in text.split(",")):
    if not item:
      continue
    if "=" not in item:
      raise ConfigError(f"mesh.rules item {item!r}: expected logical=mesh_axis "
                        f"(mesh axes: {', '.join(MESH_AXES)}; empty = replicated)")
    name, rhs = (s.strip() for s in item.split("=", 1))
    axes = tuple(a.strip() for a in rhs.split("+") if a.strip())
    bad = [a for a in axes if a not in MESH_AXES]
    if not name or bad:
      raise ConfigError(f"mesh.rules item {item!r}: mesh axes must be among "
                        f"{', '.join(MESH_AXES)} (joined with '+')")
    overrides[name] = None if not axes else axes[0] if len(axes) == 1 else axes
  rules = [(k, overrides.pop(k, v)) for k, v in LOGICAL_RULES]
  return tuple(rules) + tuple(overrides.items())


def round_up(x: float, multiple: int) -> int:
  return int(math.ceil(x / multiple) * multiple)


def _parse_arg(arg: str | None) -> dict[str, str]:
  out = {"model": "transformer", "scale": "tiny", "ctx": "2k", "mode": "meta"}
  for item in filter(None, (s.strip() for s in (arg or "").split(","))):
    if "=" not in item:
      raise ConfigError(f"config arg {item!r}: expected key=value (keys: {', '.join(out)})")
    k, v = (s.strip() for s in item.split("=", 1))
    if k not in out:
      raise ConfigError(f"config arg key {k!r} unknown; allowed: {', '.join(out)}")
    out[k] = v
  return out


def base_config() -> ml_collections.ConfigDict:
  c = ml_collections.ConfigDict()
  c.seed = 0

  m = c.model = ml_collections.ConfigDict()
  m.kind = "transformer"
  m.mixer = "full"
  m.vocab_size = BYTE_VOCAB  # true tokenizer vocab; the embedding is padded to a multiple of 128
  m.num_layers, m.d_model, m.num_heads = 4, 128, 4
  m.num_kv_heads = 0  # key/value heads (grouped-query attention); 0 = num_heads
  m.intermediate_size = 384
  m.window = 256  # sliding-window size (mixer=swa and e2e)
  m.rope_theta = 10000.0
  m.trained_context = 0  # context the weights were trained at (imports set it); 0 = unknown
  m.qk_norm = m.post_norm = m.tie_embeddings = False
  m.norm_eps = 1e-6
  m.init_std = 0.02
  m.compute_dtype = m.param_dtype = "float32"
  m.remat, m.scan_layers = "none", False  # paper-scale presets: see build_config
  # exact attention algorithm (layers/attention.py AttentionAlgorithm): auto | dense | blocked |
  # blockwise; query rows per block of the blocked path; tile of the online-softmax path
  m.attention_algorithm = "auto"
  m.attention_block, m.attention_flash_block = 256, 512
  # attention backend: auto (cudnn on GPU with bf16 compute, splash on TPU, else blockwise) |
  # blockwise (the algorithms above) | xla | cudnn | splash  (layers/attention_kernels.py)
  m.attention_impl = "auto"
  # queries against a full-attention KV cache (prefill chunks, decode): auto (pallas on a GPU,
  # at any head dim, else inherit) | pallas (Triton, layers/cache_attention.py) | inherit (as above)
  m.cache_attention_impl = "auto"

  t = m.ttt = ml_collections.ConfigDict()
  t.mini_batch_size = 16
  t.base_lr = 1.0
  t.impl = "auto"  # auto: pallas for TTT-Linear on a GPU (when it can), else dual
  t.backbone = "mamba"
  t.remat_group = 4  # mini-batches per jax.checkpoint group (remat through time); 0 = off
  t.conv_width = 4
  t.lr_warmup_steps = 0  # inner-LR multiplier min(1, (step+1)/n) over the first n steps; 0 = off

  e = m.e2e = ml_collections.ConfigDict()
  e.train_mode = "meta"
  e.suffix_len = 1
  e.mini_batch_size = 128
  e.prime_intermediate_size = 384
  e.inner_lr, e.ilr_init = 1.0, 0.0
  e.ilr_warmup_steps, e.inner_clip = 100, 1.0
  e.remat_chunks, e.remat_group = True, 0  # remat_group: chunks per checkpoint group; -1 auto
  e.remat_chunks_policy = "full"  # with remat_chunks: "full" recomputes a chunk | "dots" keeps dots
  e.window_residuals = "auto"  # backward keeps auto|chunks (chunks' new keys)|windows (each's)
  e.suffix_remat = "auto"  # suffix blocks' remat in the inner loop: auto | a model.remat value
  e.hoist_first_attention = True  # first suffix block's attention once, before the chunk loop
  # suffix blocks' attention in the inner loop (prefix: model.attention_impl): auto|blockwise|xla,
  # in rematerialised query blocks of n rows (docs/configs.md): n | 0 (one call per chunk) | -1 auto
  e.inner_attention_impl, e.inner_attention_block = "auto", -1

  d = c.data = ml_collections.ConfigDict()
  d.source = "embedded"
  d.tokenizer = "bytes"
  d.seq_len = 2048
  d.batch_size = 8
  d.val_fraction = 0.05
  d.shuffle = True
  d.prefetch = 2
  d.text_field = "text"  # field holding the text in .jsonl / TFDS examples
  d.tfds_data_dir = ""  # where data.source=tfds:... is prepared ("" = TFDS default)
  d.min_doc_len = 0  # use only documents with >= this many tokens
  d.pack_docs = True  # True: windows run across documents; False: each window in one document

  tr = c.train = ml_collections.ConfigDict()
  tr.steps, tr.lr, tr.warmup_steps = 300, 3e-3, 30
  tr.schedule = "cosine"
  tr.min_lr_ratio = 0.1
  tr.weight_decay = 0.1
  tr.b1, tr.b2 = 0.9, 0.95
  tr.grad_clip = 1.0
  tr.grad_accum = 1
  tr.group_leaves = 0  # leaves of at most this many elements updated as flat groups; 0 = off
  tr.init_rng_kernel = "auto"  # initial draws by JAX's GPU kernel; auto: unless stacked on a mesh
  tr.log_every, tr.eval_every = 10, 100
  tr.eval_batches = 4
  tr.allow_bf16_params = False  # model.param_dtype=bfloat16 under AdamW needs this opt-in
  tr.skip_nonfinite = 0  # steps with a non-finite loss/gradient skipped before the run stops
  tr.compilation_cache = "~/.cache/ttt_jax/xla"  # JAX's persistent compilation cache; "" = off

  ms = c.mesh = ml_collections.ConfigDict()
  ms.data, ms.fsdp, ms.tensor = -1, 1, 1  # mesh axis sizes; -1 = the devices left
  ms.distributed = False  # call jax.distributed.initialize() before touching devices
  # logical-axis overrides, e.g. "embed=fsdp,mlp=tensor,batch=data+fsdp,vocab=" ("" = defaults)
  ms.rules = ""
  # jax.distributed.initialize arguments; ""/-1 = auto-detect (TPU pods, SLURM, Open MPI, env)
  ms.coordinator_address, ms.num_processes, ms.process_id = "", -1, -1

  ck = c.checkpoint = ml_collections.ConfigDict()
  ck.every_steps, ck.keep = 100, 3
  ck.resume = True
  ck.overwrite = False
  ck.load_part = ""  # "" | "params": start a new run from another run's params
  ck.load_from = ""  # workdir (or checkpoint dir) for load_part
  ck.step = -1  # step of this run to resume from; -1 = the latest complete one
  ck.load_step = -1  # step of load_from whose params load_part takes; -1 = its latest
  ck.allow_model_change = False  # resume a run as another model.kind / model.mixer

  ev = c.eval = ml_collections.ConfigDict()
  ev.ctx = "1k,2k"  # context lengths for scripts/evaluate.py (comma list)
  ev.max_docs = 8  # validation documents with >= max(ctx)+1 tokens, the same at every length
  ev.chunk = 1024  # tokens per streamed chunk (contexts must be multiples of it, or shorter)
  ev.batch_size = 4  # documents per streamed batch (several devices: rounded up to a multiple)
  ev.first_bucket = 128  # loss-per-position buckets: [0, b), [b, 2b), [2b, 4b), ...
  ev.stride = 0  # > 0: also strided perplexity of whole documents (eval/strided.py); 0 = off
  return c


def build_config(arg: str | None = None) -> ml_collections.ConfigDict:
  a = _parse_arg(arg)
  kind, scale, mode = a["model"], a["scale"], a["mode"]
  if kind not in MODEL_KINDS:
    raise ConfigError(f"config arg model={kind!r} unknown; allowed: {', '.join(MODEL_KINDS)}")
  if scale not in SCALES:
    raise ConfigError(f"config arg scale={scale!r} unknown; allowed: {', '.join(SCALES)}")
  if mode not in E2E_TRAIN_MODES:
    raise ConfigError(f"config arg mode={mode!r} unknown; allowed: {', '.join(E2E_TRAIN_MODES)}")
  ctx = parse_ctx(a["ctx"])

  c = base_config()
  m = c.model
  m.num_layers, m.d_model, m.num_heads, m.intermediate_size = SCALES[scale]
  m.kind = kind
  m.window = min(SWA_WINDOW[scale], ctx)
  c.data.seq_len = ctx
  if scale != "tiny":
    c.train.lr, c.train.steps, c.train.warmup_steps = 3e-4, 10000, 500
    c.data.batch_size = 32
    # TTT/E2E blocks stacked: a list's remat loses to XLA:GPU's buffer merging (docs/scaling.md)
    m.tie_embeddings, m.compute_dtype, m.remat, m.scan_layers = (
        False, "bfloat16", "full", kind in FIXED_MIXER_KINDS)

  m.mixer = KIND_MIXER[kind]
  if kind in TTT_PRESETS:
    m.ttt.base_lr, warm_up = TTT_PRESETS[kind]
    m.ttt.lr_warmup_steps = c.train.warmup_steps if warm_up else 0
  elif kind == "e2e":
    # TTT-E2E: SWA Transformer, qk-norm, pre+post norms, RoPE theta 5e5, prime MLPs in the
    # last quarter of the blocks; the MLP width shrinks so the parameter count matches the
    # full-attention baseline (125M: 2048 -> 1664).
    m.qk_norm, m.post_norm, m.rope_theta = True, True, 5e5
    e = m.e2e
    e.train_mode = mode
    e.suffix_len = max(1, m.num_layers // 4)
    e.mini_batch_size = min(E2E_CHUNK[scale], ctx)
    width = round_up(m.intermediate_size * m.num_layers / (m.num_layers + e.suffix_len), 128)
    m.intermediate_size = e.prime_intermediate_size = width
  return c


# -- validation ----------------------------------------------------------------------------------

def _check_choice(key: str, value, allowed) -> None:
  if value not in allowed:
    raise ConfigError(f"{key}={value!r} not allowed; choose one of: {', '.join(map(str, allowed))}")


# The numeric knobs and their ranges ("[" / "]" bound included, "(" / ")" not); a float must
# also be finite. `validate` checks them all; a new numeric knob adds its range here.
RANGES = {key: bounds for bounds, keys in (
    ("[1, inf)", "model.num_layers model.d_model model.num_heads model.window "
                 "model.intermediate_size model.vocab_size model.attention_block "
                 "model.attention_flash_block model.ttt.mini_batch_size model.ttt.conv_width "
                 "model.e2e.mini_batch_size model.e2e.prime_intermediate_size data.seq_len "
                 "data.batch_size train.steps train.grad_accum train.log_every train.eval_every "
                 "train.eval_batches checkpoint.keep eval.max_docs eval.chunk eval.batch_size "
                 "eval.first_bucket"),
    ("(0, inf)", "model.rope_theta model.norm_eps model.init_std"),
    ("[0, inf)", "model.ttt.base_lr model.ttt.remat_group model.ttt.lr_warmup_steps "
                 "model.e2e.inner_lr model.e2e.ilr_init model.e2e.ilr_warmup_steps "
                 "model.e2e.inner_clip data.min_doc_len data.prefetch train.lr "
                 "train.warmup_steps train.weight_decay train.grad_clip train.skip_nonfinite "
                 "checkpoint.every_steps eval.stride model.trained_context train.group_leaves"),
    ("[-1, inf)", "model.e2e.inner_attention_block checkpoint.step checkpoint.load_step "
                  "mesh.num_processes mesh.process_id model.e2e.remat_group"),
    ("[0, 1]", "train.min_lr_ratio"), ("[0, 1)", "train.b1 train.b2 data.val_fraction"))
    for key in keys.split()}  # -1: the latest saved step; the environment's process layout


def _check_range(key: str, value, bounds: str) -> None:
  """ConfigError unless `value` is a finite number within `bounds` (see RANGES)."""
  lo, hi = (float(x) for x in bounds[1:-1].split(","))
  ok = (math.isfinite(value) and (lo < value if bounds[0] == "(" else lo <= value)
        and (value < hi if bounds[-1] == ")" else value <= hi))
  if not ok:
    want = f"in {bounds}" if math.isfinite(hi) else f"{'>=' if bounds[0] == '[' else '>'} {lo:g}"
    finite = "" if math.isfinite(value) else "a finite number "
    raise ConfigError(f"{key}={value!r} must be {finite}{want}")


def _compare_keys(cfg, ref, prefix: str) -> None:
  for key in cfg.keys():
    full = f"{prefix}{key}"
    if key not in ref:
      raise ConfigError(f"unknown config key {full!r}; allowed here: {', '.join(sorted(ref))}")
    v, r = cfg[key], ref[key]
    if isinstance(r, ml_collections.ConfigDict):
      if not isinstance(v, ml_collections.ConfigDict):
        raise ConfigError(f"{full} must be a section, got {type(v).__name__}")
      _compare_keys(v, r, full + ".")
    elif r is not None and not isinstance(v, type(r)):
      if isinstance(r, float) and isinstance(v, int) and not isinstance(v, bool):
        continue
      raise ConfigError(f"{full}={v!r} has type {type(v).__name__}; expected {type(r).__name__}")


# Checks that registries add for the knobs they own (model.mixer and each mixer's knobs: the mixer
# registry, ttt_jax/layers/mixers.py); `validate` loads REGISTRY so they run whatever was imported.
CHECKS: list[Callable[[ml_collections.ConfigDict], None]] = []
REGISTRY = "ttt_jax.layers"


def validate(c: ml_collections.ConfigDict) -> ml_collections.ConfigDict:
  """Checks every knob once at start-up (and the registered CHECKS). Returns the config."""
  _compare_keys(c, base_config(), "")
  m, d, tr = c.model, c.data, c.train
  for key, allowed in (("model.kind", MODEL_KINDS), ("model.remat", REMAT_POLICIES),
                       ("model.compute_dtype", DTYPES), ("model.param_dtype", DTYPES),
                       ("model.attention_algorithm", ATTENTION_ALGORITHMS),
                       ("model.attention_impl", ATTENTION_IMPLS),
                       ("model.cache_attention_impl", CACHE_ATTENTION_IMPLS),
                       ("model.ttt.impl", TTT_IMPLS), ("model.ttt.backbone", TTT_BACKBONES),
                       ("model.e2e.train_mode", E2E_TRAIN_MODES), ("train.schedule", SCHEDULES),
                       ("train.init_rng_kernel", INIT_RNG_KERNEL),
                       ("model.e2e.remat_chunks_policy", E2E_REMAT_POLICIES),
                       ("model.e2e.suffix_remat", ("auto", *REMAT_POLICIES)),
                       ("model.e2e.inner_attention_impl", E2E_INNER_ATTENTION_IMPLS),
                       ("model.e2e.window_residuals", E2E_WINDOW_RESIDUALS)):
    _check_choice(key, c[key], allowed)
  for key, bounds in RANGES.items():
    _check_range(key, functools.reduce(lambda node, k: node[k], key.split("."), c), bounds)
  if m.param_dtype == "bfloat16" and not tr.allow_bf16_params:
    raise ConfigError("model.param_dtype='bfloat16' keeps the AdamW moments and updates in "
                      "bfloat16 (small updates round away); use float32 parameters with "
                      "model.compute_dtype='bfloat16', or set train.allow_bf16_params=True")
  if m.d_model % m.num_heads:
    raise ConfigError(
        f"model.d_model={m.d_model} must be divisible by model.num_heads={m.num_heads}")
  if m.num_kv_heads < 0 or (m.num_kv_heads and m.num_heads % m.num_kv_heads):
    raise ConfigError(f"model.num_kv_heads={m.num_kv_heads} must divide model.num_heads="
                      f"{m.num_heads} (0 = num_heads)")
  if (m.d_model // m.num_heads) % 2:
    raise ConfigError(f"model.d_model/model.num_heads={m.d_model // m.num_heads} must be even "
                      "(RoPE rotates pairs of features)")
  importlib.import_module(REGISTRY)  # a plugin load by name: no static upward import
  for check in CHECKS:
    check(c)
  if m.kind in FIXED_MIXER_KINDS and m.mixer != KIND_MIXER[m.kind]:
    raise ConfigError(f"model.mixer={m.mixer!r} not allowed with model.kind={m.kind!r}; "
                      f"use {KIND_MIXER[m.kind]!r}")
  if m.kind == "e2e":
    e = m.e2e
    top, why = ((m.num_layers - 1, "; model.scan_layers=True stacks a prefix of >= 1 block, or "
                 "set it False") if m.scan_layers else (m.num_layers, ""))
    if not 1 <= e.suffix_len <= top:
      raise ConfigError(f"model.e2e.suffix_len={e.suffix_len} must be in [1, {top}] "
                        f"(model.num_layers={m.num_layers}{why})")
    if d.seq_len % e.mini_batch_size:
      raise ConfigError(f"data.seq_len={d.seq_len} must be a multiple of "
                        f"model.e2e.mini_batch_size={e.mini_batch_size}")
    if e.inner_attention_block > 0 and e.mini_batch_size % e.inner_attention_block:
      raise ConfigError(f"model.e2e.inner_attention_block={e.inner_attention_block} must divide "
                        f"model.e2e.mini_batch_size={e.mini_batch_size} (or be 0: off, -1: auto)")
    if e.window_residuals == "chunks" and not (e.remat_chunks and e.remat_chunks_policy == "full"):
      raise ConfigError("model.e2e.window_residuals='chunks' recomputes each chunk step whole: "
                        "needs model.e2e.remat_chunks=True and remat_chunks_policy='full'")
  if d.batch_size % tr.grad_accum:
    raise ConfigError(f"data.batch_size={d.batch_size} must be a multiple of "
                      f"train.grad_accum={tr.grad_accum}")
  for key in ("data", "fsdp", "tensor"):
    v = c.mesh[key]
    if v == 0 or v < -1:
      raise ConfigError(f"mesh.{key}={v} must be a positive size or -1 (fill the rest)")
  parse_rules(c.mesh.rules)
  for item in str(c.eval.ctx).split(","):
    if parse_ctx(item) <= 0:
      raise ConfigError(f"eval.ctx={c.eval.ctx!r}: lengths must be positive, e.g. 1k,2k,8k")
  if c.checkpoint.load_part not in ("", "params"):
    raise ConfigError(f"checkpoint.load_part={c.checkpoint.load_part!r} not allowed; "
                      "choose '' or 'params'")
  if c.checkpoint.load_part and not c.checkpoint.load_from:
    raise ConfigError("checkpoint.load_part='params' needs checkpoint.load_from=<workdir>")
  return c
