"""Checkpoints that hold parameters under their former names (TTT-Linear's `w0`/`b0`, now `w`/`b`)
resume and load into today's model with identical values."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import orbax.checkpoint as ocp
import pytest

from ttt_jax.config import build_config
from ttt_jax.runs import checkpoint as ckpt
from ttt_jax.runs import legacy
from ttt_jax.runs.resume import start_run
from ttt_jax.train.trainer import Trainer

STEP = 3


@pytest.fixture(scope="module")
def trainer():
  c = build_config("model=ttt_linear,ctx=32")
  c.model.update(d_model=32, num_layers=1, num_heads=2, intermediate_size=64)
  c.model.ttt.mini_batch_size = 8
  c.data.batch_size, c.train.steps, c.checkpoint.every_steps = 2, 10, 5
  return Trainer.create(c)


def distinct_state(trainer):
  """A train state whose every entry is distinct (zero-initialised biases and moments would
  hide a mix-up of two leaves)."""
  state = trainer.init_state()
  leaves, tree = jax.tree.flatten((state.params, state.opt_state))
  rng = np.random.default_rng(0)
  leaves = [jnp.asarray(rng.standard_normal(x.shape), x.dtype)
            if jnp.issubdtype(x.dtype, jnp.floating) else x for x in leaves]
  params, opt_state = jax.tree.unflatten(tree, leaves)
  return state.replace(step=state.step + STEP, params=params, opt_state=opt_state)


def save_with_former_names(trainer, state, workdir):
  former = {(holder, new): old for (holder, old), new in legacy.RENAMED_PARAMS.items()}
  params, opt_state = legacy.rename_keys((state.params, state.opt_state), former)
  assert "w0" in params["blocks"][0]["mixer"] and "w" not in params["blocks"][0]["mixer"]
  store = ckpt.RunCheckpoints(str(workdir / ckpt.CKPT_DIR), async_save=False)
  store._mngr.save(STEP, args=ocp.args.Composite(  # noqa: SLF001  (as an old version wrote it)
      params=ocp.args.StandardSave(params),
      train=ocp.args.StandardSave({"step": state.step, "opt_state": opt_state}),
      data=ocp.args.JsonSave({}), config=ocp.args.JsonSave(trainer.config.to_dict())))
  return store


def same(a, b) -> bool:
  return all(jax.tree.leaves(jax.tree.map(lambda x, y: bool(np.array_equal(x, y)), a, b)))


def test_a_checkpoint_with_the_former_names_resumes_and_loads(trainer, tmp_path):
  state = distinct_state(trainer)
  store = save_with_former_names(trainer, state, tmp_path)
  assert "blocks/0/mixer/w0" in store.param_shapes(STEP)
  params = store.restore_params(STEP, trainer.config, trainer.abstract_params,
                                trainer.state_shardings.params)  # load_part=params
  store.close()
  assert same(params, state.params)
  run = start_run(trainer.config, str(tmp_path), trainer, echo=lambda s: None)  # resume
  run.checkpoints.close()
  assert int(run.state.step) == STEP
  assert same((run.state.params, run.state.opt_state), (state.params, state.opt_state))


def test_renames_reach_every_dict_and_only_the_named_holders():
  tree = ({"blocks": {0: {"mixer": {"w0": 1, "b0": 2, "lr_w": 3}, "mlp": {"w0": 4}}}}, [{"x": 5}])
  renames = legacy.undo(legacy.former_names(["blocks/0/mixer/w0", "blocks/0/mixer/b0"]))
  assert legacy.rename_keys(tree, renames) == (
      {"blocks": {0: {"mixer": {"w": 1, "b": 2, "lr_w": 3}, "mlp": {"w0": 4}}}}, [{"x": 5}])
  assert legacy.former_names(["blocks/mixer/w", "head"]) == {}
  assert legacy.current_shapes({"blocks/mixer/b0": (1,), "b0": (2,)}) == {
      "blocks/mixer/b": (1,), "b0": (2,)}
