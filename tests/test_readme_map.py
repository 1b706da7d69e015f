"""The README's module map ("Layout") names every module of the package, and nothing else."""

from __future__ import annotations

import re
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def _layout_section() -> str:
  text = (ROOT / "README.md").read_text()
  start = text.index("## Layout")
  end = text.find("\n## ", start + 1)
  return text[start:] if end < 0 else text[start:end]


def test_every_module_is_in_the_readme_map():
  layout = _layout_section()
  modules = sorted(
    p.relative_to(ROOT / "sass_jax")
    for p in (ROOT / "sass_jax").rglob("*.py")
    if p.name != "__init__.py"
  )
  missing = [str(m) for m in modules if not re.search(rf"\b{re.escape(m.name)}\b", layout)]
  assert not missing, f"README 'Layout' does not name: {missing}"


def test_readme_map_names_only_existing_modules():
  names = set(re.findall(r"\b([a-z_]+\.py)\b", _layout_section()))
  present = {p.name for p in (ROOT / "sass_jax").rglob("*.py")}
  assert names <= present, f"README 'Layout' names modules that do not exist: {names - present}"
