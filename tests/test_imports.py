"""The package imports one way only: config (argtypes.py and cache.py beside it) -> sharding
(batch_blocks.py beside it) ->
layers -> models -> data -> train -> eval -> benchmarks -> entry points (cli.py, cli_output.py,
demo.py). No module imports a higher layer and no modules import each other in a circle. Every
import counts, at module level or inside a function.
"""

import ast
import pathlib

import pytest

PACKAGE = "ttt_jax"
ROOT = pathlib.Path(__file__).resolve().parents[1] / PACKAGE

# Layer of a module: its first path component under the package (a subpackage or a top-level
# module), lowest first. A module of the same layer may be imported; a higher one may not.
LAYERS = ("__init__", ("config", "argtypes", "cache"), ("sharding", "batch_blocks"), "layers",
          "models", "data", "runs", "train", "interop", "eval", "benchmarks",
          ("cli", "cli_output", "demo"))
RANK = {name: rank for rank, names in enumerate(LAYERS)
        for name in (names if isinstance(names, tuple) else (names,))}


def module_name(path: pathlib.Path) -> str:
  parts = path.relative_to(ROOT.parent).with_suffix("").parts
  return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def all_modules() -> dict[str, pathlib.Path]:
  return {module_name(p): p for p in sorted(ROOT.rglob("*.py"))}


def layer_of(module: str) -> str:
  parts = module.split(".")
  key = parts[1] if len(parts) > 1 else "__init__"
  if key not in RANK:
    raise AssertionError(f"{module}: no layer for {key!r}; add it to LAYERS in {__file__}")
  return key


def rank_of(module: str) -> int:
  return RANK[layer_of(module)]


def imported_modules(tree: ast.AST, modules: dict) -> list[tuple[str, int]]:
  """(package module, line) of every import in `tree`, at any depth (functions included).
  `from a.b import c` names the submodule a.b.c when there is one, else a.b."""
  out = []
  for node in ast.walk(tree):
    if isinstance(node, ast.Import):
      names = [alias.name for alias in node.names]
    elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
      names = [f"{node.module}.{alias.name}" if f"{node.module}.{alias.name}" in modules
               else node.module for alias in node.names]
    else:
      continue
    for name in names:
      while name and name not in modules and name.startswith(PACKAGE + "."):
        name = name.rpartition(".")[0]  # `import ttt_jax.a.b.attr` -> the module that exists
      if name in modules:
        out.append((name, node.lineno))
  return out


def import_graph(modules: dict[str, pathlib.Path]) -> dict[str, list[tuple[str, int]]]:
  graph = {}
  for name, path in modules.items():
    tree = ast.parse(path.read_text(encoding="utf-8"), filename=str(path))
    graph[name] = [(m, line) for m, line in imported_modules(tree, modules) if m != name]
  return graph


def upward_imports(graph) -> list[str]:
  return [f"{src} ({layer_of(src)}) imports {dst} ({layer_of(dst)}, a higher layer) at line {line}"
          for src, edges in graph.items() for dst, line in edges
          if rank_of(dst) > rank_of(src)]


def find_cycles(graph) -> list[list[str]]:
  """One import cycle [a, b, ..., a] per group of modules that import each other in a circle
  (strongly connected component, Tarjan's algorithm)."""
  index: dict[str, int] = {}
  low: dict[str, int] = {}
  stack: list[str] = []
  groups: list[set[str]] = []

  def connect(node: str) -> None:
    index[node] = low[node] = len(index)
    stack.append(node)
    for dst, _ in graph.get(node, ()):
      if dst not in index:
        connect(dst)
        low[node] = min(low[node], low[dst])
      elif dst in stack:
        low[node] = min(low[node], index[dst])
    if low[node] == index[node]:
      group = set()
      while True:
        member = stack.pop()
        group.add(member)
        if member == node:
          break
      if len(group) > 1:
        groups.append(group)

  for node in sorted(graph):
    if node not in index:
      connect(node)
  return [_cycle_in(graph, group) for group in groups]


def _cycle_in(graph, group: set[str]) -> list[str]:
  """A shortest cycle through the group's first module (breadth-first within the group)."""
  start = min(group)
  parent = {start: None}
  frontier = [start]
  while frontier:
    nxt = []
    for node in frontier:
      for dst, _ in graph[node]:
        if dst == start:
          path = [node]
          while parent[path[-1]] is not None:
            path.append(parent[path[-1]])
          return [start] + path[::-1][1:] + [start]
        if dst in group and dst not in parent:
          parent[dst] = node
          nxt.append(dst)
    frontier = nxt
  raise AssertionError(f"no cycle in {group}")


def test_every_module_has_a_layer():
  for name in all_modules():
    layer_of(name)


def test_no_module_imports_a_higher_layer():
  bad = upward_imports(import_graph(all_modules()))
  assert not bad, "imports against the layer order:\n  " + "\n  ".join(bad)


def test_no_module_over_400_lines():
  """Modules stay readable in one sitting: a file that grows past this is split along a seam."""
  long = {name: n for name, path in all_modules().items()
          if (n := len(path.read_text().splitlines())) > 400}
  assert not long, f"modules over 400 lines: {long}"


def test_no_import_cycle():
  cycles = find_cycles(import_graph(all_modules()))
  assert not cycles, "import cycles:\n  " + "\n  ".join(" -> ".join(c) for c in cycles)


# -- the checks themselves catch what they should -------------------------------------------------
def _graph_of(sources: dict[str, str]) -> dict:
  modules = dict.fromkeys(sources)
  return {name: [(m, line) for m, line in imported_modules(ast.parse(src), modules) if m != name]
          for name, src in sources.items()}


def test_checks_catch_upward_and_circular_imports_inside_functions():
  graph = _graph_of({
      "ttt_jax.config": "def f():\n  from ttt_jax.train import optim\n",
      "ttt_jax.train": "",
      "ttt_jax.train.optim": "from ttt_jax.config import ConfigError\n",
      "ttt_jax.models.lm": "import ttt_jax.layers.mlp\n",
      "ttt_jax.layers.mlp": "def g():\n  from ttt_jax.models.lm import Block\n",
  })
  bad = upward_imports(graph)
  assert any("ttt_jax.config (config) imports ttt_jax.train.optim (train" in b for b in bad), bad
  assert any("ttt_jax.layers.mlp (layers) imports ttt_jax.models.lm (models" in b for b in bad), bad
  assert sorted(find_cycles(graph)) == [
      ["ttt_jax.config", "ttt_jax.train.optim", "ttt_jax.config"],
      ["ttt_jax.layers.mlp", "ttt_jax.models.lm", "ttt_jax.layers.mlp"]]
  assert find_cycles({"a": [("b", 1)], "b": [("c", 2)], "c": []}) == []
  ring = {"a": [("b", 1)], "b": [("c", 1), ("a", 1)], "c": [("a", 1)]}
  assert find_cycles(ring) == [["a", "b", "a"]]


@pytest.mark.parametrize("source, expected", [
    ("from ttt_jax.train import optim as opt", "ttt_jax.train.optim"),
    ("from ttt_jax.train.optim import make_optimizer", "ttt_jax.train.optim"),
    ("import ttt_jax.train.optim", "ttt_jax.train.optim"),
    ("from ttt_jax.train import Nothing", "ttt_jax.train"),
])
def test_import_forms_resolve_to_modules(source, expected):
  modules = dict.fromkeys(["ttt_jax.train", "ttt_jax.train.optim"])
  assert imported_modules(ast.parse(source), modules) == [(expected, 1)]
