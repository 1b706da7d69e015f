"""The import graph of the sass_jax package (read from the source, nothing is imported).

Every ``import sass_jax...`` / ``from sass_jax... import ...`` of every module under sass_jax/,
function-local imports included and relative imports resolved, is an edge. The graph must have
no cycle; ``sass_jax.model`` must not depend on data, training or evaluation code; the
validator ``config_check`` must not import the training loop; and only
``sass_jax.bench.torch_reference`` may import torch when it is imported.
"""

from __future__ import annotations

import ast
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def _modules(root: Path, package: str) -> dict[str, Path]:
  """{dotted module name: file} of every .py file of ``root / package`` (``__init__.py`` is
  the package itself)."""
  out = {}
  for p in sorted((root / package).rglob("*.py")):
    parts = p.relative_to(root).with_suffix("").parts
    if parts[-1] == "__init__":
      parts = parts[:-1]
    out[".".join(parts)] = p
  return out


class _Imports(ast.NodeVisitor):
  """The absolute names a module imports: (name, names imported from it or None, local)."""

  def __init__(self, module: str, is_package: bool):
    self.here = module if is_package else module.rpartition(".")[0]
    self.found: list[tuple[str, tuple[str, ...] | None, bool]] = []
    self.depth = 0

  def _function(self, node):
    self.depth += 1
    self.generic_visit(node)
    self.depth -= 1

  visit_FunctionDef = visit_AsyncFunctionDef = visit_Lambda = _function

  def visit_Import(self, node):
    for a in node.names:
      self.found.append((a.name, None, self.depth > 0))

  def visit_ImportFrom(self, node):
    base = node.module or ""
    if node.level:
      pkg = self.here.split(".")
      pkg = pkg[: len(pkg) - (node.level - 1)]
      base = ".".join(pkg + ([base] if base else []))
    self.found.append((base, tuple(a.name for a in node.names), self.depth > 0))


def import_graph(root: Path, package: str, local: bool = True) -> dict[str, set[str]]:
  """{module: modules of ``package`` it imports}. ``from X import y`` is an edge to ``X.y``
  when that is a module, else to ``X``; ``local=False`` leaves out imports inside functions
  (what importing the module runs)."""
  mods = _modules(root, package)

  def owner(name: str) -> str | None:
    while name and name not in mods:
      name = name.rpartition(".")[0]
    return name or None

  graph = {}
  for name, path in mods.items():
    v = _Imports(name, path.name == "__init__.py")
    v.visit(ast.parse(path.read_text(), str(path)))
    edges = set()
    for target, names, is_local in v.found:
      if (is_local and not local) or not (target == package or target.startswith(package + ".")):
        continue
      for t in [f"{target}.{n}" for n in names or ()] or [target]:
        o = t if t in mods else owner(target)
        if o and o != name:
          edges.add(o)
    graph[name] = edges
  return graph


def external_imports(root: Path, package: str) -> dict[str, set[str]]:
  """{module: top-level names of other packages it imports when imported (no function-local
  imports)}."""
  out = {}
  for name, path in _modules(root, package).items():
    v = _Imports(name, path.name == "__init__.py")
    v.visit(ast.parse(path.read_text(), str(path)))
    out[name] = {t.split(".")[0] for t, _, is_local in v.found if not is_local and t}
  return out


def _shortest_cycle(graph: dict[str, set[str]], comp: set[str], start: str) -> list[str]:
  """The shortest path ``start -> ... -> start`` inside the strongly connected ``comp``."""
  prev, frontier = {start: None}, [start]
  while not any(start in graph[v] for v in frontier):
    nxt = []
    for v in frontier:
      for w in sorted(graph[v] & comp):
        if w not in prev:
          prev[w] = v
          nxt.append(w)
    frontier = nxt
  last = next(v for v in frontier if start in graph[v])
  path = []
  while last is not None:
    path.insert(0, last)
    last = prev[last]
  return path + [start]


def cycles(graph: dict[str, set[str]]) -> list[list[str]]:
  """The shortest cycle ``[a, b, ..., a]`` through each module that is on one, each starting
  at its smallest name, without repeats, sorted."""
  index, low, on, stack, comps = {}, {}, set(), [], []

  def strong(v):  # Tarjan's strongly connected components
    index[v] = low[v] = len(index)
    stack.append(v)
    on.add(v)
    for w in sorted(graph.get(v, ())):
      if w not in index:
        strong(w)
        low[v] = min(low[v], low[w])
      elif w in on:
        low[v] = min(low[v], index[w])
    if low[v] == index[v]:
      comp = set()
      while True:
        w = stack.pop()
        on.discard(w)
        comp.add(w)
        if w == v:
          break
      comps.append(comp)

  for v in sorted(graph):
    if v not in index:
      strong(v)
  out = set()
  for comp in comps:
    for v in sorted(comp):
      if len(comp) == 1 and v not in graph.get(v, ()):
        continue
      c = _shortest_cycle(graph, comp, v)[:-1]
      i = c.index(min(c))
      out.add(tuple(c[i:] + c[:i] + [min(c)]))
  return sorted(map(list, out))


GRAPH = import_graph(ROOT, "sass_jax")


def test_the_graph_reads_every_kind_of_import(tmp_path):
  pkg = tmp_path / "pkg"
  (pkg / "sub").mkdir(parents=True)
  (pkg / "__init__.py").write_text("")
  (pkg / "sub" / "__init__.py").write_text("from . import c\n")
  (pkg / "a.py").write_text("import os\nfrom pkg.sub import c as _c\n")
  (pkg / "b.py").write_text("def f():\n  from .a import x\n  return x\n")
  (pkg / "sub" / "c.py").write_text("from ..b import f\nimport pkg.sub\n")
  g = import_graph(tmp_path, "pkg")
  assert g == {
    "pkg": set(),
    "pkg.a": {"pkg.sub.c"},
    "pkg.b": {"pkg.a"},
    "pkg.sub": {"pkg.sub.c"},
    "pkg.sub.c": {"pkg.b", "pkg.sub"},
  }
  assert import_graph(tmp_path, "pkg", local=False)["pkg.b"] == set()
  assert cycles(g) == [
    ["pkg.a", "pkg.sub.c", "pkg.b", "pkg.a"],
    ["pkg.sub", "pkg.sub.c", "pkg.sub"],
  ]
  # and the real package is read: a top-level and a function-local edge of the loop
  assert {"sass_jax.train.steps", "sass_jax.plots"} <= GRAPH["sass_jax.train.loop"]


def test_no_import_cycle():
  found = cycles(GRAPH)
  assert not found, "import cycles:\n  " + "\n  ".join(" -> ".join(c) for c in found)


def test_model_imports_no_data_train_or_eval_code():
  bad = sorted(
    f"{m} -> {t}"
    for m, ts in GRAPH.items()
    if m == "sass_jax.model" or m.startswith("sass_jax.model.")
    for t in ts
    if t.split(".")[:2] in (["sass_jax", "data"], ["sass_jax", "train"], ["sass_jax", "eval"])
  )
  assert not bad, "sass_jax.model depends on:\n  " + "\n  ".join(bad)


def test_config_check_does_not_import_the_training_loop():
  assert "sass_jax.train.loop" not in GRAPH["sass_jax.config_check"]


def test_only_the_torch_reference_imports_torch():
  """Importing any module of sass_jax but the torch reference never imports torch."""
  ref = "sass_jax.bench.torch_reference"
  top = import_graph(ROOT, "sass_jax", local=False)
  ext = external_imports(ROOT, "sass_jax")
  assert "torch" in ext[ref]
  for m in top:
    if m == ref:
      continue
    seen, todo = {m}, [m]
    while todo:
      for t in top[todo.pop()] - seen:
        seen.add(t)
        todo.append(t)
    assert ref not in seen and not any("torch" in ext[s] for s in seen), m
