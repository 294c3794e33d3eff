"""slurm/repro-study.sh --tiny, run for real on CPU: the reproduction study's whole path (collect this interpreter's
site-packages → SentencePiece → shards → sweep --dry-run / --write-only → train → eval → report) for two tiny arms,
then the same command again, which must find both arms done and train nothing."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from mor_ds.cli import main

pytestmark = pytest.mark.slow

ROOT = Path(__file__).resolve().parents[2]
ARMS = ["tiny-vanilla", "tiny-mor-nr2"]


def run_study(tmp_path: Path, *args: str) -> str:
    env = {k: v for k, v in os.environ.items() if k not in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR",
                                                             "MASTER_PORT") and not k.startswith("SLURM_")}
    env.update(WORKDIR=str(tmp_path), OUT=str(tmp_path / "out"), PYTHON=sys.executable, DEADLINE_S="1200")
    proc = subprocess.run(["bash", str(ROOT / "slurm" / "repro-study.sh"), "--tiny", *args], env=env, cwd=tmp_path,
                          capture_output=True, text=True, timeout=900)
    assert proc.returncode == 0, (proc.stdout + proc.stderr)[-4000:]
    return proc.stdout


def test_tiny_study_end_to_end_and_resumable(tmp_path, capsys):
    log = run_study(tmp_path, "train", *ARMS)
    out = tmp_path / "out"
    sweep_dir = tmp_path / "runs" / "study-tiny" / "repro-tiny"  # the sweep file's output_dir, under WORKDIR
    manifest = json.loads((out / "runs" / "sweep.json").read_text())
    planned = {a["name"]: a["steps"] for a in manifest["arms"]}
    assert len(planned) == 5
    for arm in ARMS:
        assert f"{arm}: trained: step {planned[arm]}/{planned[arm]}" in log
        result = json.loads((out / "runs" / arm / "eval.json").read_text())
        assert result["step"] == planned[arm] and result["val/batches"] > 0
        assert (out / "runs" / arm / "metrics.jsonl").read_text() == (sweep_dir / arm / "metrics.jsonl").read_text()
    stats = json.loads((out / "corpus-stats.json").read_text())
    assert stats["files"] > 10 and 0 < stats["bytes"] <= 6e6 and ".py" in stats["by_extension"]
    assert "repro-tiny: 5 arms" in (out / "sweep-dry-run.txt").read_text()
    text = (out / "report" / "report.md").read_text()
    for arm in ("tiny-recursive-nr2", "tiny-mor-nr3", "tiny-mor-nr3-tc"):
        assert f"**missing: {arm}**" in text
    assert all((out / "report" / name).stat().st_size > 0 for name in ("val_loss_vs_flops.png", "depth_fractions.png"))

    # what comes back from the device is a sweep directory of its own
    assert main(["report", "--sweep", str(out / "runs"), "--out", str(tmp_path / "again")]) == 0
    assert "tiny-mor-nr2: finished" in capsys.readouterr().out

    before = {arm: (sweep_dir / arm / "metrics.jsonl").read_text() for arm in ARMS}
    log = run_study(tmp_path, "train", *ARMS)
    assert all(f"{arm}: already trained and evaluated" in log for arm in ARMS)
    assert {arm: (sweep_dir / arm / "metrics.jsonl").read_text() for arm in ARMS} == before
    assert "installing" not in log and "collecting" not in log and "tokenizing" not in log
