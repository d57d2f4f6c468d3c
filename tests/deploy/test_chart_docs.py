"""The chart's documentation stays true: every value documented, the README's table current."""

from __future__ import annotations

from tests.deploy.helm_chart import CHART
from tools.chart_readme import documentation_problems, values_table, with_table


def test_every_value_has_a_param_line_and_every_param_a_value():
    assert documentation_problems((CHART / "values.yaml").read_text()) == []


def test_a_value_without_documentation_is_reported():
    text = "## @section S\n## @param a.b The b\na:\n  b: 1\n  c: 2\n"
    assert documentation_problems(text) == ["a.c: no ## @param line"]
    text = "## @param a [object] All of a\n## @param z Gone\na:\n  b: 1\n"
    assert documentation_problems(text) == ["z: @param of no value"]


def test_the_readme_values_table_is_generated_from_values_yaml():
    readme = (CHART / "README.md").read_text()
    table = values_table((CHART / "values.yaml").read_text())
    assert with_table(readme, table) == readme, "run .venv/bin/python tools/chart_readme.py"
    assert "| `profile` |" in table and "| `engine.build.mode` |" in table
