# ruff: noqa: E501  (the HLO program below keeps XLA's one-instruction lines)
"""`make gpu-census`: the kernel count of a compiled program, checked on a hand-written HLO
program (loops, a nested loop, a conditional, a call) and on programs XLA compiles here; the
deviceless H200 compilation where JAX's CUDA plugin is installed (not in CI)."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import jax
import jax.numpy as jnp
import pytest

from ttt_jax.benchmarks import gpu_census, hlo_text

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

HLO = """HloModule m

%gemm (p0: f32[4,4]) -> f32[4,4] {
  %p0 = f32[4,4]{1,0} parameter(0)
  ROOT %d = f32[4,4]{1,0} dot(%p0, %p0), lhs_contracting_dims={1}, rhs_contracting_dims={0}
}

%inner_body (t: (s32[], f32[4,4])) -> (s32[], f32[4,4]) {
  %t = (s32[], f32[4,4]{1,0}) parameter(0)
  %x = f32[4,4]{1,0} get-tuple-element(%t), index=1
  %g = f32[4,4]{1,0} fusion(%x), kind=kCustom, calls=%gemm, metadata={op_name="jit(f)/transpose(jvp(mlp))/dot_general" source_file="lm.py"}, backend_config={"fusion_backend_config":{"kind":"__triton_nested_gemm_fusion"}}
  ROOT %r = (s32[], f32[4,4]{1,0}) tuple(%i, %g)
}

%inner_cond (t: (s32[], f32[4,4])) -> pred[] {
  %t = (s32[], f32[4,4]{1,0}) parameter(0)
  ROOT %c = pred[] fusion(%t), kind=kLoop, calls=%gemm
}

%outer_body (t: (s32[], f32[4,4])) -> (s32[], f32[4,4]) {
  %t = (s32[], f32[4,4]{1,0}) parameter(0)
  %a = f32[4,4]{1,0} fusion(%t), kind=kLoop, calls=%gemm
  %w = (s32[], f32[4,4]{1,0}) while(%t), condition=%inner_cond, body=%inner_body, backend_config={"known_trip_count":{"n":"3"}}
  ROOT %b = (s32[], f32[4,4]{1,0}) fusion(%w), kind=kInput, calls=%gemm
}

%outer_cond (t: (s32[], f32[4,4])) -> pred[] {
  %t = (s32[], f32[4,4]{1,0}) parameter(0)
  ROOT %c = pred[] fusion(%t), kind=kLoop, calls=%gemm
}

%small (p: f32[4,4]) -> f32[4,4] {
  %p = f32[4,4]{1,0} parameter(0)
  ROOT %k = f32[4,4]{1,0} copy(%p)
}

%big (p: f32[4,4]) -> f32[4,4] {
  %p = f32[4,4]{1,0} parameter(0)
  %k1 = f32[4,4]{1,0} fusion(%p), kind=kLoop, calls=%gemm
  ROOT %k2 = f32[4,4]{1,0} custom-call(%k1), custom_call_target="__cudnn$fmhaSoftmax", metadata={op_name="jit(f)/jvp(mixer)/attention/dot_product_attention"}
}

%sub (p: f32[4,4]) -> f32[4,4] {
  %p = f32[4,4]{1,0} parameter(0)
  ROOT %k = f32[4,4]{1,0} custom-call(%p), custom_call_target="__gpu$xla.gpu.triton"
}

ENTRY %main (x: f32[4,4], i: s32[]) -> f32[4,4] {
  %x = f32[4,4]{1,0} parameter(0)
  %i = s32[] parameter(1)
  %c0 = f32[] constant(0)
  %t = (s32[], f32[4,4]{1,0}) tuple(%i, %x)
  %w = (s32[], f32[4,4]{1,0}) while(%t), condition=%outer_cond, body=%outer_body, backend_config={"known_trip_count":{"n":"5"}}
  %y = f32[4,4]{1,0} get-tuple-element(%w), index=1
  %z = f32[4,4]{1,0} conditional(%i, %y, %y), branch_computations={%small, %big}
  %s = f32[4,4]{1,0} call(%z), to_apply=%sub
  ROOT %o = f32[4,4]{1,0} bitcast(%s)
}
"""


def test_census_counts_each_launch_once_per_run():
  r = gpu_census.census(HLO)
  # a loop of n trips runs its body n times and tests its condition n + 1 times. Inner loop:
  # 3 gemms + 4 conditions = 7; outer trip: 2 fusions + 7 = 9, times 5, + 6 conditions = 51;
  # the larger branch (fusion + cuDNN) 2; the called Pallas kernel 1
  assert r["launches"] == 51 + 2 + 1
  assert [(x["name"], x["trips"], x["per_trip"], x["runs"]) for x in r["loops"]] == [
      ("w", 5, 10, 1), ("w", 3, 2, 5)]
  assert r["by_kind"] == {"fusion": 37, "matmul": 15, "cudnn": 1, "pallas": 1}
  assert sum(r["by_kind"].values()) == r["launches"]
  # where they come from (op_name metadata): the inner loop's gemm, 15 runs, in the mlp's
  # backward; the cuDNN call in the attention's forward; the rest carries no op_name
  assert r["by_scope"] == {"other": 38, "mlp": 15, "attention": 1}
  assert r["by_phase"] == {"unattributed": 38, "backward": 15, "forward": 1}
  # what they compute: every fusion calling %gemm runs its [4,4] x [4,4] dot (2*4*4*4 FLOPs);
  # the stand-in cuDNN call's operand is no [B, T, N, H] attention input: not counted
  assert r["matmul_flops"] == 52 * 128 and r["attention_flops"] == 0
  assert r["flops_by_phase"] == {"unattributed": 37 * 128, "backward": 15 * 128}
  assert r["flops_by_scope"] == {"other": 37 * 128, "mlp": 15 * 128}
  with pytest.raises(ValueError, match="no ENTRY"):
    gpu_census.census("HloModule m\n")


COLLECTIVE_HLO = """HloModule m

%sum (a: f32[], b: f32[]) -> f32[] {
  %a = f32[] parameter(0)
  %b = f32[] parameter(1)
  ROOT %s = f32[] add(%a, %b)
}

ENTRY %main (x: f32[4,4]) -> f32[32,4] {
  %x = f32[4,4]{1,0} parameter(0)
  %ags = (f32[4,4]{1,0}, f32[32,4]{1,0}) all-gather-start(%x), channel_id=1, replica_groups=[1,8]<=[8], dimensions={0}, use_global_device_ids=true
  %agd = f32[32,4]{1,0} all-gather-done(%ags)
  %ars = f32[32,4]{1,0} all-reduce-start(%agd), channel_id=2, replica_groups=[1,8]<=[8], to_apply=%sum
  %ard = f32[32,4]{1,0} all-reduce-done(%ars)
  %rs = f32[4,4]{1,0} reduce-scatter(%ard), channel_id=3, replica_groups=[1,8]<=[8], dimensions={0}, to_apply=%sum
  ROOT %y = f32[32,4]{1,0} fusion(%ard, %rs), kind=kLoop, calls=%sum
}
"""


def test_collectives_launch_once_each():
  """A multi-GPU program's NCCL collectives: an asynchronous one launches at its start (its done
  waits), a synchronous one where it stands."""
  r = gpu_census.census(COLLECTIVE_HLO)
  assert r["by_kind"] == {"collective": 3, "fusion": 1}
  assert r["launches"] == 4


def test_matmul_flops_of_a_compiled_program_count_every_trip():
  """The dots XLA:CPU compiled, against 2·M·N·K written out: a scan of 3 trips and a batched
  einsum; their gradient (each dot's two transposes, the scan's forward for tanh's derivative;
  the einsum's forward is dead: a sum's gradient does not need its value)."""
  def f(x, w, a, b):
    y = jax.lax.scan(lambda c, _: (jnp.tanh(c @ w), None), x, None, length=3)[0]
    return jnp.sum(y) + jnp.sum(jnp.einsum("bij,bjk->bik", a, b))

  keys = jax.random.split(jax.random.key(0), 4)
  args = [jax.random.normal(k, s) for k, s in zip(keys, [(16, 32), (32, 32), (4, 8, 24),
                                                            (4, 24, 40)], strict=True)]
  scan, einsum = 3 * 2 * 16 * 32 * 32, 2 * 4 * 8 * 24 * 40
  r = gpu_census.census(jax.jit(f).lower(*args).compile().as_text())
  assert (r["matmul_flops"], r["attention_flops"]) == (scan + einsum, 0)
  r = gpu_census.census(jax.jit(jax.grad(f, argnums=(0, 1, 2, 3))).lower(*args).compile()
                        .as_text())
  assert r["matmul_flops"] == 3 * scan + 2 * einsum
  assert r["flops_by_phase"] == {"backward": 2 * scan + 2 * einsum, "forward": scan}


@pytest.mark.parametrize("queries,keys,mask,window", [
    (64, 64, "NO_MASK", 0), (64, 64, "CAUSAL", 0), (64, 64, "CAUSAL", 16),
    (64, 64, "PADDING_CAUSAL", 100), (16, 64, "CAUSAL", 8), (64, 16, "CAUSAL", 0),
    (40, 24, "NO_MASK", 8)])
def test_attended_pairs_against_the_mask_written_out(queries, keys, mask, window):
  i, j = jnp.arange(queries)[:, None], jnp.arange(keys)[None, :]
  seen = jnp.ones((queries, keys), bool)
  if "CAUSAL" in mask:
    seen &= j <= i
    if window:
      seen &= j > i - window
  elif window:
    seen &= j < window
  assert hlo_text.attended_pairs(queries, keys, mask, window) == int(seen.sum())


def test_library_call_flops_from_their_hlo_lines():
  """cuDNN attention calls (the line format XLA prints for an H200: the operands' [B, T, N, H]
  shapes in the layout constraints, mask and window in the backend config; the backward's
  operands q, k, v, softmax statistics, dO; a call without layout constraints reads its
  operands' types), 64 queries against 96 keys, and a cuBLAS GEMM."""
  cfg = ('backend_config={"cudnn_fmha_backend_config": {"fmha_scale": 0.125, "mask_type": '
         '"CAUSAL", "sliding_window_length": 40}}')
  fwd = ('%a = (bf16[2,4,64,32]{3,1,2,0}, f32[2,4,64]{2,1,0}, u8[0]{0}) custom-call(%q, %k, %v), '
         'custom_call_target="__cudnn$fmhaSoftmax", operand_layout_constraints={bf16[2,64,4,32]'
         '{3,2,1,0}, bf16[2,96,4,32]{3,2,1,0}, bf16[2,96,4,32]{3,2,1,0}}, api_version=API_VERSION_'
         'STATUS_RETURNING, metadata={op_name="jit(f)/jvp(mixer)/attention/dot_product_attention"}, '
         + cfg)
  bwd = ('%b = (bf16[2,4,64,32]{3,1,2,0}, bf16[2,4,96,32]{3,1,2,0}, bf16[2,4,96,32]{3,1,2,0}, '
         'u8[0]{0}) custom-call(%q, %k, %v, %s, %do), custom_call_target="__cudnn$fmhaSoftmax'
         'Backward", operand_layout_constraints={bf16[2,64,4,32]{3,2,1,0}, bf16[2,96,4,32]{3,2,1,0}, '
         'bf16[2,96,4,32]{3,2,1,0}, f32[2,4,64]{2,1,0}, bf16[2,64,4,32]{3,2,1,0}}, '
         'metadata={op_name="jit(f)/transpose(jvp(mixer))/attention/dot_product_attention"}, ' + cfg)
  bare = ('%c = (bf16[2,4,64,32]{3,1,2,0}, u8[0]{0}) custom-call(%q, %k, %v), custom_call_target='
          '"__cudnn$fmhaSoftmax", ' + cfg.replace('"CAUSAL", "sliding_window_length": 40',
                                                  '"NO_MASK"'))
  gemm = ('%g = (f32[6,48,40]{2,1,0}, s8[1024]{0}) custom-call(%x, %y), custom_call_target='
          '"__cublas$gemm", backend_config={"gemm_backend_config":{"dot_dimension_numbers":'
          '{"lhs_contracting_dimensions":["1"],"rhs_contracting_dimensions":["2"],'
          '"lhs_batch_dimensions":["0"],"rhs_batch_dimensions":["0"]}}}')
  text = "\n".join([
      "HloModule m", "", "ENTRY %main (x: f32[6,24,48], y: f32[6,40,24]) -> f32[] {",
      "  %x = f32[6,24,48]{2,1,0} parameter(0)", "  %y = f32[6,40,24]{2,1,0} parameter(1)",
      "  %q = bf16[2,64,4,32]{3,2,1,0} parameter(2)", "  %k = bf16[2,96,4,32]{3,2,1,0} parameter(3)",
      "  %v = bf16[2,96,4,32]{3,2,1,0} parameter(4)", "  %s = f32[2,4,64]{2,1,0} parameter(5)",
      "  %do = bf16[2,64,4,32]{3,2,1,0} parameter(6)", "  " + fwd, "  " + bwd, "  " + bare,
      "  " + gemm, "  ROOT %r = f32[] constant(0)", "}"])
  r = gpu_census.census(text)
  windowed = hlo_text.attended_pairs(64, 96, "CAUSAL", 40)
  assert windowed < 64 * 96
  assert r["attention_flops"] == (4 + 10) * 32 * 4 * 2 * windowed + 4 * 32 * 4 * 2 * 64 * 96
  assert r["matmul_flops"] == 2 * 6 * 48 * 40 * 24
  assert r["flops_by_phase"]["backward"] == 10 * 32 * 4 * 2 * windowed


def test_census_of_a_compiled_scan_grows_by_its_body_per_trip():
  def run(n):
    def body(c, _):
      return jnp.tanh(c @ c) + 1.0, None
    f = jax.jit(lambda x: jax.lax.scan(body, x, None, length=n)[0])
    return gpu_census.census(f.lower(jnp.ones((8, 8))).compile().as_text())

  four, eight = run(4), run(8)
  (loop,) = eight["loops"]
  assert loop["trips"] == 8 and loop["known_trips"]
  assert eight["launches"] - four["launches"] == 4 * loop["per_trip"] > 0


def test_markdown_row():
  rows = {"transformer": {"launches": 100, "by_kind": {"matmul": 20, "cudnn": 4}, "loops": [],
                          "temp_bytes": 436e6},
          "e2e-meta": {"launches": 450, "by_kind": {"matmul": 90, "cudnn": 3},
                       "loops": [{"trips": 3, "per_trip": 100, "runs": 1}]},
          "ttt_mlp": {"error": "XlaRuntimeError: boom"},
          "stream:e2e decode": {"launches": 50, "by_kind": {"fusion": 50}, "loops": [],
                                "train_step": False},
          "125m:transformer": {"launches": 200, "by_kind": {}, "loops": []},
          "125m:e2e": {"launches": 500, "by_kind": {}, "loops": []},
          "350m:transformer": {"launches": 400, "by_kind": {}, "loops": []},
          "350m:e2e": {"launches": 1000, "by_kind": {}, "loops": []}}
  text = gpu_census.markdown(rows)
  assert "| transformer | 100 | 1.0x | 20 | 4 | 0 | 0 | 76 | 0.44 GB | - |" in text
  assert "| e2e-meta | 450 | 4.5x | 90 | 3 | 0 | 0 | 357 |  | 3 x 100 |" in text
  assert "| ttt_mlp | error (XlaRuntimeError: boom) |" in text
  assert "| stream:e2e decode | 50 |  | 0 | 0 | 0 | 0 | 50 |  | - |" in text  # no train ratio
  assert "| 125m:e2e | 500 | 2.5x |" in text  # against the same preset's transformer
  assert "| 350m:e2e | 1000 | 2.5x |" in text
  # a node's programs: against the node's transformer, their collectives in a column
  rows.update({"node8:transformer": {"launches": 120, "by_kind": {"collective": 5}, "loops": []},
               "node8:ttt_linear": {"launches": 300, "by_kind": {"pallas": 24, "collective": 6},
                                    "loops": []}})
  text = gpu_census.markdown(rows)
  assert "| node8:ttt_linear | 300 | 2.5x | 0 | 0 | 24 | 6 | 270 |  | - |" in text
  assert "| by phase |" not in text  # no program here says where its launches come from
  rows["transformer"].update(by_scope={"mlp": 60, "attention": 40}, by_phase={"forward": 100})
  text = gpu_census.markdown(rows)
  assert "| transformer | mlp 60, attention 40 | forward 100 |" in text
  assert "GFLOP by phase" not in text  # nor what they compute
  rows["transformer"].update(matmul_flops=30e9, attention_flops=10e9,
                             flops_by_phase={"backward": 26e9, "forward": 14e9})
  rows["e2e-meta"].update(matmul_flops=70e9, attention_flops=0.0,
                          flops_by_phase={"recompute/inner-grad": 70e9})
  text = gpu_census.markdown(rows)
  assert "| transformer | 30 + 10 = 40 | 1.00x | backward 26, forward 14 |" in text
  assert "| e2e-meta | 70 + 0 = 70 | 1.75x | recompute/inner-grad 70 |" in text


PTXAS_OUTPUT = """ptxas info    : 0 bytes gmem
ptxas info    : Compiling entry function '_mlp_bwd_kernel' for 'sm_90a'
ptxas info    : Function properties for _mlp_bwd_kernel
    4128 bytes stack frame, 5988 bytes spill stores, 6020 bytes spill loads
ptxas info    : Used 255 registers, used 1 barriers, 4128 bytes cumulative stack size
ptxas info    : Compiling entry function 'loop_add_fusion' for 'sm_90a'
ptxas info    : Function properties for loop_add_fusion
    0 bytes stack frame, 0 bytes spill stores, 0 bytes spill loads
ptxas info    : Used 12 registers
"""


def test_ptxas_resources_and_their_table():
  got = gpu_census.ptxas_resources(PTXAS_OUTPUT)
  assert got == {"_mlp_bwd_kernel": {"stack_bytes": 4128, "spill_store_bytes": 5988,
                                     "spill_load_bytes": 6020, "registers": 255},
                 "loop_add_fusion": {"stack_bytes": 0, "spill_store_bytes": 0,
                                     "spill_load_bytes": 0, "registers": 12}}
  rows = {"transformer": {"launches": 100, "by_kind": {}, "loops": []},
          "triton resources": {"_mlp_bwd_kernel": got["_mlp_bwd_kernel"]}}
  text = gpu_census.markdown(rows)
  assert "| _mlp_bwd_kernel | 255 | 5988 B | 6020 B | 4128 B |" in text
  assert "| triton resources |" not in text  # its own table, not a program row


def test_triton_resources_reads_the_kernel_modules_ptx(tmp_path):
  """Only the `compile_ttt_kernels` modules' PTX files that hold a Pallas kernel go to ptxas
  (a stand-in here), and only its *_kernel entries are kept, keyed by the module's label."""
  dump = tmp_path / "dump"
  dump.mkdir()
  (dump / "module_0007.jit_ttt_kernels_mlp_w4.12.ptx").write_text(
      ".visible .entry _mlp_bwd_kernel(\n")
  (dump / "module_0008.jit_ttt_kernels_mlp_w4.13.ptx").write_text(
      ".visible .entry loop_add_fusion(\n")  # XLA's own kernels only
  (dump / "module_0001.jit_train_step.3.ptx").write_text(".visible .entry _mlp_bwd_kernel(\n")
  (tmp_path / "out.txt").write_text(PTXAS_OUTPUT)
  ptxas = tmp_path / "ptxas"
  ptxas.write_text(f"#!/bin/sh\necho \"$@\" >> {tmp_path}/calls\ncat {tmp_path}/out.txt >&2\n")
  ptxas.chmod(0o755)
  got = gpu_census.triton_resources(str(dump), str(ptxas))
  assert list(got) == ["mlp_w4: _mlp_bwd_kernel"]
  assert got["mlp_w4: _mlp_bwd_kernel"]["spill_store_bytes"] == 5988
  calls = (tmp_path / "calls").read_text().splitlines()
  assert len(calls) == 1 and "module_0007" in calls[0] and "sm_90a" in calls[0]


def test_deviceless_h200_compile_where_the_cuda_plugin_is_installed(tmp_path):
  if gpu_census.cuda_plugin() is None:
    pytest.skip("JAX's CUDA plugin (make gpu-census)")
  assert gpu_census._ptxas() is not None  # the plugin's own: the kernels' registers and spills
  # ... which reads the kernels' PTX that XLA dumps in a fresh process (JAX 0.11 dumps none
  # without naming the emitters)
  out = subprocess.run([sys.executable, "scripts/gpu_census.py", "--kinds", "", "--stream", "",
                        "--ttt_kernels", "linear", "--out_dir", str(tmp_path)], cwd=ROOT,
                       capture_output=True, text=True, timeout=600, check=False)
  assert out.returncode == 0, out.stderr[-800:]
  table = json.loads((tmp_path / "gpu_census.json").read_text())["triton resources"]
  assert set(table) == {"linear: _linear_fwd_kernel", "linear: _linear_bwd_kernel"}
  assert all(r["registers"] > 0 for r in table.values())
  device = gpu_census.gpu_device()
  try:
    text, info = gpu_census.compile_train_step("transformer", device)  # bf16: cuDNN attention
  except Exception as e:  # noqa: BLE001
    # JAX 0.12's XLA builds cuDNN graphs while it compiles, which needs a GPU
    # (docs/gpu_census.md); the rest below compiles without one
    assert jax.__version_info__ >= (0, 12) and "deviceless cuDNN compilation" in str(e), e
  else:
    r = gpu_census.census(text)
    assert r["by_kind"].get("cudnn", 0) > 0 and r["launches"] > 100
    assert info["temp_bytes"] > 0 and info["argument_bytes"] > 0 and info["compile_s"] > 0
  # the Triton cache-attention kernel compiles for the H200 (its shared memory and registers)
  steps = gpu_census.compile_stream_steps("transformer", device, 8192)
  assert all(gpu_census.census(t)["by_kind"].get("pallas") == 8 for t, _ in steps.values())
  # both TTT-MLP kernels build for the H200 with the default launch parameters ...
  text, _ = gpu_census.compile_ttt_kernels(device, "mlp")
  assert gpu_census.census(text)["by_kind"].get("pallas") == 2
  # ... and TTT-Linear's train step with its output made by XLA (whose first einsum XLA:GPU's
  # compiler rejected: the CUDA export alone did not show it)
  text, _ = gpu_census.compile_train_step("ttt_linear+xlaout", device)
  assert gpu_census.census(text)["by_kind"].get("pallas") == 24
  # ... and on a node of 8 H200s (FSDP), one GPU's program: its kernels run there per GPU, on
  # its own sequence (sharding.per_shard), beside the collectives
  text, _ = gpu_census.compile_train_step("node8:ttt_linear", None)
  node = gpu_census.census(text)["by_kind"]
  assert node.get("pallas") == 24 and node.get("collective", 0) > 0
  # ... and the H200's limits are checked: a tile that needs more shared memory than an SM has
  # fails
  with pytest.raises(Exception, match="Shared memory size limit exceeded"):
    gpu_census.compile_cache_kernel(device, 8192, dict(block_q=256, block_k=512, num_stages=4),
                                    queries=2048)


# compiles a GEMM with elementwise work and a row reduction after it for an H200 (the test's
# XLA_FLAGS have XLA dump each instruction its autotuner tunes)
TUNED_PROGRAM = """
import jax, jax.numpy as jnp
from ttt_jax.benchmarks import gpu_census
f = lambda a, b: (jnp.tanh(a @ b) * 2.0 + 1.0).sum(-1)
x = jax.ShapeDtypeStruct((512, 512), jnp.float32)
gpu_census._compile(f, gpu_census.gpu_device(), x, x)
"""


def test_nofusiontune_leaves_xla_tuning_gemms_only(tmp_path):
  """gpu-check's `+nofusiontune` flag: XLA tunes the GEMM and no other fusion (compiled for an
  H200 without a GPU; where this XLA tunes the others at all: JAX 0.11)."""
  if gpu_census.cuda_plugin() is None:
    pytest.skip("JAX's CUDA plugin (make gpu-census)")
  from ttt_jax.benchmarks.gpu_variants import VARIANTS  # noqa: PLC0415

  def tuned(flags: str, name: str) -> list[str]:
    dump = tmp_path / name
    env = dict(os.environ, JAX_PLATFORMS="cpu", XLA_FLAGS=(
        f"--xla_dump_to={dump} --xla_gpu_dump_autotuned_instructions=true "
        f"--xla_dump_hlo_module_re=NONE {flags}"))
    out = subprocess.run([sys.executable, "-c", TUNED_PROGRAM], cwd=ROOT, env=env,
                         capture_output=True, text=True, timeout=300, check=False)
    assert out.returncode == 0, out.stderr[-800:]
    return [f.name for f in dump.glob("*.before.txt")] if dump.exists() else []

  default = tuned("", "default")
  if not any("gemm" not in f for f in default):
    pytest.skip("this XLA autotunes no fusion but GEMMs")
  off = tuned(VARIANTS["nofusiontune"], "off")
  assert any("gemm" in f for f in off)
  assert not [f for f in off if "gemm" not in f]


def test_without_the_cuda_plugin_one_line_and_exit_1(tmp_path, capsys):
  if gpu_census.cuda_plugin() is not None:
    pytest.skip(f"JAX's CUDA plugin is installed here ({gpu_census.cuda_plugin()})")
  flags = os.environ.get("XLA_FLAGS")
  assert gpu_census.main(["--out_dir", str(tmp_path), "--kinds", "transformer"]) == 1
  out = capsys.readouterr().out.strip().splitlines()
  assert len(out) == 1 and "install jax-cuda12-plugin[with-cuda]==" in out[0]
  assert "or jax-cuda13-plugin[with-cuda]==" in out[0]
  assert not list(tmp_path.iterdir())
  assert os.environ.get("XLA_FLAGS") == flags  # its PTX dump flag is not left behind


def test_counted_flops_of_a_program_it_cannot_read_is_none_with_a_warning():
  """The train benchmarks' counted FLOPs: a figure beside the timing, never a failure."""
  from types import SimpleNamespace  # noqa: PLC0415

  from ttt_jax.benchmarks.common import counted_flops  # noqa: PLC0415

  with pytest.warns(UserWarning, match="could not be read .ValueError: hlo_text: no ENTRY"):
    assert counted_flops(SimpleNamespace(as_text=lambda: "HloModule m\n")) is None
  x = jax.random.normal(jax.random.key(3), (8, 16))
  compiled = jax.jit(lambda a: a @ a.T).lower(x).compile()
  assert counted_flops(compiled) == 2 * 8 * 8 * 16


def test_either_cuda_plugin_serves_the_newest_first(monkeypatch):
  """A CUDA 13 image's plugin and CUDA 12's both compile; with both, CUDA 13's is named."""
  def with_plugins(*present):
    monkeypatch.setattr(gpu_census.importlib.util, "find_spec",
                        lambda name: object() if name in present else None)
    return gpu_census.cuda_plugin()

  assert with_plugins("jax_plugins.xla_cuda12") == "jax-cuda12-plugin"
  assert with_plugins("jax_plugins.xla_cuda13") == "jax-cuda13-plugin"
  assert with_plugins("jax_plugins.xla_cuda12", "jax_plugins.xla_cuda13") == "jax-cuda13-plugin"
  assert with_plugins() is None


def test_ptxas_is_the_plugins_own_for_cuda_13_and_12(tmp_path, monkeypatch):
  """CUDA 13's plugin keeps ptxas in nvidia.cu13, CUDA 12's in nvidia.cuda_nvcc; either is
  found before one on PATH (without one the kernels' registers and spills go unreported)."""
  import importlib.machinery  # noqa: PLC0415

  roots = {}
  for package in ("nvidia.cu13", "nvidia.cuda_nvcc"):
    root = tmp_path / package
    (root / "bin").mkdir(parents=True)
    (root / "bin" / "ptxas").write_text("")
    roots[package] = importlib.machinery.ModuleSpec(package, None, is_package=True)
    roots[package].submodule_search_locations = [str(root)]

  def with_packages(*present):
    monkeypatch.setattr(gpu_census.importlib.util, "find_spec",
                        lambda name: roots[name] if name in present else None)
    return gpu_census._ptxas()

  assert with_packages("nvidia.cu13") == str(tmp_path / "nvidia.cu13" / "bin" / "ptxas")
  assert with_packages("nvidia.cuda_nvcc") == str(tmp_path / "nvidia.cuda_nvcc" / "bin" / "ptxas")
  monkeypatch.setattr(gpu_census.shutil, "which", lambda name: f"/on/path/{name}")
  assert with_packages() == "/on/path/ptxas"


def test_the_census_asks_xla_for_the_kernels_ptx_while_it_runs(monkeypatch, tmp_path):
  """XLA_FLAGS during a census: the kernel modules dumped, their PTX by emitter (JAX 0.11 dumps
  none without --xla_dump_emitter_re); the caller's flags first and restored after."""
  seen = {}

  def fake_census(args, dump):
    seen["flags"], seen["dump"] = os.environ["XLA_FLAGS"].split(), dump
    return 0

  monkeypatch.setattr(gpu_census, "_census", fake_census)
  monkeypatch.setenv("XLA_FLAGS", "--xla_gpu_autotune_level=0")
  assert gpu_census.main(["--kinds", "", "--out_dir", str(tmp_path)]) == 0
  assert seen["flags"][0] == "--xla_gpu_autotune_level=0"
  assert {f"--xla_dump_to={seen['dump']}", "--xla_dump_hlo_module_re=.*ttt_kernels.*",
          "--xla_dump_emitter_re=.*"} <= set(seen["flags"])
  assert os.environ["XLA_FLAGS"] == "--xla_gpu_autotune_level=0"
