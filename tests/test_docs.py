"""The docs are tested: the site builds with `mkdocs build --strict`, and every shell block of
README.md and docs/*.md is run by a test or says, on the line right before its opening fence,
why it is not:

    <!-- not run: REASON -->        it needs what a test machine lacks (CIFAR-10, a GPU, an S3
                                    account, your own files) or would change your clone
    <!-- run by tests/FILE.py -->   another test runs it; FILE exists and names the page
    (no marker)                     this file runs it, in the scratch tour below

The scratch tour: the README's five commands in a fresh ~/kd-scratch (HOME is a temporary
directory), then each page of LANES pasted top to bottom (every unmarked block of the page, in
order) in a copy of that directory, with the installed `pipeline` on PATH.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import pytest

from tests import procs

ROOT = Path(__file__).resolve().parents[1]
PAGES = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]
SHELL = {"bash", "sh", "console", "shell"}
MARKER = re.compile(r"^<!-- (?:not run: (?P<why>\S.*?)|run by (?P<test>tests/[\w/]+\.py)) -->$")
FENCE = re.compile(r"^(?P<fence>```+|~~~+)\s*(?P<lang>[\w+-]*)")
# The pages after the README's tour, in lanes that run side by side (each in its own copy
# of the tour's directory): a page's blocks may use what the tour and the pages before it in
# its lane made. Every page with an unmarked shell block is in one lane.
LANES = [
    ["docs/commands.md"],
    ["docs/sequences.md"],
    [
        "docs/teachers-and-data.md",
        "docs/losses.md",
        "docs/views-and-features.md",
        "docs/sparse-targets.md",
    ],
]
# Pages written by others: in the nav, never required to hold anything here.
OTHERS = ["api.md", "architecture.md", "cache-format.md"]


@dataclass
class Block:
    page: str  # relative to the repository root
    line: int  # of the opening fence, 1-based
    lang: str
    text: str
    marker: re.Match | None

    def __str__(self) -> str:
        return f"{self.page}:{self.line}"


def blocks(path: Path) -> list[Block]:
    """The fenced code blocks of a Markdown file, each with the marker line before it."""
    lines = path.read_text().splitlines()
    found, i = [], 0
    while i < len(lines):
        m = FENCE.match(lines[i])
        if not m:
            i += 1
            continue
        end = next(
            (j for j in range(i + 1, len(lines)) if lines[j].startswith(m["fence"][:3])), None
        )
        assert end is not None, f"{path.name}:{i + 1}: a fence that never closes"
        marker = MARKER.match(lines[i - 1].strip()) if i else None
        page = str(path.relative_to(ROOT))
        found.append(Block(page, i + 1, m["lang"], "\n".join(lines[i + 1 : end]) + "\n", marker))
        i = end + 1
    return found


def shell_blocks() -> list[Block]:
    return [b for p in PAGES for b in blocks(p) if b.lang in SHELL]


def unmarked(page: str) -> list[Block]:
    return [b for b in blocks(ROOT / page) if b.lang in SHELL and b.marker is None]


# --- the site and the convention -----------------------------------------------------------


def test_the_site_builds_strict_with_every_page_in_the_nav(tmp_path):
    """`mkdocs build --strict`: no broken link or anchor, no page left out of the nav (-q
    would hide the warnings that --strict counts, so it is not given)."""
    import yaml

    mkdocs = Path(sys.executable).parent / "mkdocs"
    result = procs.run(
        [mkdocs, "build", "--strict", "--config-file", ROOT / "mkdocs.yml",
         "--site-dir", tmp_path / "site"],
        cwd=ROOT, timeout=120,
    )  # fmt: skip
    assert result.returncode == 0, result.stdout + result.stderr
    assert (tmp_path / "site" / "index.html").is_file()
    config = yaml.safe_load((ROOT / "mkdocs.yml").read_text())
    assert config["docs_dir"] == "docs" and config["theme"]["name"] in ("mkdocs", "readthedocs")
    nav = [page for entry in config["nav"] for page in entry.values()]
    assert sorted(nav) == sorted(p.name for p in (ROOT / "docs").glob("*.md")), nav
    assert set(OTHERS) <= set(nav)


def test_every_shell_block_is_run_or_says_why_not():
    problems = []
    lanes = {page for lane in LANES for page in lane}
    for b in shell_blocks():
        if b.marker is None:
            if b.page != "README.md" and b.page not in lanes:
                problems.append(f"{b}: unmarked, but {b.page} is in no lane of tests/test_docs.py")
        elif b.marker["test"]:
            test = ROOT / b.marker["test"]
            if not test.is_file():
                problems.append(f"{b}: {b.marker['test']} does not exist")
            elif b.page not in test.read_text():
                problems.append(f"{b}: {b.marker['test']} never names {b.page}")
    for page in PAGES:  # a command outside a fence, or in one of no language, escapes the rule
        for b in blocks(page):
            if not b.lang and re.search(r"(?m)^(pipeline|dvc|torchrun|pip) ", b.text):
                problems.append(f"{b}: shell commands in a block of no language: mark it bash")
        outside = re.sub(r"(?ms)^(```+|~~~+).*?^\1", "", page.read_text())
        for line in re.findall(r"(?m)^ {4,}(?:pipeline|dvc|torchrun) .*", outside):
            problems.append(f"{page.name}: an indented command outside a fence: {line.strip()}")
    assert not problems, "\n".join(problems)


def test_blocks_run_by_other_tests_are_the_ones_they_run():
    """The blocks another test runs are still where, and what, that test reads."""
    by_test: dict[str, list[Block]] = {}
    for b in shell_blocks():
        if b.marker is not None and b.marker["test"]:
            by_test.setdefault(b.marker["test"], []).append(b)
    assert set(by_test) == {"tests/test_object_storage.py", "tests/test_dvc_e2e.py"}, by_test
    # test_object_storage runs the block that starts with moto_server, as pasted.
    (s3,) = by_test["tests/test_object_storage.py"]
    assert s3.text.startswith("moto_server "), s3
    # test_dvc_e2e runs `dvc exp show --drop '.*' --keep PATTERN` for each pattern shown.
    source = (ROOT / "tests/test_dvc_e2e.py").read_text()
    for b in by_test["tests/test_dvc_e2e.py"]:
        if b.page == "docs/sequences.md":  # the language-model pipeline, run (smaller) as shown
            assert b.text.splitlines()[0] == "dvc repro examples/lm/dvc.yaml", b
            assert '"repro", "examples/lm/dvc.yaml"' in source
            continue
        for line in b.text.splitlines():
            m = re.fullmatch(r"dvc exp show --drop '\.\*' --keep '([^']+)'", line.strip())
            assert m, f"{b}: test_dvc_e2e runs only dvc exp show --keep lines, not {line!r}"
            assert f'"{m[1]}"' in source or f'r"{m[1]}"' in source, (b, m[1])


def test_the_files_and_tests_the_docs_name_exist():
    """Every `tests/...py::name`, `pipeline/...py` or `benchmarks/...` a page names exists
    (a bare `::name` belongs to the last file named on its line)."""
    problems = []
    for page in PAGES:
        if page.name in OTHERS:
            continue
        for n, line in enumerate(page.read_text().splitlines(), 1):
            last = None
            for path, name in re.findall(
                r"`((?:tests|pipeline|stages|benchmarks)/[\w/.-]+\.\w+)?(?:::(\w+))?`", line
            ):
                if path:
                    last = path
                    if not (ROOT / path).exists():
                        problems.append(f"{page.name}:{n}: no {path}")
                if name and last and f"def {name}(" not in (ROOT / last).read_text():
                    problems.append(f"{page.name}:{n}: no {name} in {last}")
    assert not problems, "\n".join(problems)


def test_the_readme_links_resolve():
    """Links from the README into the docs (mkdocs checks the links between pages)."""
    text = (ROOT / "README.md").read_text()
    targets = re.findall(r"\]\(([^)#\s]+)(?:#[^)]*)?\)", text)
    local = [t for t in targets if "://" not in t]
    assert local, "the README links to no page of the docs"
    missing = [t for t in local if not (ROOT / t).exists()]
    assert not missing, missing


# --- the scratch tour ----------------------------------------------------------------------


def script(pages: list[str]) -> str:
    """The unmarked shell blocks of `pages`, in order, as one bash script that stops at the
    first failing command and shows each command it runs."""
    parts = ["set -euo pipefail", "PS4='+ docs$ '", "set -x"]
    for page in pages:
        for b in unmarked(page):
            parts += [f"# {b}", b.text]
    return "\n".join(parts) + "\n"


def run_pages(home: Path, pages: list[str], name: str) -> subprocess.CompletedProcess:
    """Run `pages` in `home`/kd-scratch with HOME=`home` and this interpreter's bin first on
    PATH (the installed `pipeline`)."""
    scratch = home / "kd-scratch"
    scratch.mkdir(parents=True, exist_ok=True)
    path = home.parent / f"{name}.sh"
    path.write_text(script(pages))
    env = {k: v for k, v in os.environ.items() if not k.startswith("PIPELINE_")}
    env["HOME"] = str(home)
    env["PATH"] = f"{Path(sys.executable).parent}{os.pathsep}{env.get('PATH', '')}"
    return procs.run(["bash", path], cwd=scratch, env=env)


def outputs(pages: list[str]) -> list[str]:
    """Every path a page's blocks name with --out / --out-dir, or as convert-cache's target,
    relative to the scratch directory."""
    text = "".join(b.text for page in pages for b in unmarked(page))
    found = re.findall(r"--out(?:-dir)? (\S+)", text)
    found += re.findall(r"pipeline convert-cache \S+ (\S+)", text)
    return [f for f in found if not f.startswith("s3://")]


def assert_ran(result, home: Path, pages: list[str]) -> None:
    assert result.returncode == 0, (
        f"{', '.join(pages)} failed as pasted:\n{result.stdout[-3000:]}\n{result.stderr[-3000:]}"
    )
    missing = [o for o in outputs(pages) if not (home / "kd-scratch" / o).exists()]
    assert not missing, f"{', '.join(pages)}: outputs not written: {missing}"


@pytest.fixture(scope="module")
def tour(tmp_path_factory) -> Path:
    """HOME after the README's five-command tour, run as pasted."""
    home = tmp_path_factory.mktemp("tour") / "home"
    result = run_pages(home, ["README.md"], "readme")
    assert_ran(result, home, ["README.md"])
    return home


@pytest.mark.slow
def test_the_readme_tour_runs_as_pasted(tour):
    (block,) = unmarked("README.md")
    assert len(re.findall(r"(?m)^pipeline ", block.text)) == 5, "a five-command tour"
    scratch = tour / "kd-scratch"
    assert (scratch / "students/kd_t4/student.pt").is_file()
    metrics = json.loads((scratch / "metrics/kd_t4.json").read_text())
    assert metrics["accuracy"] > 0.85, metrics  # the README shows ~0.94: a student, not noise


@pytest.mark.slow
def test_the_docs_pages_run_as_pasted_after_the_tour(tour, tmp_path):
    """Every unmarked block of every page, page by page in its lane, each lane in a copy of
    the tour's HOME; the lanes run side by side."""
    homes = []
    for i, _ in enumerate(LANES):
        homes.append(tmp_path / f"lane{i}" / "home")
        shutil.copytree(tour, homes[-1], symlinks=True)
    with ThreadPoolExecutor(len(LANES)) as pool:
        results = list(pool.map(run_pages, homes, LANES, [f"lane{i}" for i in range(len(LANES))]))
    for home, pages, result in zip(homes, LANES, results, strict=True):
        assert_ran(result, home, pages)


@pytest.mark.slow
def test_the_sample_the_commands_page_shows_is_as_described(tour):
    """docs/commands.md: sample 1666 is an 8 that the tour's teacher puts first, 7 second."""
    import numpy as np

    from pipeline.cache import open_cache

    text = (ROOT / "docs/commands.md").read_text()
    assert "--id 1666" in text and "Sample 1666 is an 8 that looks like a 7" in text
    with open_cache(tour / "kd-scratch/caches/test.zarr") as cache:
        row = int(np.flatnonzero(cache.sample_ids == 1666)[0])
        assert cache.labels[row] == 8
        logits = cache.logits()[row, 0]
    assert list(np.argsort(-logits)[:2]) == [8, 7], logits
