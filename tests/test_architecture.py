"""The shape of the code: DVC stages depend on exactly the modules they import, and no
function in the package or the stages is longer than a screen."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest
import yaml

ROOT = Path(__file__).resolve().parents[1]
PACKAGES = ("pipeline", "stages")
MAX_FUNCTION_LINES = 60
MAX_STAGE_LINES = 100  # a stage resolves, calls the library and writes: glue, not logic


def _source_files() -> list[Path]:
    return sorted(p for pkg in PACKAGES for p in (ROOT / pkg).rglob("*.py"))


def _module_file(name: str) -> Path | None:
    """The file of in-repo module `name` (pipeline.cache.layout → pipeline/cache/layout.py)."""
    base = ROOT.joinpath(*name.split("."))
    for candidate in (base.with_suffix(".py"), base / "__init__.py"):
        if candidate.is_file():
            return candidate
    return None


def _with_parents(name: str) -> list[str]:
    """Importing a.b.c runs a/__init__.py and a/b/__init__.py too."""
    parts = name.split(".")
    return [".".join(parts[: i + 1]) for i in range(len(parts))]


def _type_checking_only(tree: ast.AST) -> set[int]:
    """ids of import nodes under `if TYPE_CHECKING:` (never run)."""
    skip = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.If) and getattr(node.test, "id", None) == "TYPE_CHECKING":
            skip |= {id(n) for n in ast.walk(node)}
    return skip


def _imported_modules(nodes: list[ast.AST], skip: set[int]) -> set[str]:
    """In-repo modules imported anywhere under `nodes` (function bodies too: torch and
    friends are imported lazily, and a lazy import still runs when the stage runs)."""
    names: set[str] = set()
    for root in nodes:
        for node in ast.walk(root):
            if id(node) in skip:
                continue
            if isinstance(node, ast.Import):
                names |= {a.name for a in node.names}
            elif isinstance(node, ast.ImportFrom) and node.module and not node.level:
                names.add(node.module)
                names |= {f"{node.module}.{a.name}" for a in node.names}
    found = set()
    for name in names:
        if name.split(".")[0] in PACKAGES:
            found |= {m for m in _with_parents(name) if _module_file(m)}
    return found


def _closure(start: set[str]) -> set[Path]:
    """Files of every in-repo module reachable from the modules `start`."""
    seen: set[str] = set()
    todo = [m for name in start for m in _with_parents(name)]
    while todo:
        name = todo.pop()
        if name in seen or _module_file(name) is None:
            continue
        seen.add(name)
        tree = ast.parse(_module_file(name).read_text())
        todo += _imported_modules([tree], _type_checking_only(tree))
    return {_module_file(m).relative_to(ROOT) for m in seen}


def _cli_imports(command: str) -> set[str]:
    """What `pipeline COMMAND` imports from cli.py: its module level, its helpers, and the body
    of that command's function, but not the bodies of the other commands."""
    tree = ast.parse((ROOT / "pipeline/cli.py").read_text())
    keep = []
    for node in tree.body:
        commands = [
            d.args[0].value
            for d in getattr(node, "decorator_list", [])
            if isinstance(d, ast.Call) and getattr(d.func, "attr", None) == "command" and d.args
        ]
        if not commands or command in commands:
            keep.append(node)
    return _imported_modules(keep, _type_checking_only(tree)) - {"pipeline.cli"}


def stage_code(command: str) -> set[Path]:
    """Every in-repo file `pipeline COMMAND` runs."""
    stage = f"stages.{command.replace('-', '_')}"
    return _closure({stage} | _cli_imports(command)) | {Path("pipeline/cli.py")}


def _declared_code(deps: list[str]) -> set[Path]:
    """The .py files a stage's deps name, directories expanded."""
    files = set()
    for dep in deps:
        path = ROOT / dep
        if dep.split("/")[0] not in PACKAGES:
            continue
        found = sorted(path.rglob("*.py")) if path.is_dir() else [path]
        files |= {p.relative_to(ROOT) for p in found}
    return files


def _stages() -> list[tuple[str, str, list[str]]]:
    spec = yaml.safe_load((ROOT / "dvc.yaml").read_text())["stages"]
    return [(name, s["cmd"].split()[1], s["deps"]) for name, s in spec.items()]


@pytest.mark.parametrize("name, command, deps", _stages(), ids=[s[0] for s in _stages()])
def test_dvc_stage_depends_on_exactly_the_code_it_runs(name, command, deps):
    needed, declared = stage_code(command), _declared_code(deps)
    assert not needed - declared, f"{name}: dvc.yaml misses {sorted(map(str, needed - declared))}"
    assert not declared - needed, f"{name}: dvc.yaml lists {sorted(map(str, declared - needed))}"


def test_the_teacher_stages_do_not_run_the_student_code():
    """The promise 'run the teacher once': editing losses, students or the report must never
    re-run the teacher or its caches."""
    student_side = {
        Path("pipeline/losses.py"),
        Path("pipeline/report.py"),
        Path("pipeline/distill.py"),
        Path("pipeline/metrics.py"),
    }
    for command in ("train-teacher", "precompute-logits"):
        assert not stage_code(command) & student_side, command


def test_no_function_is_longer_than_a_screen():
    long = []
    for path in _source_files():
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
                lines = node.end_lineno - node.lineno + 1
                if lines > MAX_FUNCTION_LINES:
                    long.append(f"{path.relative_to(ROOT)}:{node.name} ({lines} lines)")
    assert not long, f"functions over {MAX_FUNCTION_LINES} lines: {long}"


def test_stages_are_glue():
    long = {
        p.name: n
        for p in sorted((ROOT / "stages").glob("*.py"))
        if (n := len(p.read_text().splitlines())) > MAX_STAGE_LINES
    }
    assert not long, f"stages over {MAX_STAGE_LINES} lines: {long}"
