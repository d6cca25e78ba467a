"""Random initialisation through JAX's threefry GPU kernel (`models.gpu_rng_kernels`): the
program a GPU compiles changes, the parameters do not."""

import types

import jax
import numpy as np
import pytest

from ttt_jax.benchmarks import gpu_check, gpu_report, streaming
from ttt_jax.benchmarks.common import PRESETS, model_config, tree_rel_err
from ttt_jax.config import ConfigError, validate
from ttt_jax.models import gpu_rng_kernels, rng_kernel_same_bits
from ttt_jax.train.trainer import Trainer

KERNEL = "threefry2x32_ffi"  # JAX's CUDA kernel's custom-call target (cu_threefry2x32_ffi)


def _flag() -> bool:
  return jax.config.jax_threefry_gpu_kernel_lowering


@pytest.fixture(scope="module")
def trainer():
  return Trainer.create(model_config("ttt_linear", PRESETS["quick"]))


def test_init_state_lowers_its_draws_to_the_kernel_for_cuda_only(trainer):
  plain = jax.jit(trainer._init, static_argnums=0, out_shardings=trainer.state_shardings)  # noqa: SLF001
  with jax.set_mesh(trainer.mesh):
    inlined = plain.trace(3).lower(lowering_platforms=("cuda",)).as_text()
  kernel = trainer.lower_init(3, ("cuda",)).as_text()
  assert KERNEL in kernel and KERNEL not in inlined
  # the hash's rounds are no longer written out in the program
  assert kernel.count("stablehlo.shift_left") < inlined.count("stablehlo.shift_left") / 4
  assert KERNEL not in trainer.lower_init(3).as_text()  # this backend (CPU) lowers as before
  assert not _flag()  # the setting is put back


@pytest.mark.parametrize("setting", ["on", "off"])
def test_train_init_rng_kernel_turns_the_kernel_on_and_off(setting):
  cfg = model_config("transformer", PRESETS["quick"])
  cfg.train.init_rng_kernel = setting
  text = Trainer.create(cfg).lower_init(0, ("cuda",)).as_text()
  assert (KERNEL in text) == (setting == "on")


def test_auto_draws_through_the_kernel_unless_stacked_blocks_are_split_over_devices():
  def resolved(setting, devices, scan_layers=False):
    fake = types.SimpleNamespace(config=types.SimpleNamespace(
        train=types.SimpleNamespace(init_rng_kernel=setting),
        model=types.SimpleNamespace(scan_layers=scan_layers)),
        mesh=types.SimpleNamespace(devices=np.empty(devices)))
    return Trainer.init_rng_kernel.fget(fake)
  assert resolved("auto", (1, 1, 1)) and resolved("auto", (1, 1, 1), scan_layers=True)
  assert resolved("auto", (1, 8, 1)) and not resolved("auto", (1, 8, 1), scan_layers=True)
  assert resolved("on", (2, 2, 2), scan_layers=True) and not resolved("off", (1, 1, 1))
  cfg = model_config("transformer", PRESETS["quick"])
  cfg.train.init_rng_kernel = "yes"
  with pytest.raises(ConfigError, match="train.init_rng_kernel"):
    validate(cfg)


def test_init_state_gives_the_parameters_of_the_plain_program(trainer):
  state = trainer.init_state(5)
  with jax.set_mesh(trainer.mesh):
    ref = jax.jit(trainer._init, static_argnums=0, out_shardings=trainer.state_shardings)(5)  # noqa: SLF001
  leaves, ref_leaves = jax.tree.leaves(state), jax.tree.leaves(ref)
  assert len(leaves) == len(ref_leaves) > 10
  assert all(np.array_equal(a, b) for a, b in zip(leaves, ref_leaves, strict=True))
  assert tree_rel_err(trainer.init_state(6).params, state.params) > 0.1  # the seed still counts


def test_the_setting_is_put_back_after_an_error_and_nests():
  with pytest.raises(RuntimeError), gpu_rng_kernels():
    assert _flag()
    raise RuntimeError("x")
  assert not _flag()
  with gpu_rng_kernels():
    with gpu_rng_kernels(False):
      assert not _flag()
    assert _flag()
  assert not _flag()


def test_same_bits_check_runs_here_and_the_summary_reports_it(tmp_path):
  assert rng_kernel_same_bits((17, 5)) is True  # CPU: one lowering
  env = {"device": "NVIDIA H200", "versions": {"jax": "0.11.2"},
         "bf16_matmul_flops_per_s": 7e14}
  texts = {}
  for same in (True, False, None, "XlaRuntimeError: no such target"):
    e = env if same is None else dict(env, rng_kernel_same_bits=same)
    texts[same] = open(gpu_report.write_markdown({"env": e}, str(tmp_path / f"{same}.md"))).read()
  assert "draws the same bits as the inlined hash" in texts[True]
  assert "**JAX's threefry kernel" in texts[False] and "differ from CPU's" in texts[False]
  assert "threefry" not in texts[None]
  failed = texts["XlaRuntimeError: no such target"]
  assert "failed** (XlaRuntimeError: no such target)" in failed and "init_rng_kernel=off" in failed


def test_gpu_check_tasks_and_the_streamer_draw_through_the_kernel(monkeypatch, capsys):
  seen = []
  monkeypatch.setattr(gpu_check, "run_task", lambda name: seen.append(_flag()) or {})
  assert gpu_check.main(["--task", "env"]) == 0
  real = streaming.build_model
  monkeypatch.setattr(streaming, "build_model", lambda *a: seen.append(_flag()) or real(*a))
  streaming.Streamer("transformer", PRESETS["quick"])
  assert seen == [True, True] and not _flag()


def test_tree_rel_err_is_the_worst_leafs_error_over_its_own_scale():
  rng = np.random.default_rng()
  b = {"x": rng.standard_normal((4, 5)), "y": 100 * rng.standard_normal(7)}
  a = {k: v.copy() for k, v in b.items()}
  a["x"][1, 2] += 0.3
  a["y"][3] -= 2.0
  want = max(0.3 / np.abs(b["x"]).max(), 2.0 / np.abs(b["y"]).max())
  assert tree_rel_err(a, b) == pytest.approx(want, rel=1e-9)
  assert tree_rel_err([a["x"], a["y"]], b) == pytest.approx(want, rel=1e-9)  # paired in order
  assert tree_rel_err(b, b) == 0.0
  a["x"][0, 0] = np.nan  # a NaN in any leaf shows
  assert np.isnan(tree_rel_err(a, b)) and np.isnan(tree_rel_err([b["y"], a["x"]], [b["y"], b["x"]]))
  with pytest.raises(ValueError, match="shapes"):
    tree_rel_err(b["x"][:1], b["x"])
