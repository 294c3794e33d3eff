"""Fixtures the integration modules share. Each module sets VOCAB (the tokenizer its jobs train with) and, for
Slurm, NODES (how many nodes its cluster has; default 1)."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).parent))
from slurm_cluster import ClusterUnavailable, ensure_cluster, stop_cluster


@pytest.fixture(scope="module")
def cache(request, tmp_path_factory) -> Path:
    """The embedded corpus with the module's VOCAB-piece tokenizer, built once, before any run or job reads it."""
    from data_pipeline.embedded import ensure_embedded

    root = tmp_path_factory.mktemp("mor-ds-cache")
    ensure_embedded(str(root), vocab_size=request.module.VOCAB)
    return root


@pytest.fixture(scope="module")
def cluster(request):
    """The test Slurm cluster of the module's NODES nodes, started (or reused) once; stopped after the module if
    this fixture started it; SLURM_CONF as it was before."""
    nodes = getattr(request.module, "NODES", 1)
    previous_conf = os.environ.get("SLURM_CONF")
    try:
        cluster = ensure_cluster(nodes=nodes)
    except ClusterUnavailable as exc:
        pytest.skip(f"no {'multi-node ' if nodes > 1 else ''}Slurm here: {exc}")
    yield cluster
    if cluster.started:  # leave a cluster we found running as it was
        stop_cluster(nodes)
    if previous_conf is None:  # later tests must not talk to a stopped controller (scontrol retries for ~10 s)
        os.environ.pop("SLURM_CONF", None)
    else:
        os.environ["SLURM_CONF"] = previous_conf


@pytest.fixture
def jobs():
    """Job ids to cancel when the test ends, so a failed test leaves nothing running (no-op for finished jobs)."""
    ids: list[str] = []
    yield ids
    if ids:
        subprocess.run(["scancel", *ids], capture_output=True)
