"""The README's module table is in import order: each module imports, at module level,
only the project modules listed above it (coconut's import of compiling, for CUDA
decoding, is made when decoding); and DESIGN §5's config table lists every Config key
with its default."""

import ast
import dataclasses
import os
import re

import yaml

from builders import REPO
from utils import Config

MODULE_ROW = re.compile(r"^\| `(\w+)\.py` \|", re.M)


def project_modules() -> list:
    """The library modules in the README's table order."""
    with open(os.path.join(REPO, "README.md"), encoding="utf-8") as f:
        return MODULE_ROW.findall(f.read())


def imported_project_modules(name: str, project: set) -> set:
    with open(os.path.join(REPO, f"{name}.py"), encoding="utf-8") as f:
        tree = ast.parse(f.read())
    found = set()
    module_level = [node for top in tree.body if not isinstance(top, (ast.FunctionDef, ast.ClassDef))
                    for node in ast.walk(top)]
    for node in module_level:
        if isinstance(node, ast.Import):
            found.update(alias.name.split(".")[0] for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            found.add(node.module.split(".")[0])
    return found & project


def test_each_module_imports_only_those_above_it_in_the_readme():
    order = project_modules()
    assert len(order) >= 15 and {"coconut", "trainer", "preflight"} <= set(order)  # premise: the table was read
    for i, name in enumerate(order):
        later = imported_project_modules(name, set(order)) - set(order[:i])
        assert not later, f"{name}.py imports {sorted(later)}, listed below it in README's module table"


def design_config_rows() -> dict:
    """{key: default cell} of DESIGN §5's config table."""
    with open(os.path.join(REPO, "docs", "DESIGN.md"), encoding="utf-8") as f:
        text = f.read()
    start = text.index("| key | type | default | meaning |")
    table = text[start: text.index("\n\n", start)]
    return dict(re.findall(r"^\| `(\w+)` \| [^|]+ \| ([^|]+) \|", table, re.M))


def test_the_design_config_table_lists_every_key_with_its_default():
    rows = design_config_rows()
    defaults = {field.name: field.default for field in dataclasses.fields(Config)}
    assert rows.keys() == defaults.keys(), (rows.keys() - defaults.keys(), defaults.keys() - rows.keys())
    for key, cell in rows.items():
        text = cell.strip().strip("`")
        written = None if text == "None" else yaml.safe_load(text)
        default = defaults[key]
        if isinstance(default, float):
            written = float(written)
        assert written == default and type(written) is type(default), (key, cell, default)
