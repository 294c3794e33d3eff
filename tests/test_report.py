"""`mor-ds report` on a real tiny sweep: `mor-ds sweep --write-only`, then `mor-ds train` (DeepSpeed, one CPU process)
for a vanilla, an expert-choice MoR and a token-choice MoR arm to the end, a recursive arm killed half-way, and an
arm never started; `mor-ds eval` on two of them. The table's numbers must be what metrics.jsonl / eval.json hold,
every plot must draw every arm (or name it in its note), and the missing and unfinished arms must be named."""

from __future__ import annotations

import json
import os
import re
import statistics
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from mor_ds.cli import main
from mor_ds.config import load_config
from mor_ds.flops import flops_per_token, param_counts
from mor_ds.report import build_report, load_run, load_sweep_runs
from mor_ds.report.markdown import COLUMNS
from mor_ds.report.plots import NOTE_PREFIX
from mor_ds.train.callbacks.metrics import read_metrics
from mor_ds.train.faults import FAULT_ENV

pytestmark = pytest.mark.slow

VOCAB = 512
ARMS = {"tiny-vanilla": "tiny-vanilla", "tiny-mor": "tiny-mor", "tiny-mor-tc": "tiny-mor-tc",
        "tiny-recursive": "tiny-recursive", "tiny-mor-nr3": "tiny-mor-nr3"}
KILLED_AT = 6  # the recursive arm dies while saving this step's checkpoint


def _env(**extra: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if k not in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR",
                                                             "MASTER_PORT", FAULT_ENV) and not k.startswith("SLURM_")}
    env.update(DS_ACCELERATOR="cpu", OMP_NUM_THREADS="1", PYTHONPATH=str(Path(__file__).resolve().parents[1]), **extra)
    return env


def _cli(*args: str, **env: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "mor_ds.cli", *args], env=_env(**env), capture_output=True,
                          text=True, timeout=300)


@pytest.fixture(scope="module")
def sweep_dir(tmp_path_factory) -> Path:
    from data_pipeline.embedded import ensure_embedded

    root = tmp_path_factory.mktemp("sweep")
    cache = root / "cache"
    ensure_embedded(str(cache), vocab_size=VOCAB)
    sweep_file = root / "tiny-report.yaml"
    sweep_file.write_text(yaml.safe_dump({
        "name": "tiny-report", "output_dir": str(root / "out"), "budget": {"flops": 2.0e10, "convention": "exact"},
        "arms": [{"name": name, "config": preset} for name, preset in ARMS.items()],
        "set": {"model.vocab_size": VOCAB, "data.cache_dir": str(cache), "train.seq_len": 64,
                "train.micro_batch_size": 2, "train.global_batch_size": 4, "train.log_interval": 2,
                "train.eval_interval": 4, "train.eval_batches": 2, "checkpoint.interval": 3, "wandb.enabled": False},
        "slurm": {"gpus_per_node": 0, "tasks_per_node": 1, "time": "00:30:00", "signal_seconds": 60}}))
    assert main(["sweep", str(sweep_file), "--write-only"]) == 0
    out = root / "out"
    for arm in ("tiny-vanilla", "tiny-mor", "tiny-mor-tc", "tiny-recursive"):
        faults = {FAULT_ENV: f"kill_in_save@{KILLED_AT}"} if arm == "tiny-recursive" else {}
        proc = _cli("train", "--config", str(out / arm / "config.yaml"), "--run-dir", str(out / arm), **faults)
        assert (proc.returncode == -9) if faults else (proc.returncode == 0), proc.stdout[-2000:] + proc.stderr[-2000:]
    for arm in ("tiny-vanilla", "tiny-mor"):  # no --json: the result goes next to the run
        proc = _cli("eval", "--checkpoint", str(out / arm), "--batches", "8")
        assert proc.returncode == 0, proc.stderr[-2000:]
    return out


@pytest.fixture(scope="module")
def report(sweep_dir):
    name, runs = load_sweep_runs(sweep_dir)
    return build_report(runs, name)


def _rows(report) -> dict[str, dict]:
    return {row["arm"]: row for row in report.rows}


def test_arms_are_grouped_by_the_sweep_budget_and_the_absent_ones_named(report, sweep_dir):
    assert [budget for budget, _ in report.groups] == ["flops=2e+10 (exact)"]
    rows = _rows(report)
    assert list(rows) == ["tiny-vanilla", "tiny-mor", "tiny-mor-tc", "tiny-recursive"]  # sweep order
    plan = json.loads((sweep_dir / "tiny-recursive" / "plan.json").read_text())
    assert rows["tiny-recursive"]["status"] == "unfinished" and rows["tiny-recursive"]["steps"] == KILLED_AT
    assert rows["tiny-recursive"]["planned_steps"] == plan["steps"] > KILLED_AT
    assert {r["status"] for a, r in rows.items() if a != "tiny-recursive"} == {"finished"}
    assert [(m["arm"], m["budget"]) for m in report.missing] == [("tiny-mor-nr3", "flops=2e+10 (exact)")]
    assert "not trained yet" in report.missing[0]["why"]


def test_table_numbers_are_what_the_runs_wrote(report, sweep_dir):
    for arm, row in _rows(report).items():
        records = read_metrics(sweep_dir / arm / "metrics.jsonl")
        last = records[-1]
        cfg = load_config(str(sweep_dir / arm / "config.yaml"))
        assert (row["tokens"], row["steps"], row["train_loss"]) == (last["tokens"], last["step"], last["loss"])
        assert row["wall_s"] == last["elapsed_s"] > 0
        rates = [r["perf/tokens_per_s"] for r in records if "perf/tokens_per_s" in r]
        assert len(rates) > 2 and row["tokens_per_s"] == statistics.median(rates[1:])  # first window: warm-up
        assert row["peak_mem_gib"] == max(r["perf/peak_rss_gib"] for r in records) and row["mfu"] is None  # CPU
        counts = param_counts(cfg)
        assert (row["params_total"], row["params_unique"]) == (counts.total, counts.unique)
        assert row["flops_paper"] == pytest.approx(flops_per_token(cfg, "paper") * last["tokens"], rel=1e-12)
        if cfg.router.type == "token_choice" and cfg.model.family == "mor":
            # each logging window at the depth fractions logged at its end
            expected, previous = 0.0, 0
            for r in records:
                fractions = [r[f"depth_frac/{i}"] for i in range(cfg.model.num_recursions)]
                expected += flops_per_token(cfg, "exact", active_fractions=fractions) * (r["tokens"] - previous)
                previous = r["tokens"]
            assert row["flops_exact"] == pytest.approx(expected, rel=1e-12)
            assert row["flops_exact"] != pytest.approx(last["flops"], rel=1e-3)  # the planner's uniform depths
        else:
            assert row["flops_exact"] == pytest.approx(last["flops"], rel=1e-9)  # the trainer's own count
        evaluated = sweep_dir / arm / "eval.json"
        if evaluated.exists():
            result = json.loads(evaluated.read_text())
            assert result["step"] == last["step"] and result["val/batches"] == 8
            assert (row["val_loss"], row["val_ppl"], row["val_source"]) == (result["val/loss"], result["val/ppl"],
                                                                             "eval.json")
        else:
            final = [r for r in records if "val/loss" in r][-1]
            assert (row["val_loss"], row["val_source"]) == (final["val/loss"], "metrics.jsonl")


def test_markdown_cells_show_those_numbers(report, sweep_dir, tmp_path):
    from mor_ds.report import write_report

    _, runs = load_sweep_runs(sweep_dir)
    write_report(runs, tmp_path, title="tiny-report")
    text = (tmp_path / "report.md").read_text()
    lines = [row for row in text.splitlines() if row.startswith("| tiny-")]
    cells = {row.split(" | ")[0][2:].split(" (")[0]: [c.strip() for c in row.strip("|").split("|")] for row in lines
             if len(row.split("|")) == len(COLUMNS) + 2}
    assert set(cells) == {"tiny-vanilla", "tiny-mor", "tiny-mor-tc", "tiny-recursive"}
    col = {name: i for i, name in enumerate(COLUMNS)}
    for arm, row in _rows(report).items():
        last = read_metrics(sweep_dir / arm / "metrics.jsonl")[-1]
        assert cells[arm][col["train loss"]] == f"{last['loss']:.4f}"
        assert cells[arm][col["steps"]] == str(last["step"])
        assert cells[arm][col["val loss"]].rstrip("*") == f"{row['val_loss']:.4f}"
        assert cells[arm][col["FLOPs exact"]] == f"{row['flops_exact']:.3e}"
    assert cells["tiny-mor"][col["router"]] == "expert-choice" and cells["tiny-mor-tc"][col["router"]] == "token-choice"
    assert cells["tiny-mor"][col["combine"]] == "paper" and cells["tiny-vanilla"][col["combine"]] == "—"
    assert f"tiny-recursive (unfinished: step {KILLED_AT} of" in text
    assert "**missing: tiny-mor-nr3**" in text
    # 8 batches of 2 windows of 64 tokens
    assert "- tiny-vanilla, tiny-mor: validation loss from `mor-ds eval` (eval.json), the same held-out windows in " \
           "each: 1,024 tokens" in text
    assert "- \\* tiny-mor-tc, tiny-recursive: no eval.json" in text
    for name in report.figures:
        assert (tmp_path / name).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and f"]({name})" in text
    saved = json.loads((tmp_path / "report.json").read_text())
    assert [r["arm"] for g in saved["groups"] for r in g["rows"]] == list(_rows(report))


def _drawn(fig) -> set[str]:
    return {line.get_gid() for ax in fig.axes for line in ax.get_lines() if line.get_gid()}


def _noted(fig) -> set[str]:
    names = set()
    for text in fig.texts:
        if text.get_text().startswith(NOTE_PREFIX):
            for part in text.get_text()[len(NOTE_PREFIX) + 2:-1].split("; "):
                names |= {n.strip() for n in part.split(":", 1)[1].split(",")}
    return names


def test_every_plot_draws_every_arm_or_names_it(report):
    present = set(_rows(report))
    routed = {"tiny-mor", "tiny-mor-tc"}
    for name, fig in report.figures.items():
        drawn, noted = _drawn(fig), _noted(fig)
        assert drawn | noted == present and not drawn & noted, name
        if name in ("val_loss_vs_flops.png", "isoflop.png", "train_loss_vs_tokens.png"):
            assert drawn == present, name
        if name in ("depth_fractions.png", "router_weights.png", "aux_losses.png"):
            assert drawn == routed, name
    depth = report.figures["depth_fractions.png"]
    assert [ax.get_title() for ax in depth.axes if ax.get_title()] == ["tiny-mor", "tiny-mor-tc"]
    aux = report.figures["aux_losses.png"]
    assert sorted(ax.get_title() for ax in aux.axes if ax.get_title()) == ["balance", "router_bce", "z_loss"]


def test_depth_fractions_on_held_out_data_are_logged_and_reported(report, sweep_dir):
    rows = _rows(report)
    result = json.loads((sweep_dir / "tiny-mor" / "eval.json").read_text())
    nr = load_config(str(sweep_dir / "tiny-mor" / "config.yaml")).model.num_recursions
    assert rows["tiny-mor"]["depth_held_out"] == [result[f"val/depth_frac/{r}"] for r in range(nr)]
    assert result["val/depth_frac/0"] == 1.0 and 0.0 <= result[f"val/depth_frac/{nr - 1}"] <= 1.0
    assert rows["tiny-mor"]["depth_train"] == rows["tiny-mor"]["depth_target"]  # top-k: exactly the schedule
    assert "val/depth_frac/0" not in json.loads((sweep_dir / "tiny-vanilla" / "eval.json").read_text())
    tc = [r for r in read_metrics(sweep_dir / "tiny-mor-tc" / "metrics.jsonl") if "val/loss" in r]
    assert tc and all(r["val/depth_frac/0"] == 1.0 for r in tc)


def test_run_directories_as_arguments(sweep_dir, tmp_path, capsys):
    code = main(["report", str(sweep_dir / "tiny-vanilla"), str(sweep_dir / "tiny-mor"),
                 str(sweep_dir / "never-made"), "--out", str(tmp_path)])
    out = capsys.readouterr().out
    assert code == 0, out
    assert "tiny-vanilla: finished" in out and "never-made: missing (no config.yaml" in out
    assert re.search(r"\*\*never-made\*\* \(no config.yaml", (tmp_path / "report.md").read_text())


def test_a_config_saved_before_the_combine_rule_existed_reads_as_delta(sweep_dir, tmp_path):
    import shutil

    old = tmp_path / "old-mor"
    shutil.copytree(sweep_dir / "tiny-mor", old, ignore=shutil.ignore_patterns("checkpoints"))
    text = (old / "config.yaml").read_text()
    assert "  combine: paper\n" in text
    (old / "config.yaml").write_text(text.replace("  combine: paper\n", ""))
    (row,) = build_report([load_run(old)], "old").rows
    assert row["combine"] == "delta"  # how the trainer of that time combined (mor_ds.config.from_saved)


def test_bad_input_is_one_line(sweep_dir, tmp_path, capsys):
    broken = tmp_path / "broken"
    broken.mkdir()
    (broken / "config.yaml").write_text((sweep_dir / "tiny-mor" / "config.yaml").read_text())
    good = (sweep_dir / "tiny-mor" / "metrics.jsonl").read_text().splitlines()
    (broken / "metrics.jsonl").write_text("\n".join([good[0], good[1][:20], *good[2:]]) + "\n")
    assert main(["report", str(broken), "--out", str(tmp_path / "r")]) == 2
    err = capsys.readouterr().err
    assert err.startswith(f"mor-ds report: {broken}/metrics.jsonl:2: not a JSON record (") and err.count("\n") == 1
    assert main(["report", "--sweep", str(tmp_path)]) == 2
    assert f"{tmp_path}/sweep.json: not found" in capsys.readouterr().err
    assert main(["report", str(broken), "--sweep", str(sweep_dir)]) == 2
    assert "not both" in capsys.readouterr().err
