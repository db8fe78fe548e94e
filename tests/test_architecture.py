"""The shape of the code: packages import only downward (stage one never imports stage two),
DVC stages depend on the folders of the code they run, no function is longer than a screen and
no module longer than ~600 lines."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest
import yaml

ROOT = Path(__file__).resolve().parents[1]
PACKAGES = ("pipeline", "stages")
MAX_FUNCTION_LINES = 60
MAX_MODULE_LINES = 620  # "about 600": a module a reader can hold in mind
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


def _cli_imports(command: str) -> tuple[Path, set[str]]:
    """The command module of `pipeline COMMAND` and what it imports from it: its module level,
    its helpers, and the body of that command's function, but not the other commands'."""
    from pipeline.cli import COMMANDS

    module, function, _ = COMMANDS[command]
    path = ROOT / "pipeline" / "cli" / f"{module}.py"
    tree = ast.parse(path.read_text())
    keep = []
    for node in tree.body:
        is_command = any(
            isinstance(d, ast.Call) and getattr(d.func, "attr", None) == "command"
            for d in getattr(node, "decorator_list", [])
        )
        if not is_command or node.name == function:
            keep.append(node)
    return path.relative_to(ROOT), _imported_modules(keep, _type_checking_only(tree))


def stage_code(command: str) -> set[Path]:
    """Every in-repo file `pipeline COMMAND` runs."""
    stage = f"stages.{command.replace('-', '_')}"
    path, imports = _cli_imports(command)
    return _closure({stage, "pipeline.cli"} | (imports - {f"pipeline.cli.{path.stem}"})) | {path}


def _declared_code(deps: list[str]) -> set[Path]:
    """The .py files a stage's deps name, folders expanded."""
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
def test_dvc_stage_deps_cover_the_code_it_runs_and_no_more_folders(name, command, deps):
    """Deps are whole folders where the stage runs code from a folder, single files where it
    runs one file of a folder it otherwise does not need (its command module, its stage)."""
    needed = stage_code(command)
    missing = needed - _declared_code(deps)
    assert not missing, f"{name}: dvc.yaml misses {sorted(map(str, missing))}"
    idle = [d for d in deps if d.split("/")[0] in PACKAGES and not _declared_code([d]) & needed]
    assert not idle, f"{name}: dvc.yaml lists code the stage never runs: {idle}"


def _stages_depending_on(path: str) -> set[str]:
    return {name for name, _, deps in _stages() if Path(path) in _declared_code(deps)}


def test_editing_the_report_re_runs_only_the_report():
    for path in (
        "pipeline/report/report.py",
        "pipeline/report/figures.py",
        "pipeline/cli/report.py",
    ):
        assert _stages_depending_on(path) == {"report"}, path


def test_editing_a_loss_re_runs_students_evaluations_and_report_never_the_teacher():
    """The promise 'run the teacher once': editing losses, students or the report must never
    re-run the teacher or its caches."""
    for path in ("pipeline/student/losses.py", "pipeline/student/distill.py"):
        found = _stages_depending_on(path)
        assert {"train_student", "evaluate", "report"} <= found, path
        assert not found & {"train_teacher", "precompute_logits"}, path
    for command in ("train-teacher", "precompute-logits"):
        code = {str(p) for p in stage_code(command)}
        assert not [p for p in code if p.startswith(("pipeline/student/", "pipeline/evaluate/"))]


# Which packages a package may import (TYPE_CHECKING imports aside: they never run). Shared
# ground below, then the cache (the contract), then the two stages, evaluation and the report.
ALLOWED = {
    "core": {"core", "models"},
    "data": {"core", "data"},
    "models": {"core", "models"},
    "cache": {"core", "data", "cache"},
    "teacher": {"core", "data", "models", "cache", "teacher"},
    "student": {"core", "data", "models", "cache", "student"},
    "evaluate": {"core", "data", "models", "cache", "student", "evaluate"},
    "report": {"core", "data", "models", "cache", "student", "evaluate", "report"},
}
# A command module may import what its package may, and the stages it calls.
CLI_PACKAGE = {
    "lists": "report",  # the registries: models, data sources, losses
    "teacher": "teacher",
    "cache": "teacher",
    "student": "student",
    "evaluate": "evaluate",
    "report": "report",
}


def _packages_imported(path: Path) -> dict[str, set[str]]:
    """{package: modules} for the pipeline packages `path` imports, lazily or not."""
    tree = ast.parse(path.read_text())
    found: dict[str, set[str]] = {}
    for name in _imported_modules([tree], _type_checking_only(tree)):
        parts = name.split(".")
        if parts[0] == "stages" and len(parts) > 1:
            for sub in _imported_modules([ast.parse(_module_file(name).read_text())], set()):
                if sub.startswith("pipeline.") and len(sub.split(".")) > 1:
                    found.setdefault(sub.split(".")[1], set()).add(f"{name} → {sub}")
        elif (
            parts[0] == "pipeline"
            and len(parts) > 1
            and _module_file(name).parent != ROOT / "pipeline"
        ):
            found.setdefault(parts[1], set()).add(name)
    return found


def _direction_faults(path: Path, allowed: set[str]) -> list[str]:
    return [
        f"{path.relative_to(ROOT)} imports {sorted(mods)}"
        for package, mods in _packages_imported(path).items()
        if package not in allowed | {"cli"} or (package == "cli" and "cli" not in allowed)
    ]


def test_each_package_imports_only_the_packages_below_it():
    """Stage one never imports stage two (nor stage two stage one): the cache is their whole
    contract, and editing a loss cannot re-run the teacher."""
    faults = []
    for package, allowed in ALLOWED.items():
        for path in sorted((ROOT / "pipeline" / package).rglob("*.py")):
            faults += _direction_faults(path, allowed)
    for module, package in CLI_PACKAGE.items():
        path = ROOT / "pipeline" / "cli" / f"{module}.py"
        faults += _direction_faults(path, ALLOWED[package] | {"cli"})
    assert not faults, "\n".join(faults)


def test_every_package_says_what_lives_there_and_what_it_may_import():
    for package in ALLOWED:
        doc = ast.get_docstring(
            ast.parse((ROOT / "pipeline" / package / "__init__.py").read_text())
        )
        assert doc and "May import" in doc, package


def test_no_function_is_longer_than_a_screen():
    long = []
    for path in _source_files():
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
                lines = node.end_lineno - node.lineno + 1
                if lines > MAX_FUNCTION_LINES:
                    long.append(f"{path.relative_to(ROOT)}:{node.name} ({lines} lines)")
    assert not long, f"functions over {MAX_FUNCTION_LINES} lines: {long}"


def test_no_module_is_longer_than_about_600_lines():
    long = {
        str(p.relative_to(ROOT)): n
        for p in _source_files()
        if (n := len(p.read_text().splitlines())) > MAX_MODULE_LINES
    }
    assert not long, f"modules over {MAX_MODULE_LINES} lines: {long}"


def test_stages_are_glue():
    long = {
        p.name: n
        for p in sorted((ROOT / "stages").glob("*.py"))
        if (n := len(p.read_text().splitlines())) > MAX_STAGE_LINES
    }
    assert not long, f"stages over {MAX_STAGE_LINES} lines: {long}"
