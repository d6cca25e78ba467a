"""Subprocess side of tests/test_sharding.py (needs its own XLA device flags).

`meshes`: for each model kind, trains 3 steps on 1 device and on the (data, fsdp, tensor) meshes
(8,1,1), (1,8,1), (2,2,2) of 8 forced host devices; saves a checkpoint on (2,2,2) and restores
it on (1,8,1) and on 1 device; with --proc-ckpt, trains 3 steps on pipeline batches on 1 device
(the reference of the two-process run) and restores that run's checkpoint. Prints one JSON line.
`process`: one of two processes of a localhost `jax.distributed` job (4 CPU devices each) that
trains the tiny model 3 steps on its own shard of the data and saves a checkpoint collectively.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import sys
import time
import traceback

import jax
import numpy as np
import orbax.checkpoint as ocp

from ttt_jax import sharding as shd
from ttt_jax.config import ConfigError, build_config
from ttt_jax.train import distributed
from ttt_jax.train.metrics import MetricWriter
from ttt_jax.train.trainer import Trainer

MESHES = {"8,1,1": (8, 1, 1), "1,8,1": (1, 8, 1), "2,2,2": (2, 2, 2)}
STEPS = 3
BATCH, SEQ = 8, 32
# E2E: one prefix and two suffix blocks (the second carries a KV window through the chunk loop,
# models/window_scan.py), or with e2e+scan two stacked prefix blocks and one suffix block; one
# block for the other kinds
LAYERS = {"e2e": 3}
# non-default rules on the (2,2,2) mesh for the kinds with a vmap or a kernel in their step: the
# batch takes all three mesh axes (the heads none), the vocabulary 'fsdp' where it is free
RULES, RULES_KINDS = "batch=data+fsdp+tensor,vocab=fsdp", ("e2e", "ttt_linear-pallas")


def tiny_config(kind: str, mesh=(1, 1, 1)):
  """`kind`: a model kind, K-pallas: TTT kind K with its Pallas kernels (interpreted), or
  e2e+scan: E2E with its two prefix blocks stacked (`model.scan_layers`) and its chunk loop as
  one checkpointed group of both chunks (`model.e2e.remat_group`: a window_scan in a
  window_scan, the suffix block's attention and KV window in the loop)."""
  kind, _, variant = kind.partition("+")
  base, _, impl = kind.partition("-")
  c = build_config(f"model={base},ctx={SEQ}")
  m = c.model
  m.num_layers, m.d_model, m.num_heads, m.intermediate_size = LAYERS.get(kind, 1), 64, 4, 128
  m.e2e.suffix_len = 1 if variant == "scan" else 2
  m.scan_layers = variant == "scan"
  if impl:
    m.ttt.impl = impl
  m.window = 16
  m.num_kv_heads = 0 if kind.startswith("ttt") else 2  # attention: grouped-query, sharded too
  m.ttt.mini_batch_size = 8
  m.e2e.mini_batch_size, m.e2e.prime_intermediate_size = 16, 128
  m.e2e.ilr_warmup_steps, m.e2e.remat_group = 1, 2 if variant == "scan" else 0
  m.e2e.hoist_first_attention = variant != "scan"
  c.data.batch_size, c.data.seq_len, c.data.shuffle, c.data.prefetch = BATCH, SEQ, False, 0
  c.train.steps, c.train.warmup_steps, c.train.lr = STEPS, 1, 1e-2
  c.mesh.data, c.mesh.fsdp, c.mesh.tensor = mesh
  return c


def _flat(tree) -> dict[str, object]:
  return {jax.tree_util.keystr(p): x for p, x in jax.tree_util.tree_leaves_with_path(tree)}


def _run(trainer, batches, state=None, grad_norms: list | None = None, step=None):
  """(final state, losses, first moments after the first step). Adam's first moment after one
  step is (1 - b1) x the (norm-clipped) gradient at the initial parameters: the gradient of the
  first batch, read before the next step donates the state. `grad_norms`: gets each step's
  `grad_norm` metric. `step`: the trainer's train step compiled ahead of time (default: its
  jitted step)."""
  state = trainer.init_state() if state is None else state
  step = trainer.train_step if step is None else step
  losses, first = [], None
  for b in batches:
    state, metrics = step(state, trainer.device_batch(b))
    losses.append(float(jax.device_get(metrics["loss"])))
    if grad_norms is not None:
      grad_norms.append(float(jax.device_get(metrics["grad_norm"])))
    if first is None:
      first = {k: np.asarray(jax.device_get(x)) for k, x in _flat(state.opt_state).items()
               if ".mu" in k}
  return state, losses, first


def _max_rel(a: dict, b: dict) -> dict[str, float]:
  """Per leaf max |a - b| / max |b|; b is the reference."""
  out = {}
  for k, x in a.items():
    x, y = np.asarray(x, np.float64), np.asarray(b[k], np.float64)
    out[k] = float(np.max(np.abs(x - y)) / (np.max(np.abs(y)) + 1e-12))
  return out


def _norm_rel(a: dict, b: dict) -> dict[str, float]:
  """Per leaf |a - b| / |b| (Frobenius norms); b is the reference."""
  out = {}
  for k, x in a.items():
    x, y = np.asarray(x, np.float64), np.asarray(b[k], np.float64)
    out[k] = float(np.linalg.norm(x - y) / max(np.linalg.norm(y), 1e-30))
  return out


def _bytes_per_device(params) -> tuple[int, int]:
  total = sum(x.nbytes for x in jax.tree.leaves(params))
  local = sum(x.addressable_shards[0].data.nbytes for x in jax.tree.leaves(params))
  return local, total


def _spec(x) -> list:
  return [list(a) if isinstance(a, tuple) else a for a in x.sharding.spec]


def meshes(kinds: list[str], ckpt_dir: str, proc_ckpt: str = "") -> dict:
  devices = jax.devices()
  rng = np.random.default_rng(0)
  out: dict = {"num_devices": len(devices), "kinds": {}}
  reference = None  # the 1-device transformer trainer (compiled once, reused below)
  for kind in kinds:
    res: dict = {}
    t0 = time.perf_counter()
    out["kinds"][kind] = res
    try:
      batches = [{"tokens": rng.integers(0, 259, (BATCH, SEQ + 1), dtype=np.int32)}
                 for _ in range(STEPS)]
      cfg = tiny_config(kind)
      single = Trainer.create(cfg, shd.make_mesh(cfg.mesh, devices[:1]))
      # eager init, kept on the host (steps donate their input); every mesh starts from it
      ref_init = jax.device_get(single._init(cfg.seed))
      ref_norms: list = []
      ref_state, ref_losses, ref_grads = _run(single, batches,
                                              jax.device_put(ref_init, single.state_shardings),
                                              ref_norms)
      ref_params = _flat(jax.device_get(ref_state.params))
      res["single"] = {"losses": ref_losses, "norm_rows": single.norm_rows,
                       "grad_norms": ref_norms}
      if kind == "transformer":
        reference = single
      trainers = {}
      for name, shape in MESHES.items():
        cfg = tiny_config(kind, shape)
        tr = Trainer.create(cfg, shd.make_mesh(cfg.mesh, devices))
        trainers[name] = tr
        init = jax.device_put(ref_init, tr.state_shardings)  # same init, resharded
        local, total = _bytes_per_device(init.params)
        params = _flat(init.params)
        mu = _flat(init.opt_state)
        norms: list = []
        # the compiled step's collectives: read from the program that runs (compiled once)
        collectives = kind in ("e2e", "ttt_linear", "ttt_mlp") and name == "1,8,1"
        step = (tr.train_step.lower(init, tr.device_batch(batches[0])).compile()
                if collectives else None)
        state, losses, grads = _run(tr, batches, init, norms, step)
        res[name] = {
            "losses": losses, "grad_norms": norms,
            "grad_rel_diff": _norm_rel(grads, ref_grads),
            "param_rel_diff": _max_rel(_flat(jax.device_get(state.params)), ref_params),
            "bytes_per_device": local, "bytes_total": total,
            "specs": {k: _spec(x) for k, x in params.items()},
            "opt_specs": {k: _spec(x) for k, x in mu.items() if ".mu" in k},
            "batch_spec": _spec(tr.device_batch(batches[0])["tokens"]),
            "norm_rows": tr.norm_rows,
        }
        if name == "2,2,2":
          ck_state = state
        if collectives:
          text = step.as_text()
          res[name]["collectives"] = _collectives(text)
          res[name]["loop_collectives"] = _collectives(text, in_loops=True)
      if kind in RULES_KINDS:
        cfg = tiny_config(kind, MESHES["2,2,2"])
        cfg.mesh.rules = RULES
        tr = Trainer.create(cfg, shd.make_mesh(cfg.mesh, devices))
        init = jax.device_put(ref_init, tr.state_shardings)
        _, losses, grads = _run(tr, batches, init)
        res["2,2,2+rules"] = {"losses": losses, "grad_rel_diff": _norm_rel(grads, ref_grads),
                              "specs": {k: _spec(x) for k, x in _flat(init.params).items()},
                              "batch_spec": _spec(tr.device_batch(batches[0])["tokens"])}
      # checkpoint: save on (2,2,2), restore on (1,8,1) and on one device
      path = os.path.join(ckpt_dir, kind)
      saved = _flat(jax.device_get(ck_state.params))
      ckptr = ocp.StandardCheckpointer()
      ckptr.save(path, ck_state.params)
      ckptr.wait_until_finished()
      restored = {}
      for name, tr in (("1,8,1", trainers["1,8,1"]), ("single", single)):
        target = jax.tree.map(lambda a, s: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=s),
                              tr.abstract_params, tr.state_shardings.params)
        params = ckptr.restore(path, target)
        flat = _flat(params)
        restored[name] = {
            "max_abs_diff": max(float(np.max(np.abs(np.asarray(jax.device_get(flat[k]))
                                                     - saved[k]))) for k in saved),
            "specs_match": all(flat[k].sharding.spec == s.spec for k, s in
                               _flat(tr.state_shardings.params).items()),
        }
      res["restore"] = restored
      res["seconds"] = time.perf_counter() - t0
    except Exception:  # noqa: BLE001 (reported to the test, which fails on it)
      res["error"] = traceback.format_exc()
  if "transformer" in kinds:
    out["tlm"] = _tlm_on_fsdp(devices)
    out["batch_split_errors"] = _batch_split_errors(devices)
  if "ttt_linear" in kinds:
    out["kernels"] = _kernels_on_mesh(devices)
  if not proc_ckpt:
    return out
  # pipeline batches on one device: the reference of the two-process run
  if reference is None:
    cfg = tiny_config("transformer")
    reference = Trainer.create(cfg, shd.make_mesh(cfg.mesh, devices[:1]))
  ds = reference.dataset("train")
  state, losses, _ = _run(reference, [ds[i] for i in range(STEPS)])
  out["pipeline_single"] = {"losses": losses}
  # the two-process run's checkpoint, restored on one device
  target = jax.tree.map(lambda a, s: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=s),
                        reference.abstract_params, reference.state_shardings.params)
  restored = _flat(ocp.StandardCheckpointer().restore(proc_ckpt, target))
  diffs = _max_rel(restored, _flat(jax.device_get(state.params)))
  out["proc_ckpt_max_rel_diff"] = max(diffs.values())
  return out


def _batch_split_errors(devices) -> dict:
  """Trainer.create's message, per mesh, for a batch of 6 the batch's devices do not divide,
  and for microbatches of 2 sequences over 4 batch devices."""
  errors = {}
  for name, batch, accum in (("8,1,1", 6, 1), ("2,2,2", 6, 1), ("2,2,2+accum", 8, 4)):
    cfg = tiny_config("transformer", MESHES[name.split("+")[0]])
    cfg.data.batch_size, cfg.train.grad_accum = batch, accum
    try:
      Trainer.create(cfg, shd.make_mesh(cfg.mesh, devices))
      errors[name] = None
    except ConfigError as e:
      errors[name] = str(e)
  return errors


def _tlm_on_fsdp(devices) -> dict:
  """TLM adapting a model whose weights are FSDP-sharded over 8 devices (as a run loaded on that
  mesh has them) against the same on one device: adapted log-perplexities and how many times the
  step compiled."""
  from ttt_jax.eval import tlm as tlm_lib  # only this check needs eval/

  rng = np.random.default_rng(1)
  samples = rng.integers(0, 259, (4, SEQ + 1), dtype=np.int32)
  res = {}
  try:
    init = None
    for name, shape, devs in (("single", (1, 1, 1), devices[:1]), ("1,8,1", (1, 8, 1), devices)):
      cfg = tiny_config("transformer", shape)
      tr = Trainer.create(cfg, shd.make_mesh(cfg.mesh, devs))
      init = jax.device_get(tr._init(cfg.seed).params) if init is None else init
      params = jax.device_put(init, tr.state_shardings.params)
      tc = tlm_lib.default_config()
      tc.rank, tc.alpha, tc.lr, tc.log_p0, tc.eval_batch_size = 4, 8.0, 1e-2, 0.0, 4
      tlm, lora0 = tlm_lib.TLM.create(tr.model(params), tc)
      lora, _ = tlm.adapt_offline(lora0, samples, progress=False)
      res[name] = {"log_ppl": tlm.evaluate(lora, samples).tolist(),
                   "step_compiles": tlm._step_jit._cache_size(),
                   "base_sharded": any(len(x.sharding.device_set) > 1 and not
                                       x.sharding.is_fully_replicated
                                       for x in jax.tree.leaves(tlm.base))}
  except Exception:  # noqa: BLE001 (reported to the test, which fails on it)
    res["error"] = traceback.format_exc()
  return res


def _collectives(text: str, in_loops: bool = False) -> dict[str, int]:
  """{collective opcode: count} of a compiled (partitioned) program; `in_loops`: only those in
  the bodies of its while loops (and what they call), which run once per trip."""
  from ttt_jax.benchmarks.hlo_text import COLLECTIVES, computations  # noqa: PLC0415

  comps, _ = computations(text)
  names = set(comps)
  if in_loops:
    names, todo = set(), [re.search(r"body=%([\w.\-]+)", after).group(1)
                          for insts in comps.values() for _, op, after in insts if op == "while"]
    while todo:
      c = todo.pop()
      if c not in names:
        names.add(c)
        todo += [m for _, _, after in comps[c]
                 for m in re.findall(r"(?:body|condition|calls|to_apply)=%([\w.\-]+)", after)]
  ops = [op.removesuffix("-start") for c in names for _, op, _ in comps[c]]
  return {c: ops.count(c) for c in COLLECTIVES if c in ops}


def _inside_manual(text: str, target: str) -> list[bool]:
  """For each call of custom-call `target` in a lowered module: does it run inside a
  `sdy.manual_computation` region (a shard_map body, run per device on local shapes), in that
  region itself or in a function only ever called from such regions?"""
  funcs: dict[str, list[tuple[bool, str]]] = {}
  name, inside = None, False
  for line in text.splitlines():
    start = re.match(r"\s*func\.func (?:public |private )?@([\w$.-]+)\(", line)
    if start:
      name, inside = start.group(1), False
      funcs[name] = []
      continue
    if "sdy.manual_computation(" in line:
      inside = True
    if name is not None:
      funcs[name].append((inside, line))
    if "sdy.return" in line:
      inside = False
  sites = [(caller, callee, ins) for caller, lines in funcs.items() for ins, line in lines
           for callee in re.findall(r"call @([\w$.-]+)\(", line)]
  manual = {f: f != "main" for f in funcs}  # every call site of f in a per-device context
  for _ in funcs:  # to the fixed point
    for f in funcs:
      called = [ins or manual[caller] for caller, callee, ins in sites if callee == f]
      manual[f] = f != "main" and bool(called) and all(called)
  return [ins or manual[f] for f, lines in funcs.items() for ins, line in lines
          if f"custom_call @{target}(" in line]


def _kernels_on_mesh(devices) -> dict:
  """The Pallas kernels on the (2,2,2) mesh, per device (`sharding.per_shard`): splash attention
  and the full-attention cache kernel (interpreted on CPU) against the same call without a
  mesh; the TTT-Linear train step lowered for CUDA and the transformer's for TPU on that mesh,
  where every kernel call must sit in a per-device region."""
  import dataclasses  # noqa: PLC0415

  import jax.numpy as jnp  # noqa: PLC0415

  from ttt_jax.benchmarks import lowering  # noqa: PLC0415
  from ttt_jax.layers.attention import AttentionAlgorithm, dot_product_attention  # noqa: PLC0415

  res: dict = {}
  try:
    mesh = shd.make_mesh(tiny_config("transformer", (2, 2, 2)).mesh, devices)
    rng = np.random.default_rng(2)
    b, t, h, hkv, d = 4, 256, 4, 2, 16  # grouped-query: 2 query heads per key/value head
    q, k, v = (jnp.asarray(rng.normal(size=(b, t, n, d)), jnp.float32) for n in (h, hkv, hkv))
    pos = jnp.arange(t, dtype=jnp.int32)
    cases = {  # one-shot causal splash; 8 new queries against a cache filled to 200 slots
        "splash": lambda q, k, v: dot_product_attention(
            q, k, v, pos, pos, 64, ordered=True,
            algorithm=AttentionAlgorithm(impl="splash", interpret=True)),
        "cache": lambda q, k, v: dot_product_attention(
            q[:, 192:200], k, v, pos[192:200], jnp.where(pos < 200, pos, -1), None,
            filled=jnp.int32(200), algorithm=AttentionAlgorithm(cache_impl="pallas",
                                                                interpret=True))}
    for name, fn in cases.items():
      ref = np.asarray(jax.jit(fn)(q, k, v), np.float64)
      with shd.activation_sharding(mesh):
        sharded = jax.jit(lambda *a, fn=fn: fn(*a))  # a new function: traced under the mesh
        text = sharded.lower(q, k, v).as_text()
        got = np.asarray(sharded(q, k, v), np.float64)
      res[name] = {"max_rel": float(np.max(np.abs(got - ref)) / np.max(np.abs(ref))),
                   "manual_regions": text.count("sdy.manual_computation(")}
    res["ttt_stream"] = _ttt_stream_on_mesh(mesh, rng)
    # per_shard of plain code, against the same without a mesh: value and gradients where the
    # batch or the heads do not divide the mesh axes, a Python scalar among the arguments
    def fn(x, w, s):
      return {"y": jnp.tanh(x * w[None, :, None]) * s}

    def loss(x, w, wrap):
      f = shd.per_shard(fn, [("batch", "heads"), ("heads",), ()], ("batch", "heads")) if wrap \
          else fn
      return jnp.sum(f(x, w, 2.0)["y"] ** 2)

    res["plain"] = []
    for b, h in ((3, 4), (4, 3), (8, 2)):
      x = jnp.asarray(rng.normal(size=(b, h, 5)), jnp.float32)
      w = jnp.asarray(rng.normal(size=(h,)), jnp.float32)
      ref = jax.grad(loss, argnums=(0, 1))(x, w, False)
      with shd.activation_sharding(mesh):
        got = jax.jit(jax.grad(lambda x, w: loss(x, w, True), argnums=(0, 1)))(x, w)
      res["plain"].append(max(float(np.max(np.abs(np.asarray(g) - np.asarray(r)))
                                    / np.max(np.abs(np.asarray(r))))
                              for g, r in zip(got, ref, strict=True)))
    size = dataclasses.replace(lowering.SIZE, batch=4, num_layers=2)
    for kind, platform, target in (("ttt_linear", "cuda", "__gpu$xla.gpu.triton"),
                                   ("transformer", "tpu", "tpu_custom_call")):
      exported = lowering.lower_train_step(kind, size=size, mesh=(2, 2, 2), platform=platform)
      text = exported.mlir_module()
      regions = [line for line in text.splitlines() if "sdy.manual_computation(" in line]
      res[f"{kind}-{platform}"] = {
          "devices": exported.nr_devices, "inside": _inside_manual(text, target),
          # each per-device region takes its arguments split over the batch's axes
          "batch_split": bool(regions) and all('{"data", "fsdp"}' in r for r in regions)}
  except Exception:  # noqa: BLE001 (reported to the test, which fails on it)
    res["error"] = traceback.format_exc()
  return res


def _ttt_stream_on_mesh(mesh, rng) -> dict:
  """A TTT-Linear layer (`ttt.impl=pallas`, interpreted) streaming 21 tokens, one mini-batch
  of 16 and 5 buffered (the kernels with `complete`), on the mesh against the same without it:
  the largest relative difference of the outputs and the state's inner weights, and the
  per-device regions of the program on the mesh."""
  import jax.numpy as jnp  # noqa: PLC0415
  from flax import nnx  # noqa: PLC0415

  from ttt_jax.layers import ttt_inner, ttt_variants  # noqa: PLC0415
  from ttt_jax.layers.ttt import TTTMixer  # noqa: PLC0415
  from ttt_jax.models.config import model_config  # noqa: PLC0415

  c = build_config("model=ttt_linear").model
  c.d_model, c.num_heads, c.ttt.mini_batch_size, c.ttt.impl = 64, 4, 16, "pallas"
  cfg = ttt_variants.ttt_config(model_config(c), ttt_inner.inner_model_for_mixer("ttt_linear")
                                .name)
  mixer = TTTMixer(cfg, compute_dtype=jnp.float32, param_dtype=jnp.float32, rngs=nnx.Rngs(0))
  graphdef, params = nnx.split(mixer)
  x = jnp.asarray(rng.normal(size=(4, 21, 64)), jnp.float32)
  pos = jnp.arange(21, dtype=jnp.int32)

  def stream(params, x):
    m = nnx.merge(graphdef, params)
    y, state = m(x, pos, m.init_state(x.shape[0]))
    return y, state.params

  ref = jax.jit(stream)(params, x)
  with shd.activation_sharding(mesh):
    sharded = jax.jit(lambda p, x: stream(p, x))
    text = sharded.lower(params, x).as_text()
    got = sharded(params, x)
  rel = max(float(np.max(np.abs(np.asarray(g) - np.asarray(r))) / np.max(np.abs(np.asarray(r))))
            for g, r in zip(jax.tree.leaves(got), jax.tree.leaves(ref), strict=True))
  return {"max_rel": rel, "manual_regions": text.count("sdy.manual_computation(")}


def process(pid: int, nproc: int, port: int, workdir: str) -> dict:
  cfg = tiny_config("transformer", (2, 2, 2))
  cfg.mesh.distributed = True
  cfg.mesh.coordinator_address = f"127.0.0.1:{port}"
  cfg.mesh.num_processes, cfg.mesh.process_id = nproc, pid
  distributed.initialize(cfg)
  trainer = Trainer.create(cfg)
  ds = trainer.dataset("train")
  local = [ds[i] for i in range(STEPS)]
  state, losses, _ = _run(trainer, local)
  writer = MetricWriter(os.path.join(workdir, "run"), echo=lambda s: None)
  writer.write(STEPS, {"loss": losses[-1]})
  writer.close()
  ckptr = ocp.StandardCheckpointer()
  ckptr.save(os.path.join(workdir, "ckpt"), state.params)
  ckptr.wait_until_finished()
  distributed.barrier("saved")
  embed = state.params["embed"]["embedding"]
  # the batch split over `fsdp` alone, whose devices each process holds whole: both processes
  # hold every row, so both read the same windows, the whole batch
  cfg.mesh.rules = "batch=fsdp"
  whole = Trainer.create(cfg)
  ds_whole = whole.dataset("train")
  rows = [ds_whole[i] for i in range(STEPS)]
  _, losses_whole, _ = _run(whole, rows)
  return {
      "whole_batch": {"losses": losses_whole, "shard": list(whole.data_shard()),
                      "local_rows": int(rows[0]["tokens"].shape[0]),
                      "first_window_head": rows[0]["tokens"][:, :4].tolist()},
      "pid": pid, "process_index": jax.process_index(), "process_count": jax.process_count(),
      "global_devices": jax.device_count(), "local_devices": jax.local_device_count(),
      "mesh": dict(trainer.mesh.shape), "losses": losses,
      "local_rows": int(local[0]["tokens"].shape[0]),
      "first_window_head": local[0]["tokens"][:, :4].tolist(),
      "embed_spec": _spec(embed), "writer_enabled": writer.enabled,
      "ckpt_exists": os.path.isdir(os.path.join(workdir, "ckpt")),
  }


def main(argv=None) -> None:
  ap = argparse.ArgumentParser()
  ap.add_argument("mode", choices=["meshes", "process"])
  ap.add_argument("--kinds", default="transformer,swa")
  ap.add_argument("--dir", required=True)
  ap.add_argument("--pid", type=int, default=0)
  ap.add_argument("--nproc", type=int, default=2)
  ap.add_argument("--port", type=int, default=0)
  ap.add_argument("--proc-ckpt", default="")
  a = ap.parse_args(argv)
  if a.mode == "meshes":
    out = meshes([k for k in a.kinds.split(",") if k], a.dir, a.proc_ckpt)
  else:
    out = process(a.pid, a.nproc, a.port, a.dir)
  sys.stdout.write("RESULT " + json.dumps(out) + "\n")
  sys.stdout.flush()


if __name__ == "__main__":
  main()
