"""mor_ds.patches: which modules import DeepSpeed (and that the docs say so), and each patch's version check —
applied on the versions it follows, the library's own code kept with one PatchWarning on any other."""

from __future__ import annotations

import ast
import dataclasses
import importlib
import re
import warnings
from pathlib import Path

import pytest
import torch

from mor_ds import patches

REPO = Path(__file__).resolve().parent.parent


def deepspeed_importers() -> set[str]:
    """Files of mor_ds / data_pipeline with an `import deepspeed…`, `from deepspeed… import` or
    `importlib.import_module("deepspeed…")`, anywhere in the file (also inside functions)."""
    found = set()
    for path in [*(REPO / "mor_ds").rglob("*.py"), *(REPO / "data_pipeline").rglob("*.py")]:
        for node in ast.walk(ast.parse(path.read_text())):
            names: list[str] = []
            if isinstance(node, ast.Import):
                names = [a.name for a in node.names]
            elif isinstance(node, ast.ImportFrom) and node.level == 0:
                names = [node.module or ""]
            elif (isinstance(node, ast.Call) and isinstance(node.func, ast.Attribute)
                  and node.func.attr == "import_module" and node.args and isinstance(node.args[0], ast.Constant)):
                names = [str(node.args[0].value)]
            if any(n == "deepspeed" or n.startswith("deepspeed.") for n in names):
                found.add(path.relative_to(REPO).as_posix())
    return found


def test_only_distributed_and_patches_import_deepspeed():
    assert deepspeed_importers() == {"mor_ds/distributed.py", "mor_ds/patches.py"}


def test_docs_name_the_modules_that_import_deepspeed():
    """Every sentence of the docs that says which modules import DeepSpeed names exactly those modules."""
    claims = 0
    for doc in [REPO / "README.md", *(REPO / "docs").glob("*.md")]:
        paragraphs = (re.sub(r"\s+", " ", p) for p in re.split(r"\n\s*\n", doc.read_text()))
        for sentence in (s for p in paragraphs for s in re.split(r"(?<=[.:;])\s", p)):
            if re.search(r"\bimports? DeepSpeed\b|importing DeepSpeed\b", sentence):
                named = set(re.findall(r"mor_ds[./](\w+)(?:\.py)?", sentence))
                assert named == {"distributed", "patches"}, (doc.name, sentence)
                claims += 1
    assert claims >= 2  # docs/architecture.md and docs/training.md


def test_every_patch_follows_the_installed_libraries():
    """CI installs the versions the patches were written against (pyproject.toml, Makefile): each applies."""
    for patch in patches.PATCHES:
        if importlib.util.find_spec(patch.library) is not None:
            assert patch.mismatch() is None, (patch.name, patch.installed())
    assert len({p.name for p in patches.PATCHES}) == len(patches.PATCHES)


def _another_version(monkeypatch, attr: str) -> patches.Patch:
    """The patch `attr` as if written for a release that is not installed (a fresh name: warned once each)."""
    patch = getattr(patches, attr)
    other = dataclasses.replace(patch, name=f"{patch.name}-test-{len(patches._warned)}", follows="==0.0.1")
    monkeypatch.setattr(patches, attr, other)
    return other


def test_another_version_keeps_the_library_code_and_warns_once(monkeypatch):
    patch = _another_version(monkeypatch, "DYNAMO_RECOMPILE_LIMIT")
    with torch._dynamo.config.patch(recompile_limit=8):
        with pytest.warns(patches.PatchWarning) as caught:
            assert not patches.raise_recompile_limit(64)
        assert torch._dynamo.config.recompile_limit == 8
        (warning,) = caught
        assert str(warning.message) == (f"mor-ds patch {patch.name} follows torch==0.0.1, torch {patch.installed()} "
                                        "is installed: Dynamo's default recompile limit stays")
        with warnings.catch_warnings():
            warnings.simplefilter("error")
            assert not patches.raise_recompile_limit(64)  # said once


def test_recompile_limit_is_raised_never_lowered():
    with torch._dynamo.config.patch(recompile_limit=8):
        assert patches.raise_recompile_limit(64) and torch._dynamo.config.recompile_limit == 64
        assert patches.raise_recompile_limit(16) and torch._dynamo.config.recompile_limit == 64


def test_shm_op_patch(monkeypatch):
    comm = importlib.import_module("deepspeed.comm.torch")
    original, patch = comm.build_shm_op, patches.DEEPSPEED_NO_SHM_OP
    monkeypatch.setattr(comm, "build_shm_op", original)  # restored after the test
    _another_version(monkeypatch, "DEEPSPEED_NO_SHM_OP")
    with pytest.warns(patches.PatchWarning, match="DeepSpeed builds its shared-memory op"):
        assert not patches.disable_shm_op()
    assert comm.build_shm_op is original
    monkeypatch.setattr(patches, "DEEPSPEED_NO_SHM_OP", patch)
    assert patches.disable_shm_op() and comm.build_shm_op is not original and comm.build_shm_op() is None


def test_interpreter_patch_is_idempotent_and_version_checked(monkeypatch):
    pytest.importorskip("triton")
    from triton.runtime import interpreter

    assert patches.patch_interpreter() and patches.patch_interpreter()
    patched = interpreter._patch_lang_tensor
    assert patched._mor_ds_patched and interpreter._patch_lang_tensor is patched  # not wrapped twice
    _another_version(monkeypatch, "TRITON_INTERPRETER_INDEX")
    with pytest.warns(patches.PatchWarning, match="triton==0.0.1"):
        assert not patches.patch_interpreter()


def test_fused_step_on_another_deepspeed_is_refused_when_asked_for(monkeypatch):
    """The version check is the last reason unsupported_reason gives: with a supported optimizer it is the one
    `optim.fused_step=true` names. A plain optimizer is refused for what it is first."""
    from mor_ds.config import ConfigError

    _another_version(monkeypatch, "FUSED_ZERO_STEP")
    plain = torch.optim.AdamW([torch.nn.Parameter(torch.zeros(2))])
    with pytest.raises(ConfigError, match="needs DeepSpeed's ZeRO-1/2 optimizer, not AdamW"):
        patches.apply_fused_step(plain, True, torch.device("cpu"))
    with pytest.warns(patches.PatchWarning, match="DeepSpeed's own optimizer step"):
        assert not patches.apply_fused_step(plain, "auto", torch.device("cuda"))
