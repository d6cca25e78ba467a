"""CI runs every test that is not `slow`: `make test` (the core) and `make test-extended` (the
rest) split them by the `extended` marker, with nothing left out and nothing run twice."""

from __future__ import annotations

import itertools
import re

from _pytest.mark.expression import Expression

from .repo_files import ROOT


def _recipe_marks(target: str) -> str:
  """The -m expression of the pytest command in `target`'s Makefile recipe."""
  text = (ROOT / "Makefile").read_text()
  recipe = re.search(rf"^{re.escape(target)}:.*\n((?:\t.*\n)+)", text, re.M)
  assert recipe, f"Makefile has no {target} target"
  marks = re.search(r'-m "([^"]+)"', recipe.group(1))
  assert marks, f"{target}'s recipe selects no markers"
  return marks.group(1)


def test_ci_runs_make_test_then_the_extended_tests():
  commands = [line.strip() for line in (ROOT / ".ci" / "run").read_text().splitlines()
              if line.strip().startswith("make ")]
  assert commands == ["make test", "make test-extended"]


def test_the_two_targets_split_the_tests_that_are_not_slow():
  core = Expression.compile(_recipe_marks("test"))
  extended = Expression.compile(_recipe_marks("test-extended"))
  markers = ("slow", "extended", "parametrize")
  for n in range(len(markers) + 1):
    for marks in itertools.combinations(markers, n):
      picked = [e.evaluate(lambda name, m=marks: name in m) for e in (core, extended)]
      # each test that is not slow runs exactly once in CI, slow ones in neither target
      assert sum(picked) == (0 if "slow" in marks else 1), (marks, picked)
  assert core.evaluate(lambda name: False)  # an unmarked test is a core test
