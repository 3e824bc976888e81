"""api/ reaches the job store only through tasks.service (issue: one boundary between the gateway
and the task layer's storage)."""

import ast
from pathlib import Path

API = Path(__file__).resolve().parents[2] / "api"


def _imported_modules(path: Path) -> set[str]:
    names = set()
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.ImportFrom) and node.module:
            names.add(node.module)
        elif isinstance(node, ast.Import):
            names.update(alias.name for alias in node.names)
    return names


def test_no_api_module_imports_the_job_store():
    modules = sorted(API.glob("*.py"))
    assert modules, "no api modules found"
    offenders = {path.name: sorted(m for m in _imported_modules(path)
                                   if m == "tasks.jobstore" or m.startswith("tasks.jobstore."))
                 for path in modules}
    assert {name: found for name, found in offenders.items() if found} == {}
