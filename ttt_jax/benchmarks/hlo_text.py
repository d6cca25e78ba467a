"""Reading XLA's compiled HLO text: its computations and instructions, what each instruction
launches on a GPU (`kind`), where it comes from (`scope_of`, `phase_of`: the model's named
scopes and the outer step's phase, read from the instruction's `op_name` metadata), what one
launch computes (`launch_flops`: its matmuls and fused attention), and all of it over one call
of the program, every loop trip counted (`census`). Shared by `make gpu-census`,
benchmarks/kernel_profile.py (traced device time) and the train benchmarks' counted FLOPs."""

from __future__ import annotations

import collections
import re

# NCCL's collectives (a multi-GPU program's; each may be split into a -start and a -done)
COLLECTIVES = ("all-gather", "all-reduce", "reduce-scatter", "collective-permute", "all-to-all",
               "collective-broadcast", "ragged-all-to-all")
# instructions that launch nothing (control flow is counted through its computations; the end of
# an asynchronous collective waits for the launch its start counts)
FREE = frozenset({"parameter", "constant", "get-tuple-element", "tuple", "bitcast", "after-all",
                  "partition-id", "replica-id", "opt-barrier", "add-dependency",
                  *(f"{c}-done" for c in COLLECTIVES)})
_HEAD = re.compile(r"^(ENTRY\s+)?%([\w.\-]+)\s.*\{\s*$")
_INST = re.compile(r"^\s*(?:ROOT\s+)?%([\w.\-]+) = (.*)$")


def _split_type(rest: str) -> tuple[str, str]:
  """(result type, the rest) of an instruction's text after '='."""
  depth = 0
  for i, ch in enumerate(rest):  # the result type ends at the first top-level space
    depth += (ch in "([{") - (ch in ")]}")
    if ch == " " and depth == 0:
      return rest[:i], rest[i + 1:]
  return rest, ""


def computations(text: str) -> tuple[dict[str, list[tuple[str, str, str]]], str]:
  """{computation: [(instruction, opcode, text after the result type)]}, and the entry's name."""
  comps: dict[str, list] = {}
  entry, cur = "", None
  for line in text.splitlines():
    head = _HEAD.match(line) if not line.startswith(" ") else None
    if head:
      cur = head.group(2)
      comps[cur] = []
      entry = cur if head.group(1) else entry
    elif line.startswith("}"):
      cur = None
    elif cur is not None and (m := _INST.match(line)):
      after = _split_type(m.group(2))[1]
      comps[cur].append((m.group(1), after.split("(", 1)[0], after))
  if not entry:
    raise ValueError("hlo_text: no ENTRY computation in this HLO text")
  return comps, entry


def kind(op: str, after: str) -> str:
  """matmul (cuBLAS or XLA's Triton GEMMs) | cudnn | pallas (Triton kernels of this package) |
  library call | fusion (XLA's other fused kernels) | collective (NCCL: all-gather, all-reduce,
  ...; synchronous or the start of an asynchronous one) | the opcode (copy, ...)."""
  if op.removesuffix("-start") in COLLECTIVES:
    return "collective"
  if op == "custom-call":
    target = re.search(r'custom_call_target="([^"]+)"', after)
    target = target.group(1) if target else ""
    return ("cudnn" if "cudnn" in target else "pallas" if "triton" in target
            else "matmul" if "cublas" in target else "library call")
  if op == "fusion":
    kind = re.search(r'"fusion_backend_config":\{"kind":"([^"]+)"', after)
    kind = kind.group(1) if kind else ""
    return "matmul" if "gemm" in kind or "cublas" in kind else "fusion"
  return op


# `jax.named_scope`s of the model code, innermost wins: 'mixer' is a block's token mixer outside
# its core (projections, norms, gates), 'attention' the attention core (scores, softmax, values;
# the library kernels), 'ttt_inner' the TTT inner loop (dual form, kernels or primal form)
SCOPES = ("embed", "mixer", "attention", "ttt_inner", "prime_mlp", "mlp", "head", "loss",
          "inner_update", "optimizer")
_SCOPE_SET = frozenset(SCOPES)
_WORD = re.compile(r"[A-Za-z_][\w.]*")


def op_name(after: str) -> str:
  """The `op_name` metadata of an instruction ('' if it has none)."""
  found = re.search(r'op_name="([^"]*)"', after)
  return found.group(1) if found else ""


def scope_of(op_name: str) -> str:
  """The innermost of `SCOPES` named in `op_name` ('other' if none)."""
  found = [w for w in _WORD.findall(op_name) if w in _SCOPE_SET]
  return found[-1] if found else "other"


def phase_of(op_name: str) -> str:
  """forward | backward | recompute (under remat) | update (outside the differentiated loss:
  the optimizer, gradient norms) | unattributed (no op_name: what XLA adds itself), read from
  the outermost differentiation transform of the op (jvp: forward, transpose: backward);
  '/inner-grad' is added where a further derivative is nested inside it (E2E's inner gradients
  and the outer backward through them; TTT's primal form, whose inner step takes a gradient)."""
  if not op_name:
    return "unattributed"
  first = re.search(r"\b(jvp|transpose)\(", op_name)
  if first is None:
    return "update"
  backward = first.group(1) == "transpose"
  phase = ("recompute" if "rematted_computation" in op_name
           else "backward" if backward else "forward")
  nested = op_name.count("transpose(") > int(backward)
  return phase + ("/inner-grad" if nested else "")


# -- what a launch computes ---------------------------------------------------------------------
def result_types(text: str) -> dict[str, str]:
  """{instruction: its result type} over the whole program (HLO names are unique in a module)."""
  return {m.group(1): _split_type(m.group(2))[0]
          for line in text.splitlines() if (m := _INST.match(line))}


def dims(type_text: str) -> list[int]:
  """The dimensions of the first array in a result type ('(bf16[8,64]{1,0}, u8[0])' -> [8, 64])."""
  found = re.search(r"[a-z]\w*\[([\d,]*)\]", type_text)
  if found is None:
    raise ValueError(f"hlo_text: no array shape in {type_text[:80]!r}")
  return [int(d) for d in found.group(1).split(",") if d]


def _prod(xs) -> int:
  out = 1
  for x in xs:
    out *= int(x)
  return out


def _operands(after: str) -> list[str]:
  return re.findall(r"%([\w.\-]+)", after.split("(", 1)[1].split(")", 1)[0])


def _matmul(out_dims: list[int], lhs_dims: list[int], contracting: list[int]) -> int:
  return 2 * _prod(out_dims) * _prod(lhs_dims[c] for c in contracting)


def attended_pairs(queries: int, keys: int, mask: str, window: int = 0) -> int:
  """(query, key) pairs a fused attention scores: all of them without a mask; under a causal mask
  (aligned at the top left, as cuDNN's) query i sees keys 0..i, the last `window` of them when
  a sliding window is set."""
  if "CAUSAL" not in mask:
    return queries * (min(keys, window) if window > 0 else keys)
  cap = min(keys, window) if window > 0 else keys
  ramp = min(queries, cap)  # queries 0..ramp-1 see i+1 keys, the rest `cap`
  return ramp * (ramp + 1) // 2 + (queries - ramp) * cap


def launch_flops(name: str, op: str, after: str, comps: dict,
                 types: dict[str, str]) -> tuple[int, int]:
  """(matmul FLOPs, fused-attention FLOPs) of one launch of instruction `name`: a `dot`; the
  dots of a fusion (XLA's Triton GEMMs, CPU output fusions); a cuBLAS GEMM call (from its dot
  dimension numbers); a cuDNN fused attention: 4·d FLOPs per attended (query, key) pair and
  head forward (QK^T and PV), 10·d backward (dQ, dK, dV, dP and the scores recomputed, as
  FlashAttention counts). `types`: `result_types` of the program. Pallas kernels and all other
  instructions: (0, 0), not counted."""
  if op == "dot":
    contracting = re.search(r"lhs_contracting_dims=\{([\d,]*)\}", after)
    contracting = [int(c) for c in contracting.group(1).split(",") if c] if contracting else []
    return _matmul(dims(types[name]), dims(types[_operands(after)[0]]), contracting), 0
  if op == "fusion":
    called = re.search(r"calls=%([\w.\-]+)", after)
    inner = [launch_flops(n, o, a, comps, types)
             for n, o, a in comps.get(called.group(1) if called else "", [])
             if o in ("dot", "fusion")]
    return sum(f[0] for f in inner), sum(f[1] for f in inner)
  target = re.search(r'custom_call_target="([^"]+)"', after) if op == "custom-call" else None
  target = target.group(1) if target else ""
  if "cublas" in target:
    numbers = re.search(r'"lhs_contracting_dimensions":\[([^\]]*)\]', after)
    contracting = [int(c) for c in re.findall(r"\d+", numbers.group(1))] if numbers else []
    return _matmul(dims(types[name]), dims(types[_operands(after)[0]]), contracting), 0
  if "cudnn$fmha" in target:
    shapes = re.search(r"operand_layout_constraints=\{(.*?)\}, [a-z_]+=", after)
    qk = (re.findall(r"[a-z]\w*\[[\d,]*\]", shapes.group(1))[:2] if shapes
          else [types[o] for o in _operands(after)[:2]])
    if len(qk) < 2 or len(dims(qk[0])) != 4:
      return 0, 0  # not JAX's [B, T, N, H] query and key: not counted
    (batch, queries, heads, head_dim), k = dims(qk[0]), qk[1]
    mask = re.search(r'"mask_type":\s*"(\w+)"', after)
    window = re.search(r'"sliding_window_length":\s*"?(\d+)', after)
    pairs = attended_pairs(queries, dims(k)[1], mask.group(1) if mask else "NO_MASK",
                           int(window.group(1)) if window else 0)
    return 0, (10 if "Backward" in target else 4) * head_dim * heads * batch * pairs
  return 0, 0


# -- one call of a program ----------------------------------------------------------------------
def census(text: str) -> dict:
  """Kernel launches of one call of the compiled program `text` (XLA's HLO after optimization):
  {'launches', 'by_kind': {kind: launches}, 'by_scope' and 'by_phase' alike (the model's named
  scopes and the step's phases, `scope_of` / `phase_of`), 'loops': [{'name', 'trips',
  'per_trip', 'runs'}]}, loops by launches, most first (`runs`: how often the loop itself runs,
  through outer loops); and what the launches compute (`launch_flops`, loop trips
  counted): 'matmul_flops', 'attention_flops' (cuDNN's fused attention), and 'flops_by_phase',
  'flops_by_scope' of the two together. Of a conditional, the branch with the most launches is
  counted, its FLOPs with it."""
  return _count(text)[0]


def flops_per_call(text: str) -> dict[str, int]:
  """{instruction: the FLOPs its launches in one call of the program compute} (`launch_flops`
  times how often the call runs it, loop trips counted as in `census`), for every instruction
  whose launches compute counted FLOPs."""
  return _count(text)[1]


def _count(text: str) -> tuple[dict, dict[str, int]]:
  comps, entry = computations(text)
  types = result_types(text)
  by_kind, by_scope, by_phase = (collections.Counter() for _ in range(3))
  flops, flops_by_scope, flops_by_phase = (collections.Counter() for _ in range(3))
  loops = []
  flops_of = collections.Counter()

  def launches(comp: str, runs: int) -> int:
    total = 0
    for name, op, after in comps[comp]:
      if op in FREE:
        continue
      if op == "while":
        trips = re.search(r'"known_trip_count":\{"n":"(\d+)"', after)
        n = int(trips.group(1)) if trips else 1
        body, cond = (re.search(rf"{p}=%([\w.\-]+)", after).group(1)
                      for p in ("body", "condition"))
        body = launches(body, runs * n)
        cond = launches(cond, runs * (n + 1))  # tested once more, to stop
        loops.append({"name": name, "trips": n, "per_trip": body + cond, "runs": runs,
                      "known_trips": bool(trips)})
        total += n * body + (n + 1) * cond
      elif op == "conditional":  # one branch runs: the largest is counted
        branches = re.findall(r"%([\w.\-]+)", after.split("branch_computations=")[-1]
                              .split("}")[0]) if "branch_computations" in after else \
            re.findall(r"(?:true|false)_computation=%([\w.\-]+)", after)
        largest = max(branches, key=lambda b: launches(b, 0))  # runs 0: nothing recorded
        total += launches(largest, runs)
      elif op == "call":
        total += launches(re.search(r"to_apply=%([\w.\-]+)", after).group(1), runs)
      else:
        total += 1
        by_kind[kind(op, after)] += runs
        source = op_name(after)
        scope, phase = scope_of(source), phase_of(source)
        by_scope[scope] += runs
        by_phase[phase] += runs
        matmul, attention = launch_flops(name, op, after, comps, types)
        if matmul or attention:
          flops["matmul"] += runs * matmul
          flops["attention"] += runs * attention
          flops_of[name] += runs * (matmul + attention)
          flops_by_scope[scope] += runs * (matmul + attention)
          flops_by_phase[phase] += runs * (matmul + attention)
    return total

  total = launches(entry, 1)
  loops = [r for r in loops if r["runs"]]
  loops.sort(key=lambda r: -r["trips"] * r["per_trip"] * r["runs"])
  nonzero = lambda c: {k: v for k, v in c.most_common() if v}  # noqa: E731
  return {"launches": total, "by_kind": nonzero(by_kind), "by_scope": nonzero(by_scope),
          "by_phase": nonzero(by_phase), "loops": loops, "matmul_flops": flops["matmul"],
          "attention_flops": flops["attention"], "flops_by_scope": nonzero(flops_by_scope),
          "flops_by_phase": nonzero(flops_by_phase)}, nonzero(flops_of)
