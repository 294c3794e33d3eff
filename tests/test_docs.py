"""Structural claims of the docs and comments that a test can check cheaply: every repository file they cite
exists."""

from __future__ import annotations

import re
import subprocess
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
# a path into the repository as docs and comments write it: top folder / … / name.ext (not a glob or a template)
CITED = re.compile(r"(?<![\w/.{-])((?:docs|benchmarks|tests|mor_ds|data_pipeline|slurm|ds_configs)/[\w./-]*"
                   r"\.(?:md|py|json|yaml|sh|sbatch)|BENCHMARKS\.md|README\.md)(?![\w{*])")


def tracked(*suffixes: str) -> list[Path]:
    out = subprocess.run(["git", "ls-files"], cwd=REPO, capture_output=True, text=True, check=True).stdout
    return [REPO / p for p in out.split() if p.endswith(suffixes) or p == "Makefile"]


def test_every_cited_repository_file_exists():
    missing = {}
    for path in tracked(".py", ".md", ".sh", ".sbatch", ".yaml", ".toml"):
        for cited in CITED.findall(path.read_text()):
            if not (REPO / cited).exists():
                missing.setdefault(cited, path.relative_to(REPO).as_posix())
    assert not missing, missing


def test_the_module_map_names_every_module():
    """docs/architecture.md's module map lists every module of mor_ds (by file name) and every kernel's home."""
    text = (REPO / "docs" / "architecture.md").read_text()
    modules = [p for p in (REPO / "mor_ds").rglob("*.py") if p.name != "__init__.py"]
    assert not [p.relative_to(REPO).as_posix() for p in modules if p.name not in text]
    kernels = text[text.index("## Triton kernels"):]
    homes = {p.relative_to(REPO).as_posix() for p in modules if "@triton.jit" in p.read_text()}
    assert homes and not [h for h in homes if f"`{h}`" not in kernels]


def test_benchmarks_are_dated_campaigns_and_nothing_cites_a_session():
    """benchmarks/ holds one file per topic, hardware and date; code and docs give dates and reasons, not a
    work session's number."""
    names = [p.name for p in (REPO / "benchmarks").glob("*")]
    assert names and all(re.fullmatch(r"[a-z0-9-]+_[a-z0-9-]+_\d{4}-\d{2}-\d{2}\.md", n) for n in names), names
    current = (REPO / "BENCHMARKS.md").read_text()
    assert all(f"benchmarks/{n}" in current for n in names)  # every campaign is listed
    cited = [f"{p.relative_to(REPO)}: {m}" for p in tracked(".py", ".md", ".sh", ".sbatch", ".yaml")
             for m in re.findall(r".{0,30}\b[Ss]essions? \d+.{0,30}", p.read_text())]
    assert not cited, cited
