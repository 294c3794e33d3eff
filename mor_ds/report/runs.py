"""Runs as `mor-ds report` sees them: what a run directory holds, and the numbers of one table row.

A run directory (written by `mor-ds train`, see mor_ds.train.run) holds config.yaml and metrics.jsonl; a sweep arm
also plan.json (`mor-ds sweep`), and `mor-ds eval` adds eval.json (validation loss on the held-out windows) and
fewshot.json (lm-eval accuracies). A sweep's output directory holds sweep.json: the arms it expects, with their
budgets, so arms that never started are named too.

Every number of a row comes from those files: the logged steps, tokens, losses, throughput, MFU and memory as they
are; parameter counts and FLOPs from the run's config through mor_ds.flops (the functions the trainer and the
planner use), accumulated over the logged tokens.
"""

from __future__ import annotations

import json
import math
import statistics
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from mor_ds.config import Config, ConfigError, from_saved, yaml_load
from mor_ds.flops import flops_per_token, param_counts, plan_budget, step_fractions

CONFIG_FILE = "config.yaml"
METRICS_FILE = "metrics.jsonl"
PLAN_FILE = "plan.json"
EVAL_FILE = "eval.json"
FEWSHOT_FILE = "fewshot.json"
MANIFEST_FILE = "sweep.json"


class ReportError(ValueError):
    """A run or sweep directory that cannot be read; the one-line message names the file."""


@dataclass
class Run:
    name: str
    dir: Path
    budget: str = ""  # the group this run is compared in, e.g. "flops=1e+17 (exact)"
    cfg: Config | None = None
    records: list[dict[str, Any]] = field(default_factory=list)
    planned_steps: int | None = None
    eval: dict[str, Any] | None = None
    fewshot: dict[str, Any] | None = None
    missing: str = ""  # why there is nothing to report ("" when the run logged at least one step)

    @property
    def last(self) -> dict[str, Any]:
        return self.records[-1]

    @property
    def steps(self) -> int:
        return int(self.last["step"]) if self.records else 0

    @property
    def status(self) -> str:
        if self.missing:
            return "missing"
        if self.planned_steps is not None and self.steps < self.planned_steps:
            return "unfinished"
        return "finished"

    @property
    def routed(self) -> bool:
        return self.cfg is not None and self.cfg.model.family == "mor"

    def series(self, key: str, x: str = "tokens") -> tuple[list[float], list[float]]:
        """(x, value) of every logged record that holds `key`."""
        pairs = [(r[x], r[key]) for r in self.records if r.get(key) is not None and r.get(x) is not None]
        return [p[0] for p in pairs], [p[1] for p in pairs]


def _read_json(path: Path) -> Any:
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError) as exc:
        raise ReportError(f"{path}: unreadable JSON ({exc})") from None


def _read_metrics(path: Path) -> list[dict[str, Any]]:
    records = []
    with open(path) as f:
        for number, line in enumerate(f, 1):
            if not line.strip():
                continue
            try:
                record = json.loads(line)
            except ValueError as exc:
                raise ReportError(f"{path}:{number}: not a JSON record ({exc})") from None
            if not isinstance(record, dict) or "step" not in record:
                raise ReportError(f"{path}:{number}: not a metrics record (no 'step')")
            records.append(record)
    return records


def budget_label(budget: str, convention: str) -> str:
    return f"{budget} ({convention})" if budget.startswith("flops") else budget


def load_run(run_dir: str | Path, name: str | None = None, budget: str | None = None) -> Run:
    """A run directory; a directory without config.yaml or without logged steps is a Run with `missing` set."""
    run_dir = Path(run_dir)
    run = Run(name=name or run_dir.name, dir=run_dir, budget=budget or "")
    config_path = run_dir / CONFIG_FILE
    if not config_path.is_file():
        run.missing = f"no {CONFIG_FILE} in {run_dir}: not written or never started"
        return run
    try:  # read as the trainer saved it: a config from before router.combine existed trained with the delta rule
        run.cfg = from_saved(yaml_load(config_path.read_text()) or {})
    except (ConfigError, ValueError) as exc:
        raise ReportError(f"{config_path}: {exc}") from None
    plan_path = run_dir / PLAN_FILE
    if plan_path.is_file():
        plan = _read_json(plan_path)
        run.planned_steps, planned_budget, convention = plan["steps"], plan["budget"], plan["convention"]
    else:
        try:
            plan = plan_budget(run.cfg)
        except ConfigError:
            plan = None
        run.planned_steps = plan.steps if plan else None
        planned_budget, convention = (plan.budget, plan.convention) if plan else ("no budget", "")
    run.budget = budget or budget_label(planned_budget, convention)
    metrics_path = run_dir / METRICS_FILE
    if metrics_path.is_file():
        run.records = _read_metrics(metrics_path)
    if not run.records:
        run.missing = f"no step logged in {run_dir}/{METRICS_FILE}: not trained yet"
    for attr, file in (("eval", EVAL_FILE), ("fewshot", FEWSHOT_FILE)):
        if (run_dir / file).is_file():
            setattr(run, attr, _read_json(run_dir / file))
    return run


def load_sweep_runs(sweep_dir: str | Path) -> tuple[str, list[Run]]:
    """(sweep name, one Run per arm of OUTPUT_DIR/sweep.json, in sweep order, missing ones included)."""
    sweep_dir = Path(sweep_dir)
    path = sweep_dir / MANIFEST_FILE
    if not path.is_file():
        raise ReportError(f"{path}: not found (a sweep output directory has it once `mor-ds sweep` has written or "
                          f"submitted the arms; for run directories pass them as arguments)")
    data = _read_json(path)
    try:
        arms = [(a["name"], budget_label(a["budget"], a["convention"])) for a in data["arms"]]
    except (KeyError, TypeError) as exc:
        raise ReportError(f"{path}: not a sweep manifest (missing {exc})") from None
    # arms sit in OUTPUT_DIR/<arm>, wherever the directory has been copied to since
    return data.get("sweep", sweep_dir.name), [load_run(sweep_dir / name, name, budget) for name, budget in arms]


# --------------------------------------------------------------------------------------------
# the numbers of one row


def cumulative_flops(run: Run, convention: str) -> list[float]:
    """Training FLOPs after each logged record under a convention. Exact FLOPs of token-choice MoR count each
    logging window at the depth fractions logged at its end (the trainer's MFU does the same); every other
    model's FLOPs per token are fixed by its config."""
    assert run.cfg is not None
    cfg = run.cfg
    nr = cfg.model.num_recursions
    measured = convention == "exact" and cfg.model.family == "mor" and cfg.router.type == "token_choice"
    fixed = flops_per_token(cfg, convention)
    total, previous, out = 0.0, 0, []
    for record in run.records:
        per_token = fixed
        if measured:
            fractions = [record.get(f"depth_frac/{r}") for r in range(nr)]
            if all(f is not None for f in fractions):
                per_token = flops_per_token(cfg, "exact", active_fractions=fractions)
        total += per_token * (record["tokens"] - previous)
        previous = record["tokens"]
        out.append(total)
    return out


def _steady(values: list[float]) -> list[float]:
    """Logging windows after the first (the first holds compilation and warm-up) when there are several."""
    return values[1:] if len(values) > 1 else values


def _median(run: Run, key: str) -> float | None:
    values = [r[key] for r in run.records if r.get(key) is not None]
    return statistics.median(_steady(values)) if values else None


def last_value(run: Run, key: str) -> float | None:
    return next((r[key] for r in reversed(run.records) if r.get(key) is not None), None)


def validation(run: Run) -> dict[str, Any] | None:
    """Final held-out loss: `mor-ds eval`'s eval.json when present (all held-out windows, or --batches of them),
    else the run's last in-training evaluation (its first train.eval_batches windows)."""
    if run.eval is not None and "val/loss" in run.eval:
        e = run.eval
        return {"loss": e["val/loss"], "ppl": e["val/ppl"], "tokens": e.get("val/tokens"), "step": e.get("step"),
                "held_out": e.get("held_out"), "source": EVAL_FILE,
                "depth": [e.get(f"val/depth_frac/{r}") for r in range(run.cfg.model.num_recursions)]
                if run.routed else []}
    record = next((r for r in reversed(run.records) if "val/loss" in r), None)
    if record is None:
        return None
    t = run.cfg.train
    return {"loss": record["val/loss"], "ppl": record["val/ppl"],
            "tokens": record.get("val/batches", 0) * t.micro_batch_size * t.seq_len, "step": record["step"],
            "held_out": None, "source": METRICS_FILE,
            "depth": [record.get(f"val/depth_frac/{r}") for r in range(run.cfg.model.num_recursions)]
            if run.routed else []}


def fewshot_scores(run: Run) -> dict[str, float]:
    """{"task metric [routing]": value} of fewshot.json's headline metrics (acc / acc_norm)."""
    if not run.fewshot:
        return {}
    from mor_ds.evaluation.harness import headline

    out = {}
    for routing, results in run.fewshot.items():
        suffix = "" if routing == "causal" else f" [{routing}]"
        for task, metric, value, _ in headline(results):
            out[f"{task} {metric}{suffix}"] = value
    return out


def target_fractions(run: Run) -> list[float]:
    """The fraction of tokens each recursion step is meant to see: the capacity schedule (expert-choice, k_r/S)
    or the uniform depth distribution token-choice's balancing aims at."""
    return step_fractions(run.cfg, "exact")


def summary(run: Run) -> dict[str, Any]:
    """One table row: every number named, None where the run did not log it."""
    cfg = run.cfg
    if cfg is None or run.missing:
        return {"arm": run.name, "status": run.status, "why": run.missing}
    m = cfg.model
    counts = param_counts(cfg)
    mor = m.family == "mor"
    peak_gpu = [r["perf/peak_mem_gib"] for r in run.records if "perf/peak_mem_gib" in r]
    peak_rss = [r["perf/peak_rss_gib"] for r in run.records if "perf/peak_rss_gib" in r]
    val = validation(run)
    return {
        "arm": run.name, "status": run.status, "budget": run.budget, "dir": str(run.dir),
        "family": m.family, "num_recursions": m.num_recursions,
        "router": cfg.router.type if mor else None,
        "kv_mode": m.kv_mode if m.family != "vanilla" else None,
        "combine": cfg.router.combine if mor else None,
        "params_total": counts.total, "params_unique": counts.unique,
        "flops_exact": cumulative_flops(run, "exact")[-1], "flops_paper": cumulative_flops(run, "paper")[-1],
        "flops_convention": cfg.train.flops_convention, "flops_logged": run.last.get("flops"),
        "tokens": run.last["tokens"], "steps": run.steps, "planned_steps": run.planned_steps,
        "train_loss": run.last["loss"],
        "val_loss": val["loss"] if val else None, "val_ppl": val["ppl"] if val else None,
        "val_tokens": val["tokens"] if val else None, "val_step": val["step"] if val else None,
        "val_source": val["source"] if val else None, "held_out": val["held_out"] if val else None,
        "fewshot": fewshot_scores(run),
        "wall_s": run.last.get("elapsed_s"),
        "tokens_per_s": _median(run, "perf/tokens_per_s"), "mfu": _median(run, "perf/mfu"),
        "peak_mem_gib": max(peak_gpu) if peak_gpu else (max(peak_rss) if peak_rss else None),
        "peak_mem_kind": "gpu" if peak_gpu else ("host rss" if peak_rss else None),
        "depth_train": [last_value(run, f"depth_frac/{r}") for r in range(m.num_recursions)] if mor else [],
        "depth_held_out": val["depth"] if val else [],
        "depth_target": target_fractions(run) if mor else [],
        "router_weight_std": last_value(run, "router_weight/std") if mor else None,
    }


def finite(value: Any) -> bool:
    return isinstance(value, (int, float)) and math.isfinite(value)
