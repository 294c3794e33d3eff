"""mor-ds sweep without Slurm: grid expansion, budget matching through the planner, script rendering, bad input.
Submission to a real Slurm is in tests/integration/test_slurm.py."""

from __future__ import annotations

import json
import re
import subprocess
from pathlib import Path

import pytest
import yaml

from mor_ds.cli import main
from mor_ds.config import load_config
from mor_ds.flops import flops_per_token
from mor_ds.models.sharing import paper_num_layers
from mor_ds.sweep import (SlurmSpec, SubmitState, SweepError, load_sweep, render_eval, render_script, render_train,
                          status, submit, time_limit_seconds)

REPO = Path(__file__).resolve().parent.parent
SWEEPS = REPO / "slurm" / "sweeps"


CPU_SLURM = {"gpus_per_node": 0, "tasks_per_node": 1, "time": "01:00:00"}


def write_sweep(tmp_path: Path, **data) -> Path:
    data["slurm"] = {**CPU_SLURM, **data.get("slurm", {})}
    path = tmp_path / "sweep.yaml"
    path.write_text(yaml.safe_dump(data, sort_keys=False))
    return path


TINY_GRID = {"family": ["vanilla", "recursive", "mor"], "size": ["tiny"], "num_recursions": [2, 3]}


# ---------------------------------------------------------------------------------------------
# grid expansion


def test_paper_sweep_expands_to_vanilla_recursive_mor_at_each_nr():
    sweep = load_sweep(SWEEPS / "isoflop-360m.yaml")
    names = [a.name for a in sweep.arms]
    stems = ["vanilla-360m"] + [f"{f}-360m-nr{nr}" for f in ("recursive", "mor") for nr in (2, 3, 4)]
    assert names == [f"{s}-f{b}" for s in stems for b in ("2e18", "5e18", "1.65e19")]
    arm = next(a for a in sweep.arms if a.name == "mor-360m-nr4-f1.65e19")
    m = arm.cfg.model
    assert (m.family, m.num_recursions, m.sharing, m.kv_mode, m.num_layers) == ("mor", 4, "middle_cycle", "cache", 34)
    assert arm.cfg.router.type == "expert_choice"
    assert arm.cfg.wandb.group == "isoflop-360m" and arm.cfg.wandb.name == arm.name == arm.cfg.name


@pytest.mark.parametrize("size", ["135m", "360m", "730m", "1.7b"])
def test_every_shipped_paper_sweep_loads(size):
    sweep = load_sweep(SWEEPS / f"isoflop-{size}.yaml")
    assert {a.cfg.model.family for a in sweep.arms} == {"vanilla", "recursive", "mor"}
    assert not sweep.skipped


def test_axes_that_do_not_apply_collapse_and_forbidden_combinations_are_listed(tmp_path):
    path = write_sweep(tmp_path, budget={"tokens": 1e6},
                       grid={"family": ["vanilla", "recursive", "mor"], "size": ["tiny"], "num_recursions": [2],
                             "sharing": ["cycle", "sequence"], "router": ["expert_choice", "token_choice"],
                             "kv_mode": ["cache"]})
    sweep = load_sweep(path)
    # vanilla once; recursive has no router axis (2 sharings); MoR only with cycle sharing (2 routers)
    assert [a.name for a in sweep.arms] == ["tiny-vanilla", "tiny-recursive-nr2-cycle", "tiny-recursive-nr2-sequence",
                                            "tiny-mor-nr2-cycle", "tiny-mor-nr2-tc-cycle"]
    assert [name for name, _ in sweep.skipped] == ["tiny-mor-nr2-sequence", "tiny-mor-nr2-tc-sequence"]
    assert all("cycle or middle_cycle" in why for _, why in sweep.skipped)
    cycle = next(a for a in sweep.arms if a.name == "tiny-recursive-nr2-cycle").cfg.model
    assert (cycle.sharing, cycle.num_layers) == ("cycle", paper_num_layers(6, 2, "cycle"))
    tc = next(a for a in sweep.arms if a.name == "tiny-mor-nr2-tc-cycle").cfg.router
    assert (tc.type, tc.activation) == ("token_choice", "softmax")


def test_explicit_arms_and_common_overrides(tmp_path):
    (tmp_path / "mine.yaml").write_text("preset: tiny-mor\nmodel: {hidden_size: 64, num_heads: 2, num_kv_heads: 1}\n")
    path = write_sweep(tmp_path, name="mix", budget={"tokens": 4096},
                       arms=[{"name": "custom", "config": "mine.yaml", "set": {"router.arch": "mlp"},
                              "slurm": {"nodes": 2}},
                             {"config": "tiny-vanilla"}],
                       set={"train.seq_len": 64, "train": {"micro_batch_size": 2}, "train.global_batch_size": 32})
    sweep = load_sweep(path)
    custom, vanilla = sweep.arms
    assert (custom.name, vanilla.name) == ("custom", "tiny-vanilla")
    assert (custom.cfg.model.hidden_size, custom.cfg.router.arch) == (64, "mlp")
    assert all((a.cfg.train.seq_len, a.cfg.train.micro_batch_size) == (64, 2) for a in sweep.arms)
    assert (custom.slurm.nodes, vanilla.slurm.nodes) == (2, 1)
    assert custom.plan.steps == vanilla.plan.steps == 2  # 4096 tokens / (32 x 64)


# ---------------------------------------------------------------------------------------------
# budget matching


def test_every_arm_gets_the_same_flops_within_one_step():
    budget = 16.5e18
    sweep = load_sweep(SWEEPS / "isoflop-360m.yaml")
    for arm in (a for a in sweep.arms if a.name.endswith("f1.65e19")):
        cfg = arm.cfg
        per_step = flops_per_token(cfg, "paper") * cfg.train.global_batch_size * cfg.train.seq_len
        assert arm.plan.steps == round(budget / per_step)
        assert abs(arm.plan.flops - budget) <= per_step / 2
        # the trainer runs exactly the planned steps, whatever the preset's own budget said
        assert (cfg.train.max_steps, cfg.train.max_tokens, cfg.train.max_flops) == (arm.plan.steps, 0, 0.0)
    steps = {a.name: a.plan.steps for a in sweep.arms}
    # equal FLOPs: MoR-2 (fewer active tokens per recursion) trains on more tokens than vanilla (paper: 27B vs 20B)
    assert steps["mor-360m-nr2-f1.65e19"] > steps["vanilla-360m-f1.65e19"]


def test_token_budget_gives_equal_tokens_and_different_flops():
    sweep = load_sweep(SWEEPS / "tokens-360m.yaml")
    assert len({a.plan.tokens for a in sweep.arms}) == 1
    flops = {a.name: a.plan.flops for a in sweep.arms}
    assert flops["mor-360m-nr2"] < flops["vanilla-360m"]


def test_resolved_config_round_trips(tmp_path):
    sweep = load_sweep(SWEEPS / "tiny.yaml")
    arm = sweep.arms[1]
    (tmp_path / "c.yaml").write_text(arm.cfg.to_yaml())
    assert load_config(str(tmp_path / "c.yaml")) == arm.cfg


# ---------------------------------------------------------------------------------------------
# rendering


def _sbatch_lines(script: str) -> list[str]:
    return [line for line in script.splitlines() if line.startswith("#SBATCH")]


def test_rendered_train_script(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    path = write_sweep(tmp_path, name="r", budget={"flops": 1.3e10},
                       grid={"family": ["mor"], "size": ["tiny"]},
                       set={"train.seq_len": 64, "train.micro_batch_size": 2, "train.global_batch_size": 8},
                       slurm={"nodes": 2, "gpus_per_node": 2, "tasks_per_node": 0, "cpus_per_task": 4,
                              "time": "1-00:00:00",
                              "partition": "gpu", "account": "proj", "signal_seconds": 300,
                              "sbatch_args": ["--exclusive"], "env": {"NCCL_SOCKET_IFNAME": "ib0"},
                              "command": "/opt/venv/bin/mor-ds"})
    sweep = load_sweep(path)
    (arm,) = sweep.arms
    script = render_train(sweep, arm)
    arm_dir = tmp_path / "runs" / "sweeps" / "r" / "tiny-mor-nr2"
    assert _sbatch_lines(script) == [
        "#SBATCH --job-name=r.tiny-mor-nr2", "#SBATCH --nodes=2", "#SBATCH --ntasks-per-node=2",
        "#SBATCH --gpus-per-node=2", "#SBATCH --cpus-per-task=4", "#SBATCH --time=1-00:00:00",
        "#SBATCH --signal=B:USR1@300", "#SBATCH --requeue", "#SBATCH --open-mode=append",
        "#SBATCH --partition=gpu", "#SBATCH --account=proj", f"#SBATCH --output={arm_dir}/slurm-%j.out",
        "#SBATCH --exclusive"]
    assert f"\nMOR_DS_CONFIG={arm_dir}/config.yaml\n" in script
    assert f"\nMOR_DS_RUN_DIR={arm_dir}\n" in script
    assert "\nMOR_DS_CMD=/opt/venv/bin/mor-ds\n" in script
    assert "\nMOR_DS_REQUEUE=${MOR_DS_REQUEUE:-1}\n" in script  # untouched knobs stay overridable
    assert "\nexport NCCL_SOCKET_IFNAME=ib0\n" in script
    # the body is the template's, and the result is valid bash
    template = (REPO / "slurm" / "train.sbatch").read_text()
    assert script.endswith(template[template.index("# ---- no edits needed below ----"):])
    subprocess.run(["bash", "-n"], input=script, text=True, check=True)


def test_rendered_script_refuses_to_run_outside_slurm(tmp_path):
    sweep = load_sweep(SWEEPS / "tiny.yaml")
    script = tmp_path / "job.sbatch"
    script.write_text(render_train(sweep, sweep.arms[0]))
    env = {"PATH": "/usr/bin:/bin"}
    proc = subprocess.run(["bash", str(script)], capture_output=True, text=True, env=env)
    assert proc.returncode == 2 and "run me with sbatch" in proc.stderr


def test_rendered_eval_script_carries_its_arguments(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    path = write_sweep(tmp_path, name="e", budget={"tokens": 4096}, grid={"family": ["vanilla"], "size": ["tiny"]},
                       slurm={"gpus_per_node": 4}, eval={"args": ["--tasks", "paper", "--limit", "100"]})
    sweep = load_sweep(path)
    script = render_eval(sweep, sweep.arms[0])
    assert "#SBATCH --gpus-per-node=1" in _sbatch_lines(script)
    assert "#SBATCH --ntasks-per-node=1" in _sbatch_lines(script)
    assert "\nMOR_DS_EVAL_ARGS='--tasks paper --limit 100'\n" in script
    subprocess.run(["bash", "-n"], input=script, text=True, check=True)


def test_render_script_needs_the_configuration_section():
    with pytest.raises(SweepError, match="configuration"):
        render_script("#!/bin/bash\n#SBATCH --nodes=1\necho hi\n", ["--nodes=2"], {}, {})
    template = "#!/bin/bash\n#SBATCH --nodes=1\n# ---- configuration\nA=${A:-1}\n# ---- no edits needed below ----\n"
    with pytest.raises(SweepError, match="no configuration line for B"):
        render_script(template, ["--nodes=2"], {"B": "x"}, {})
    out = render_script(template, ["--nodes=2", "--time=5"], {"A": "two words"}, {})
    assert out == ("#!/bin/bash\n#SBATCH --nodes=2\n#SBATCH --time=5\n# ---- configuration\nA='two words'\n"
                   "# ---- no edits needed below ----\n")


@pytest.mark.parametrize("text,seconds", [("30", 1800), ("05:30", 330), ("02:00:00", 7200), ("1-00:00:00", 86400),
                                          ("2-12", 216000)])
def test_time_limit_formats(text, seconds):
    assert time_limit_seconds(text) == seconds


# ---------------------------------------------------------------------------------------------
# dry run through the CLI


def test_dry_run_prints_table_and_scripts_and_writes_nothing(tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    assert main(["sweep", str(SWEEPS / "tiny.yaml"), "--dry-run"]) == 0
    out = capsys.readouterr().out
    header = next(line for line in out.splitlines() if line.startswith("arm "))
    assert re.split(r"\s{2,}", header.strip()) == ["arm", "params", "non-emb", "steps", "tokens", "FLOPs",
                                                   "nodes x gpus", "est. h"]
    assert re.search(r"^tiny-vanilla\s+1.63M\s+1.11M\s+20\s", out, re.M)
    assert out.count("#!/bin/bash") == 2 and "--job-name=tiny.tiny-mor-nr2" in out
    assert not (tmp_path / "runs").exists()


def test_dry_run_json_gives_each_arm_its_source_overrides_budget_and_resources(tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    assert main(["sweep", str(SWEEPS / "tiny.yaml"), "--dry-run", "--json"]) == 0
    out = json.loads(capsys.readouterr().out)
    sweep = load_sweep(SWEEPS / "tiny.yaml")
    assert (out["sweep"], out["budget"], out["skipped"]) == ("tiny", "flops", [])
    assert [a["name"] for a in out["arms"]] == ["tiny-vanilla", "tiny-mor-nr2"]
    for row, arm in zip(out["arms"], sweep.arms):
        assert (row["source"], row["steps"], row["tokens"], row["flops"]) == (
            arm.name, arm.plan.steps, arm.plan.tokens, arm.plan.flops)
        assert (row["nodes"], row["gpus_per_node"], row["world_size"], row["estimated_hours"]) == (1, 0, 1, None)
        assert row["run_dir"] == str(tmp_path / "runs" / "sweeps" / "tiny" / arm.name)
        # the overrides turn the source preset into the arm's config
        assert row["overrides"]["train.max_steps"] == arm.plan.steps and row["overrides"]["train.seq_len"] == 64
        assert row["overrides"]["wandb.group"] == "tiny" and "model.hidden_size" not in row["overrides"]
        rebuilt = load_config(row["source"], [f"{k}={json.dumps(v)}" for k, v in row["overrides"].items()])
        assert rebuilt == arm.cfg
    assert row["steps"] == 24 and out["arms"][0]["steps"] == 20
    assert not (tmp_path / "runs").exists()
    assert main(["sweep", str(SWEEPS / "tiny.yaml"), "--json"]) == 2
    assert capsys.readouterr().err == ("mor-ds sweep: --json needs --dry-run (it prints the arms instead of submitting "
                                       "them)\n")


def test_arm_and_eval_resources_change_the_sweeps_key_by_key(tmp_path):
    path = write_sweep(tmp_path, budget={"tokens": 4096},
                       arms=[{"config": "tiny-vanilla", "slurm": {"env": {"B": 2}, "time": "02:00:00"}}],
                       slurm={"env": {"A": "1"}, "sbatch_args": ["--exclusive"]}, eval={"args": ["--limit", 100]})
    sweep = load_sweep(path)
    (arm,) = sweep.arms
    assert (arm.slurm.env, arm.slurm.time, arm.slurm.sbatch_args) == ({"A": "1", "B": "2"}, "02:00:00", ["--exclusive"])
    assert sweep.eval_args == ["--limit", "100"]
    ev = sweep.eval_slurm
    assert (ev.nodes, ev.tasks_per_node, ev.gpus_per_node, ev.time, ev.env) == (1, 1, 0, "04:00:00", {"A": "1"})


def test_write_only_writes_every_arm_and_the_manifest_and_submits_nothing(tmp_path, monkeypatch, capsys):
    monkeypatch.setenv("PATH", str(tmp_path))  # no sbatch anywhere: --write-only never needs it
    path = write_sweep(tmp_path, name="w", output_dir=str(tmp_path / "out"), budget={"flops": [1e10, 2e10]},
                       grid={"family": ["vanilla", "mor"], "size": ["tiny"]})
    assert main(["sweep", str(path), "--write-only"]) == 0
    assert "4 arms written, nothing submitted" in capsys.readouterr().out
    sweep = load_sweep(path)
    manifest = json.loads((tmp_path / "out" / "sweep.json").read_text())
    assert (manifest["sweep"], manifest["budget_kind"]) == ("w", "flops")
    assert [(a["name"], a["budget"], a["steps"]) for a in manifest["arms"]] == [
        (arm.name, arm.plan.budget, arm.plan.steps) for arm in sweep.arms]
    for arm in sweep.arms:
        arm_dir = tmp_path / "out" / arm.name
        assert load_config(str(arm_dir / "config.yaml")) == arm.cfg  # what `mor-ds train --config` gets
        assert json.loads((arm_dir / "plan.json").read_text()) == arm.plan.to_dict()
        assert (arm_dir / "train.sbatch").read_text() == render_train(sweep, arm)
    assert not (tmp_path / "out" / "sweep-state.json").exists()
    with pytest.raises(SystemExit):
        main(["sweep", str(path), "--write-only", "--dry-run"])


def test_the_reproduction_sweeps_match_arm_for_arm():
    """repro-135m.yaml: one budget of 1e17 exact FLOPs (every arm within one step of it) at several hundred steps;
    repro-tiny.yaml, the CPU rehearsal of the same driver, has the same arms with the tiny presets."""
    study, tiny = load_sweep(SWEEPS / "repro-135m.yaml"), load_sweep(SWEEPS / "repro-tiny.yaml")
    assert [a.name for a in study.arms] == ["vanilla-135m", "recursive-135m-nr2", "mor-135m-nr2", "mor-135m-nr3",
                                            "mor-135m-nr3-tc"]
    assert [a.name.replace("-135m", "") for a in study.arms] == [a.name.replace("tiny-", "") for a in tiny.arms]
    for sweep in (study, tiny):
        assert {a.plan.convention for a in sweep.arms} == {"exact"}
        assert len({a.cfg.data.prepared_dir for a in sweep.arms}) == 1
        assert len({(a.cfg.train.seq_len, a.cfg.train.global_batch_size, a.cfg.train.seed, a.cfg.data.val_shards)
                    for a in sweep.arms}) == 1  # the same data order and held-out windows for every arm
        assert all(a.cfg.optim.schedule == "wsd" and not a.cfg.wandb.enabled for a in sweep.arms)
    for arm in study.arms:
        assert abs(arm.plan.flops - 1e17) <= arm.plan.flops_per_token * arm.plan.tokens_per_step / 2
        assert 300 <= arm.plan.steps <= 600
    assert [(a.cfg.model.family, a.cfg.model.num_recursions, a.cfg.router.type) for a in study.arms] == [
        (a.cfg.model.family, a.cfg.model.num_recursions, a.cfg.router.type) for a in tiny.arms]


# ---------------------------------------------------------------------------------------------
# bad input: one line naming the file, key or arm


@pytest.mark.parametrize("data,message", [
    ({"grid": TINY_GRID}, "budget: missing"),
    ({"budget": {"flops": 1e12, "tokens": 1e6}, "grid": TINY_GRID}, "exactly one of flops or tokens"),
    ({"budget": {"flops": "lots"}, "grid": TINY_GRID}, "budget.flops='lots': not a number"),
    ({"budget": {"flops": 1e12}, "grid": {**TINY_GRID, "depth": [2]}}, "grid.depth: unknown axis"),
    ({"budget": {"flops": 1e12}, "grid": {**TINY_GRID, "family": ["moe"]}}, "grid.family: unknown value 'moe'"),
    ({"budget": {"flops": 1e12}, "grid": {**TINY_GRID, "size": ["7b"]}}, "grid.size: unknown value '7b'"),
    ({"budget": {"flops": 1e12}, "grid": {"family": ["mor"]}}, "grid needs a size axis"),
    ({"budget": {"flops": 1e12}, "arms": [{"config": "mor-999m-nr2"}]}, "arms[0]: preset 'mor-999m-nr2': unknown"),
    ({"budget": {"flops": 1e12}, "arms": [{"config": "tiny-mor", "colour": 1}]}, "arms[0].colour: unknown key"),
    ({"budget": {"flops": 1e12}, "arms": [{"config": "tiny-mor"}, {"config": "tiny-mor"}]},
     "arm name 'tiny-mor' appears twice"),
    ({"budget": {"flops": 1e3}, "grid": TINY_GRID},
     "arm tiny-vanilla: FLOPs budget 1000: less than one optimizer step"),
    ({"budget": {"flops": 1e12}, "grid": TINY_GRID, "set": {"train.micro_batch_size": 3}},
     "arm tiny-vanilla: train.global_batch_size=16: must be a multiple of train.micro_batch_size=3"),
    ({"budget": {"flops": 1e12}, "grid": TINY_GRID, "slurm": {"gpus_per_node": 3, "tasks_per_node": 0}},
     "is not a multiple of train.micro_batch_size=8 x 3 processes"),
    ({"budget": {"flops": 1e12}, "grid": TINY_GRID, "slurm": {"time": "00:05:00"}},
     "slurm.signal_seconds=600 is not below slurm.time=00:05:00"),
    ({"budget": {"flops": 1e12}, "grid": TINY_GRID, "slurm": {"gpus": 4}}, "slurm.gpus: unknown key"),
    ({"budget": {"flops": 1e12}, "grid": TINY_GRID, "slurm": {"time": "soon"}}, "slurm.time='soon'"),
    ({"budget": {"flops": 1e12}, "grid": TINY_GRID, "priority": 1}, "priority: unknown key"),
    ({"budget": {"flops": 1e12}}, "no arms"),
    ({"budget": {"flops": 1e12}, "grid": {**TINY_GRID, "router": ["expert"]}},
     "grid.router: unknown value 'expert' (one of expert_choice, token_choice)"),
    ({"budget": {"flops": 1e12}, "grid": TINY_GRID, "slurm": {"env": ["A=1"]}}, "slurm.env: expected a mapping"),
    ({"budget": {"flops": 1e12}, "grid": TINY_GRID, "slurm": {"nodes": "two"}}, "slurm.nodes: 'two' is not an int"),
    ({"budget": {"flops": 1e12}, "arms": [{"name": "x"}]}, "arms[0].config: missing"),
    ({"budget": {"flops": 1e12}, "arms": [{"config": "tiny-mor", "slurm": {"gpu": 1}}]},
     "arms[0].slurm.gpu: unknown key"),
    ({"budget": {"flops": 1e12}, "grid": TINY_GRID, "eval": {"args": ["--tasks paper"]}},
     "eval.args: one word per list item"),
])
def test_bad_sweep_files(tmp_path, data, message):
    with pytest.raises(SweepError) as info:
        load_sweep(write_sweep(tmp_path, **data))
    assert message in str(info.value)
    assert "\n" not in str(info.value)


def test_bad_input_through_the_cli_is_one_line(tmp_path, capsys):
    assert main(["sweep", str(tmp_path / "missing.yaml")]) == 2
    assert capsys.readouterr().err == f"mor-ds sweep: sweep file {tmp_path / 'missing.yaml'}: not found\n"
    (tmp_path / "bad.yaml").write_text("budget: [unclosed\n")
    assert main(["sweep", str(tmp_path / "bad.yaml")]) == 2
    err = capsys.readouterr().err
    assert err.startswith(f"mor-ds sweep: sweep file {tmp_path / 'bad.yaml'}: invalid YAML") and err.count("\n") == 1


def test_missing_sbatch_is_reported_before_anything_is_written(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("PATH", str(tmp_path))  # no Slurm client here
    sweep = load_sweep(SWEEPS / "tiny.yaml")
    with pytest.raises(SweepError, match="^sbatch not found on PATH"):
        submit(sweep)
    assert not (tmp_path / "runs").exists()


def test_unreadable_state_file_is_named(tmp_path):
    (tmp_path / "sweep-state.json").write_text("{not json")
    with pytest.raises(SweepError, match="sweep-state.json: unreadable sweep state"):
        SubmitState.load(tmp_path / "sweep-state.json")


def test_slurm_spec_task_count():
    assert SlurmSpec(nodes=2, gpus_per_node=4).world_size == 8
    assert SlurmSpec(nodes=1, gpus_per_node=0, tasks_per_node=2).world_size == 2
    assert SlurmSpec(nodes=1, gpus_per_node=0).world_size == 1


def test_status_lists_jobs_states_steps_losses_and_eta(tmp_path, monkeypatch, capsys):
    """Without Slurm's commands the state is unknown; the rest comes from the state file and the arm's metrics.
    Against a real Slurm: tests/integration/test_slurm.py."""
    import json

    path = write_sweep(tmp_path, name="st", budget={"tokens": 4096 * 10}, output_dir=str(tmp_path / "out"),
                       grid={"family": ["vanilla", "mor"], "size": ["tiny"]})
    sweep = load_sweep(path)
    vanilla, mor = sweep.arms
    state = SubmitState(sweep.output_dir / "sweep-state.json", {vanilla.name: {"job_id": "41", "eval_job_id": None}})
    sweep.output_dir.mkdir()
    state.save(sweep.name)
    run = sweep.arm_dir(vanilla)
    run.mkdir()
    records = [{"step": 2, "loss": 7.5, "perf/tokens_per_s": 1000.0}, {"step": 4, "loss": 6.25, "val/loss": 6.5,
                                                                        "perf/tokens_per_s": 2048.0}]
    (run / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in records))
    monkeypatch.setenv("PATH", str(tmp_path))  # no scontrol, no sacct
    rows = {r["arm"]: r for r in status(sweep)}
    assert rows[vanilla.name] == {"arm": vanilla.name, "job_id": "41", "state": "unknown", "eval_job_id": None,
                                  "eval_state": None, "step": 4, "steps": 10, "loss": 6.25, "val_loss": 6.5,
                                  "tokens_per_s": 2048.0, "eta_s": 6 * 4096 / 2048.0}
    assert rows[mor.name]["state"] == "not submitted" and rows[mor.name]["step"] == 0
    assert main(["sweep", "status", str(path)]) == 0
    lines = capsys.readouterr().out.splitlines()
    assert lines[1].split() == ["arm", "job", "state", "step", "loss", "val", "loss", "tokens/s", "ETA", "eval", "job"]
    assert lines[3].split() == [vanilla.name, "41", "unknown", "4/10", "6.2500", "6.5000", "2.05k", "00:00:12", "-"]
    assert lines[4].split() == [mor.name, "-", "not", "submitted", "0/10", "-", "-", "-", "-", "-"]
    assert main(["sweep", "stats", str(path)]) == 2
