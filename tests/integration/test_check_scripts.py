"""slurm/scaling-check.sh and slurm/resume-check.sh, run for real: torchrun with 1 and 2 gloo processes training the
tiny MoR in fp32 on CPU, where data-parallel training is exact, so the scripts' comparisons must come out equal."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

pytestmark = pytest.mark.slow

ROOT = Path(__file__).resolve().parents[2]
VOCAB = 512
TINY = ["--set", f"model.vocab_size={VOCAB}", "--set", "train.precision=fp32"]


@pytest.fixture(scope="module")
def check_env(tmp_path_factory) -> dict[str, str]:
    from data_pipeline.embedded import ensure_embedded

    shards, tokenizer = ensure_embedded(str(tmp_path_factory.mktemp("cache")), vocab_size=VOCAB)
    env = {k: v for k, v in os.environ.items() if k not in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR",
                                                             "MASTER_PORT") and not k.startswith("SLURM_")}
    # the scripts call `torchrun` and `python3`: the ones of this interpreter's environment, as an activated venv gives
    env.update(PATH=f"{Path(sys.executable).parent}{os.pathsep}{env['PATH']}", DATA=shards, TOKENIZER=tokenizer,
               GPUS="2", MB="2", SEQ="64", OMP_NUM_THREADS="1", DS_ACCELERATOR="cpu", RUN_TIMEOUT="240")
    return env


def run_script(name: str, args: list[str], env: dict[str, str]) -> None:
    proc = subprocess.run(["bash", str(ROOT / "slurm" / name), *args], env=env, cwd=ROOT, capture_output=True,
                          text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]


def test_scaling_check_one_vs_two_processes(check_env, tmp_path):
    env = {**check_env, "OUT": str(tmp_path), "STEPS": "4", "EVAL_WINDOWS": "8"}
    run_script("scaling-check.sh", [" ".join(["tiny-mor", "2", *TINY])], env)
    one, two = [json.loads(line) for line in (tmp_path / "scaling.jsonl").read_text().splitlines()]
    assert (one["gpus"], two["gpus"], one["rc"], two["rc"], one["steps"], two["steps"]) == (1, 2, 0, 0, 4, 4)
    assert two["losses"] == pytest.approx(one["losses"], abs=2e-4)  # rounded to 4 decimals by the script
    assert two["val_loss"] == pytest.approx(one["val_loss"], rel=1e-5)  # the same 8 held-out windows
    assert two["tokens_per_s_per_gpu"] > 0 and one["losses"][-1] < one["losses"][0]


def test_resume_check_round_trip_with_zero3(check_env, tmp_path):
    env = {**check_env, "OUT": str(tmp_path), "STEPS": "6", "EVAL_BATCHES": "2"}
    run_script("resume-check.sh", ["tiny-mor", "3", *TINY], env)
    (result,) = [json.loads(line) for line in (tmp_path / "resume.jsonl").read_text().splitlines()]
    assert result["rc"] == {"A": 0, "B": 0, "export": 0, "eval": 0}
    assert (result["resume_from"], result["first_step_of_B"], result["steps_compared"]) == (3, 4, 3)
    assert result["max_abs_loss_diff"] == 0.0
    assert result["val_loss_export"] == pytest.approx(result["val_loss_A"], rel=1e-6)
