"""Reading XLA's compiled HLO text: its computations and instructions, what each instruction
launches on a GPU (`kind`), and where it comes from (`scope_of`, `phase_of`: the model's named
scopes and the outer step's phase, read from the instruction's `op_name` metadata). Shared by
`make gpu-census` (launch counts) and benchmarks/kernel_profile.py (traced device time)."""

from __future__ import annotations

import re

# instructions that launch nothing (control flow is counted through its computations)
FREE = frozenset({"parameter", "constant", "get-tuple-element", "tuple", "bitcast", "after-all",
                  "partition-id", "replica-id", "opt-barrier", "add-dependency"})
_HEAD = re.compile(r"^(ENTRY\s+)?%([\w.\-]+)\s.*\{\s*$")
_INST = re.compile(r"^\s*(?:ROOT\s+)?%([\w.\-]+) = (.*)$")


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
      rest, depth, cut = m.group(2), 0, len(m.group(2))
      for i, ch in enumerate(rest):  # the result type ends at the first top-level space
        depth += (ch in "([{") - (ch in ")]}")
        if ch == " " and depth == 0:
          cut = i
          break
      after = rest[cut + 1:]
      comps[cur].append((m.group(1), after.split("(", 1)[0], after))
  if not entry:
    raise ValueError("hlo_text: no ENTRY computation in this HLO text")
  return comps, entry


def kind(op: str, after: str) -> str:
  """matmul (cuBLAS or XLA's Triton GEMMs) | cudnn | pallas (Triton kernels of this package) |
  library call | fusion (XLA's other fused kernels) | the opcode (copy, ...)."""
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
