"""Subprocess side of tests/test_eval_on_mesh.py (8 forced host CPU devices).

Evaluation, generation and TLM on the devices a loaded run's parameters lie on (all of them,
`runs/load.py`), against the same parameters on one device: a tiny run trained on the 8 devices
and evaluated through `load_run` / `evaluate_run`; per model kind, the streamed NLL, how the
compiled chunk step takes its batch and how often it compiled; greedy generation; and the
one-shot, TLM and chunk programs lowered for TPU and CUDA on that mesh, where every kernel call
must run per device on its share of the batch. Prints one JSON line.
"""

from __future__ import annotations

import argparse
import json
import sys
import traceback

import jax
import numpy as np
from flax import nnx
from sharding_worker import _inside_manual, tiny_config

from ttt_jax import sharding as shd
from ttt_jax.eval import perplexity as P

KINDS = ("transformer", "swa", "ttt_linear-pallas", "ttt_mlp", "e2e", "e2e+scan")
B, L, CHUNK = 8, 64, 16  # rows (one per device), streamed positions, chunk


def _on_mesh(kind: str, mesh=(-1, 1, 1), ttt_mini_batch: int | None = None):
  """(model config, graphdef, params on the (8,1,1) mesh as load_run places them (or on
  `mesh`, e.g. a trainer's FSDP mesh), the same on one device)."""
  from ttt_jax.models import abstract_model, build_model  # noqa: PLC0415

  cfg = tiny_config(kind)
  if ttt_mini_batch:
    cfg.model.ttt.mini_batch_size = ttt_mini_batch
  cfg.mesh.data, cfg.mesh.fsdp, cfg.mesh.tensor = mesh  # (-1, 1, 1): as runs/load.py evaluates
  graphdef, abstract = abstract_model(cfg.model, 0)
  mesh = shd.make_mesh(cfg.mesh)
  host = nnx.to_pure_dict(nnx.state(build_model(cfg.model, 0)))
  return (cfg.model, graphdef, jax.device_put(host, shd.param_shardings(abstract, mesh)),
          jax.device_put(host, jax.devices()[0]))


def _rel(a, b) -> float:
  a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
  return float(np.max(np.abs(a - b)) / np.max(np.abs(b)))


def trained_run(workdir: str) -> dict:
  """A tiny SWA run trained 2 steps on the 8 devices, loaded and evaluated there and on one:
  8 documents in batches of 8, and 10 in batches of 3 (rounded up to 8 rows on the mesh, the
  second batch filled up), with the strided perplexity (stride 8) over the same documents; the
  rows and placement of every batch the chunk steps were called with on the mesh."""
  from ttt_jax.eval import strided  # noqa: PLC0415
  from ttt_jax.runs.load import load_run  # noqa: PLC0415
  from ttt_jax.train.loop import train_and_evaluate  # noqa: PLC0415

  cfg = tiny_config("swa", (8, 1, 1))
  cfg.train.steps = cfg.train.eval_every = 2
  train_and_evaluate(cfg, workdir, echo=lambda s: None)
  run = load_run(workdir)
  single = run._replace(params=jax.device_put(jax.device_get(run.params), jax.devices()[0]))
  calls, prepare = [], shd.OnParamsMesh.prepare

  def spy(self, params, *args):  # the token batches the programs on the mesh take
    fn, placed = prepare(self, params, *args)
    calls.extend((a.shape[0], tuple(a.sharding.spec)) for a in placed[1:]
                 if shd.mesh_of(params) is not None and getattr(a, "dtype", None) == np.int32
                 and np.ndim(a) == 2)
    return fn, placed

  shd.OnParamsMesh.prepare = spy
  out = {"mesh": dict(shd.mesh_of(run.params).shape)}
  for name, docs, batch in (("8x8", B, B), ("10x3", 10, 3)):
    kw = {"max_docs": docs, "batch_size": batch, "chunk": CHUNK, "progress": False,
          "echo": None, "stride": 8}
    on, one = (strided.evaluate_run(r, [16, 32], **kw) for r in (run, single))
    out[name] = {"docs": len(on["documents"]),
                 "mesh": [c["mean_nll"] for c in on["contexts"] + on["strided"]["contexts"]]
                 + [b["mean_nll"] for b in on["position_buckets"]["buckets"]],
                 "single": [c["mean_nll"] for c in one["contexts"] + one["strided"]["contexts"]]
                 + [b["mean_nll"] for b in one["position_buckets"]["buckets"]]}
  shd.OnParamsMesh.prepare = prepare
  out["batches"] = sorted(set(calls))
  return out


def tlm_checks() -> dict:
  """TLM's offline adaptation, batches of 8 samples, with the base on the (8,1,1) mesh and on
  one device: adapted log-perplexities, programs compiled."""
  from ttt_jax.eval import tlm as tlm_lib  # noqa: PLC0415

  _, graphdef, params, single = _on_mesh("transformer")
  samples = np.random.default_rng(5).integers(0, 259, (16, 33)).astype(np.int32)
  out = {}
  for name, p in (("mesh", params), ("single", single)):
    tc = tlm_lib.default_config()
    tc.rank, tc.alpha, tc.lr, tc.log_p0, tc.batch_size, tc.eval_batch_size = 4, 8.0, 1e-2, 0.0, 8, 8
    tlm, lora = tlm_lib.TLM.create(nnx.merge(graphdef, p), tc)
    lora, _ = tlm.adapt_offline(lora, samples, progress=False)
    out[name] = tlm.evaluate(lora, samples).tolist()
    out[f"{name}_compiles"] = [tlm._step_jit._cache_size(), tlm._log_ppl_jit._cache_size()]
  return out


def kind_checks(kind: str) -> dict:
  """Streamed NLL and greedy generation on the mesh and on one device; the chunk step's
  per-device input rows; programs compiled."""
  from ttt_jax.eval.generate import Generator  # noqa: PLC0415

  model_cfg, graphdef, params, single = _on_mesh(kind)
  tokens = np.random.default_rng(3).integers(0, 259, (B, L + 1)).astype(np.int32)
  step_fn, init_fn = P.make_chunk_step(graphdef), P.make_init_cache(graphdef)
  got = P.stream_nll(graphdef, params, tokens, CHUNK, step_fn=step_fn, init_fn=init_fn)
  ref = P.stream_nll(graphdef, single, tokens, CHUNK)
  cache = init_fn(params, B, L)
  compiled = step_fn.lower(params, cache, tokens[:, :CHUNK], tokens[:, 1:CHUNK + 1],
                           np.int32(0)).compile()
  # the rows of the tokens and targets (arguments 2 and 3) in each device's program (the int32
  # [rows, CHUNK] parameters of its text would also take in a stacked cache's positions)
  rows = [str(s.shard_shape((B, CHUNK))[0]) for s in compiled.input_shardings[0][2:4]]
  out = {"nll_rel": _rel(got, ref), "token_args": rows,
         "step_compiles": step_fn._cache_size(), "init_compiles": init_fn._cache_size()}
  if kind == "transformer":  # weights as a trainer's FSDP mesh holds them (reproduce.py)
    _, _, fsdp, _ = _on_mesh(kind, (1, 8, 1))
    out["fsdp_nll_rel"] = _rel(P.stream_nll(graphdef, fsdp, tokens, CHUNK), ref)
  if kind in ("transformer", "e2e"):
    prompt = tokens[:, :5]
    gen = Generator(graphdef, params, model_cfg, chunk=CHUNK, max_len=32, segment=4)
    new = gen(prompt, 12, progress=True)  # segments of 4: the loop runs several times
    want = Generator(graphdef, single, model_cfg, chunk=CHUNK, max_len=32)(prompt, 12)
    out.update(generated_equal=bool(np.array_equal(new, want)),
               loop_compiles=gen.loop._cache_size())
  return out


def lowered() -> dict:
  """One-shot NLL and TLM's log-perplexity lowered for TPU (splash attention), the chunk steps
  of full attention (the Triton cache kernel) and TTT-Linear (its Triton sequence kernels, a
  partial mini-batch's update left out) for CUDA, on the (8,1,1) mesh."""
  from ttt_jax.benchmarks import lowering  # noqa: PLC0415
  from ttt_jax.eval import tlm as tlm_lib  # noqa: PLC0415

  out = {}
  tokens = np.random.default_rng(4).integers(0, 259, (B, 257)).astype(np.int32)
  for platform, kind in (("tpu", "transformer"), ("cuda", "transformer"),
                         ("cuda", "ttt_linear-pallas")):
    with lowering.building(platform):
      # splash needs 128-token blocks; the TTT kernels mini-batches of 16 on a GPU
      _, graphdef, params, _ = _on_mesh(kind, ttt_mini_batch=16 if platform == "cuda" else None)
      if platform == "tpu":
        progs = {"one_shot": P.make_one_shot_step(graphdef).prepare(params, tokens)}
        tc = tlm_lib.default_config()
        tc.rank, tc.alpha = 4, 8.0
        tlm, lora = tlm_lib.TLM.create(nnx.merge(graphdef, params), tc)
        progs["tlm"] = tlm._log_ppl_jit.prepare(tlm.base, lora, tokens)
        tlm.log_p0 = 0.0  # the update: splash's backward kernels too
        progs["tlm_step"] = tlm._step_jit.prepare(tlm.base, lora, tlm.optimizer.init(lora),
                                                  tokens, np.float32(0.0))
      else:
        cache = P.make_init_cache(graphdef)(params, B, 256)
        progs = {"chunk": P.make_chunk_step(graphdef).prepare(
            params, cache, tokens[:, :64], tokens[:, 1:65], np.int32(64))}
      for name, (fn, args) in progs.items():
        text = lowering.export_cuda(fn, *args, platform=platform).mlir_module()
        target = "tpu_custom_call" if platform == "tpu" else "__gpu$xla.gpu.triton"
        regions = [line for line in text.splitlines() if "sdy.manual_computation(" in line]
        out[f"{platform}:{kind}:{name}"] = {
            "inside": _inside_manual(text, target),
            "batch_split": bool(regions) and all('{"data"}' in r for r in regions)}
  return out


def main(argv=None) -> None:
  ap = argparse.ArgumentParser()
  ap.add_argument("--dir", required=True)
  ap.add_argument("--kinds", default=",".join(KINDS), help="the kinds streamed (comma-separated)")
  a = ap.parse_args(argv)
  kinds = [k for k in a.kinds.split(",") if k]
  res: dict = {"num_devices": jax.device_count(), "kinds": {}}
  for name, fn in [("run", lambda: trained_run(a.dir)), ("lowered", lowered),
                   ("tlm", tlm_checks)] + [
      (kind, lambda kind=kind: kind_checks(kind)) for kind in kinds]:
    try:
      value = fn()
    except Exception:  # noqa: BLE001 (reported to the test, which fails on it)
      value = {"error": traceback.format_exc()}
    (res["kinds"] if name in KINDS else res)[name] = value
  sys.stdout.write("RESULT " + json.dumps(res) + "\n")
  sys.stdout.flush()


if __name__ == "__main__":
  main()
