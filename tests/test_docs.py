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
