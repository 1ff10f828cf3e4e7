"""The layout the README states: modules never import a script, and the metrics (reward.py, benchmarks.py) import
nothing of ours."""
import ast
import os

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
MODULES = ("mmduet2", "engine", "runs", "live", "llm", "reward", "toy", "benchmarks")
SCRIPTS = ("data", "sft", "grpo", "infer", "evaluate", "bench")


def imported(name):
    """Every top-level name a file imports, at any depth of the file (an import inside a function counts)."""
    tree = ast.parse(open(os.path.join(ROOT, f"{name}.py")).read())
    names = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            names |= {a.name.split(".")[0] for a in node.names}
        elif isinstance(node, ast.ImportFrom) and node.module:
            names.add(node.module.split(".")[0])
    return names


def test_modules_never_import_a_script():
    found = {m: imported(m) for m in MODULES}
    assert all(found.values())  # each module was read and imports something (the check below is not vacuous)
    assert {m: sorted(n & set(SCRIPTS)) for m, n in found.items() if n & set(SCRIPTS)} == {}


@pytest.mark.parametrize("name", ["reward", "benchmarks"])
def test_the_metrics_import_nothing_of_ours(name):
    """The PAUC metric and reward (reward.py), StreamingBench's and offline QA's scoring (benchmarks.py)."""
    ours = set(MODULES + SCRIPTS) - {name}
    assert imported(name) & ours == set()


def test_files_and_functions_stay_reader_sized():
    """The third draft's limits (docs/tests.md): no file over 800 lines (tools/bench.py 1,000), no function over 150."""
    files = [f for f in os.listdir(ROOT) if f.endswith(".py")] + [f"tools/{f}" for f in os.listdir(f"{ROOT}/tools")
                                                                  if f.endswith(".py")]
    assert len(files) >= 14  # the scripts, the modules and the tools were all found
    long_files, long_functions = {}, {}
    for f in files:
        text = open(os.path.join(ROOT, f)).read()
        if len(text.splitlines()) > (1000 if f == "tools/bench.py" else 800):
            long_files[f] = len(text.splitlines())
        for node in ast.walk(ast.parse(text)):
            if isinstance(node, ast.FunctionDef) and node.end_lineno - node.lineno >= 150:
                long_functions[f"{f}:{node.name}"] = node.end_lineno - node.lineno + 1
    assert long_files == {} and long_functions == {}
