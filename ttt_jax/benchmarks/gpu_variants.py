"""The train-step variants `make gpu-check` times and `make gpu-census` counts: a train kind
K[-impl][+variant] names a bench kind, the TTT impl it forces and what the variant changes;
`setup_train_kind` compiles one (gpu-check's train tasks, benchmarks/kernel_profile.py)."""

from __future__ import annotations

# K-dual / K-pallas force model.ttt.impl; plain K runs the default (auto: TTT-Linear on a GPU
# takes the Pallas kernels)
TRAIN = ("transformer", "swa", "ttt_linear", "ttt_linear-dual", "ttt_mlp", "ttt_mlp-pallas",
         "e2e-pretrain", "e2e-meta")
# K+V: XLA flags V (set by gpu_check for the task's process): while loops in CUDA graphs; no
# autotuning of the fusions that are not GEMMs (JAX 0.11's XLA tunes every loop and reduction
# fusion's emitter too, GEMMs apart: more than half of a deviceless H200 compile of the E2E meta
# step, docs/gpu_census.md) ...
VARIANTS = {"cmdbuf": "--xla_gpu_enable_command_buffer="
                      "FUSION,CUBLAS,CUBLASLT,CUSTOM_CALL,CUDNN,CONDITIONAL,WHILE",
            "nofusiontune": "--xla_gpu_experimental_enable_fusion_autotuner=false"}
# ... or config overrides V on top of the kind's (`train_kind`; model keys, and train keys
# as 'train.K'): no layer remat; the TTT forward
# kernels' outputs (dual/primal: the inner loop's group weights and outputs) kept under remat;
# E2E chunk steps keep their matmuls; E2E's suffix blocks
# rematerialised again inside the (rematerialised) chunk steps, as before `e2e.suffix_remat`;
# E2E meta as it was before both that and the first suffix attention's hoist (runs 1-4);
# E2E's backward keeping every chunk's KV windows (the scan's own AD) instead of rebuilding
# them from each chunk's new keys (`e2e.window_residuals`; `before` keeps them too);
# E2E's inner-loop attention by the package's blockwise code (skips key blocks no query sees,
# e.g. the carried window's empty slots, with a conditional per block) instead of dense XLA;
# E2E's inner-loop attention as one dense call per chunk (`e2e.inner_attention_block` auto turns
# rematerialised query blocks on at the 125m preset: `train125m:e2e+innerdense` is the program
# before them);
# E2E's chunk loop in checkpointed groups of 2 chunk steps (`e2e.remat_group`: remat through
# time, what the context-extension stages want from 760m on; its price is one more forward pass
# of every chunk step);
# TTT without remat through time; the layers as one scanned block (compiled once; E2E: its
# prefix blocks), or as a list of blocks (the TTT and E2E presets from 125m up stack them;
# `train125m:K+list` is the list layout); the optimizer over every parameter leaf in flat groups
# (`train.group_leaves`: a few kernels instead of a few per leaf)
CONFIG_VARIANTS = {"noremat": {"remat": "none"}, "rematkernels": {"remat": "kernels"},
                   "chunkdots": {"e2e.remat_chunks_policy": "dots"},
                   "suffixremat": {"e2e.suffix_remat": "full"},
                   "before": {"e2e.suffix_remat": "full", "e2e.hoist_first_attention": False,
                              "e2e.window_residuals": "windows"},
                   "windows": {"e2e.window_residuals": "windows"},
                   "innerblockwise": {"e2e.inner_attention_impl": "blockwise"},
                   "innerdense": {"e2e.inner_attention_block": 0},
                   "groups": {"e2e.remat_group": 2},
                   "nogroups": {"ttt.remat_group": 0}, "scan": {"scan_layers": True},
                   "list": {"scan_layers": False}, "grouped": {"train.group_leaves": 1 << 30}}
# ... or `ttt_pallas.tuning` overrides V while the step is traced (xlaout: TTT-Linear's z by XLA;
# unrolled: the TTT-MLP kernels' hidden blocks written out, at 64-unit blocks)
TUNING_VARIANTS = {"xlaout": {"linear_output": "xla"},
                   "unrolled": {"mlp_unroll": True, "mlp_block": 64}}
# config-variant train kinds that gpu_census also counts
RUN_VARIANTS = ("transformer+noremat", "ttt_linear+rematkernels", "e2e-meta+chunkdots",
                "e2e-meta+suffixremat", "e2e-meta+before", "e2e-meta+innerblockwise",
                "ttt_mlp+nogroups", "ttt_mlp+rematkernels", "transformer+scan", "ttt_linear+scan",
                "ttt_mlp-pallas+scan", "ttt_linear+xlaout", "ttt_mlp-pallas+unrolled",
                "e2e-meta+scan", "e2e-pretrain+scan", "e2e-meta+windows", "e2e-meta+groups",
                "transformer+grouped", "ttt_linear+grouped", "e2e-meta+grouped")


def train_kind(kind: str) -> tuple[str, dict]:
  """(benchmark kind, model overrides) of train kind K[-impl][+variant]: ttt_K-impl forces
  model.ttt.impl; a `CONFIG_VARIANTS` variant adds its overrides (XLA-flag variants none)."""
  kind, _, variant = kind.partition("+")
  base, _, impl = kind.partition("-") if kind.startswith("ttt_") else (kind, "", "")
  return base, {**({"ttt.impl": impl} if impl else {}), **CONFIG_VARIANTS.get(variant, {})}


def variant_tuning(kind: str) -> dict:
  """The `ttt_pallas.tuning` overrides of train kind K[+variant] (`TUNING_VARIANTS`)."""
  return TUNING_VARIANTS.get(kind.partition("+")[2], {})


def setup_train_kind(kind: str, preset: str = "gpu", mark=None):
  """(compiled train step, state, batch of random tokens, info) of train kind K at bench preset
  `preset`: `train_kind`'s model, traced and compiled under `variant_tuning`'s launch settings
  (`mark`: `training.train_setup_from_config`'s)."""
  from ttt_jax.benchmarks.common import PRESETS  # noqa: PLC0415
  from ttt_jax.benchmarks.training import _train_setup  # noqa: PLC0415
  from ttt_jax.layers import ttt_pallas  # noqa: PLC0415

  base, overrides = train_kind(kind)
  with ttt_pallas.tuning(**variant_tuning(kind)):
    _, compiled, state, batch, info = _train_setup(base, PRESETS[preset], overrides=overrides,
                                                   mark=mark)
  return compiled, state, batch, info


def pretrain_config(kind: str, scale: str = "125m"):
  """The validated pretraining preset of model kind K[+V] at `scale` (125m: gpu-check's
  train125m) and 8K context, bf16, batch 8 (V a `gpu_variants` variant: its config overrides,
  `train_kind`'s)."""
  from ttt_jax.benchmarks.common import apply_overrides  # noqa: PLC0415
  from ttt_jax.benchmarks.presets import load_preset, preset_spec  # noqa: PLC0415
  from ttt_jax.config import validate  # noqa: PLC0415

  kind, overrides = train_kind(kind)
  cfg = load_preset(preset_spec(kind, scale, "8k"))
  cfg.data.batch_size, cfg.model.compute_dtype = 8, "bfloat16"
  apply_overrides(cfg, overrides)
  return validate(cfg)


# {layer: launch settings}, the first the default (ttt_pallas.Tuning), a value per field of
# TUNE_FIELDS[layer] (the Tuning field, its tag in the row name). H200, 2026-12-04: 2 warps took
# 9x longer (29 ms) for TTT-Linear and are no longer tried.
TUNE_FIELDS = {"ttt_linear": (("num_warps", "w"), ("num_stages", "s"), ("linear_output", "-")),
               "ttt_mlp": (("mlp_num_warps", "w"), ("mlp_block", "b"),
                           ("mlp_unroll", "-unrolled"))}
# TTT-MLP: (8, 64, True) writes the hidden blocks out (Tuning.mlp_unroll) at 64-unit blocks
TUNE_CASES = {"ttt_linear": ((4, 3, "kernel"), (4, 1, "kernel"), (4, 4, "kernel"),
                             (8, 3, "kernel"), (4, 3, "xla"), (8, 3, "xla")),
              "ttt_mlp": ((8, 32, False), (8, 64, False), (8, 64, True), (4, 32, False),
                          (16, 32, False), (8, 16, False), (8, 128, False))}


def launch_tag(tag: str, value) -> str:
  """A launch setting in a row name: a flag by its tag when set, any other value after it."""
  if isinstance(value, bool):
    return tag if value else ""
  return f"{tag}{value}"


def tune_sweep(layer: str) -> list[tuple[str, str, str, dict]]:
  """gpu-check's `tune` rows of TTT layer `layer` at the preset's width: (row name, impl,
  matmul precision, `ttt_pallas.tuning` overrides): the dual form and the kernels at IEEE fp32
  (the kernels at their default launch settings) and at the default precision (TF32 on a GPU;
  the kernels over `TUNE_CASES[layer]`)."""
  rows = []
  for precision in ("highest", "default"):
    sweep = TUNE_CASES[layer] if precision == "default" else TUNE_CASES[layer][:1]
    for impl, cases in (("dual", [None]), ("pallas", sweep)):
      for case in cases:
        fields = TUNE_FIELDS[layer] if case else ()
        pairs = list(zip(fields, case or (), strict=True))
        launch = "".join(launch_tag(tag, v) for (_, tag), v in pairs)
        rows.append((f"{impl}/{precision}" + (f"/{launch}" if launch else ""), impl, precision,
                     {field: v for (field, _), v in pairs}))
  return rows
