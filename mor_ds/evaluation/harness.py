"""Few-shot evaluation through EleutherAI's lm-evaluation-harness (`lm-eval`).

    mor-ds eval --checkpoint runs/mor3 --tasks paper                     # the paper's seven tasks, causal routing
    mor-ds eval --checkpoint runs/mor3 --tasks hellaswag,piqa --routing both --limit 200

`--tasks paper` = LAMBADA (OpenAI), HellaSwag, PIQA, WinoGrande, ARC-Easy, ARC-Challenge, MMLU; the paper reports
accuracy, normalised accuracy (acc_norm) for HellaSwag, PIQA and ARC. Task data comes through lm-eval (the Hugging
Face hub, or its cache); `--include-path DIR` adds local task YAMLs (lm-eval's format).

Python API: `run_fewshot(model, tokenizer, tasks, …)` on an in-memory model, `evaluate_checkpoint(path, tasks, …)`
on anything `mor_ds.weights.load_model` reads (run dir, step_* dir, export file), and `fewshot_main(args)` for
the `mor-ds eval` command (flags from `add_fewshot_args`).
"""

from __future__ import annotations

import argparse
import difflib
import json
import re
import sys
from pathlib import Path
from typing import TYPE_CHECKING, Any

from mor_ds.choices import ModelFamily, RouterType, RoutingMode

if TYPE_CHECKING:
    import torch

PAPER_TASKS = ("lambada_openai", "hellaswag", "piqa", "winogrande", "arc_easy", "arc_challenge", "mmlu")
# the paper's headline metric per task (others: acc)
PAPER_METRIC = {"hellaswag": "acc_norm", "piqa": "acc_norm", "arc_easy": "acc_norm", "arc_challenge": "acc_norm"}
ROUTING_CHOICES = (*RoutingMode, "both")
DTYPES = {"auto": None, "bf16": "bfloat16", "fp32": "float32"}  # --dtype → torch dtype name


class EvalError(ValueError):
    """Bad evaluation input (unknown task, missing tokenizer, …); the one-line message names it."""


def parse_tasks(spec: str | list[str]) -> list[str]:
    """'paper' expands to PAPER_TASKS; comma-separated names; duplicates dropped, order kept."""
    items = spec.split(",") if isinstance(spec, str) else list(spec)
    names: list[str] = []
    for item in (i.strip() for i in items):
        for name in (PAPER_TASKS if item == "paper" else (item,) if item else ()):
            if name not in names:
                names.append(name)
    if not names:
        raise EvalError("--tasks: no task given (e.g. --tasks paper or --tasks hellaswag,piqa)")
    return names


def task_manager(names: list[str], include_path: str | list[str] | None = None, include_defaults: bool = True):
    """An lm-eval TaskManager that knows every name in `names`, else EvalError naming the first unknown one.
    Local task directories alone are tried first: indexing lm-eval's built-in tasks takes seconds."""
    from lm_eval.tasks import TaskManager

    paths = [include_path] if isinstance(include_path, (str, Path)) else list(include_path or [])
    for path in paths:
        if not Path(path).is_dir():
            raise EvalError(f"--include-path {path}: not a directory")
    if paths:
        local = TaskManager(include_path=paths, include_defaults=False)
        if not _unknown(names, local) or not include_defaults:
            return _checked(names, local)
    return _checked(names, TaskManager(include_path=paths or None, include_defaults=include_defaults))


def _unknown(names: list[str], manager) -> list[str]:
    known = set(manager.all_tasks)
    return [n for n in names if n not in known and not Path(n).is_file()]


def _checked(names: list[str], manager):
    for name in _unknown(names, manager):
        close = difflib.get_close_matches(name, manager.all_tasks, n=3)
        hint = (f" (did you mean {', '.join(close)}?)" if close
                else " (see `lm-eval ls tasks`; local YAMLs: --include-path)")
        raise EvalError(f"unknown task {name!r}{hint}")
    return manager


def run_fewshot(model, tokenizer, tasks: str | list[str], *, routing: str = "causal", num_fewshot: int | None = None,
                limit: int | float | None = None, batch_size: int = 16, max_length: int = 2048,
                include_path: str | list[str] | None = None, include_defaults: bool = True, manager=None,
                device: str | torch.device | None = None, dtype: torch.dtype | None = None,
                bootstrap_iters: int = 1000, seed: int = 1234, log_samples: bool = False) -> dict[str, Any]:
    """Evaluate an in-memory CausalLM; returns lm-eval's results dict ("results", "configs", "n-shot", …).
    `manager`: a TaskManager from `task_manager()` to reuse (else one is built from include_path)."""
    from unittest import mock

    import lm_eval
    import lm_eval.evaluator

    from mor_ds.evaluation.adapter import MoRLM
    from mor_ds.provenance import code_version

    names = parse_tasks(tasks)
    manager = manager or task_manager(names, include_path, include_defaults)
    lm = MoRLM(model, tokenizer, routing=routing, batch_size=batch_size, max_length=max_length, device=device,
               dtype=dtype)
    # lm-eval records `git describe` of the current directory, and git prints "fatal: not a git repository"
    # outside one; the code that evaluated is mor-ds: record its commit
    with mock.patch("lm_eval.evaluator.get_git_commit_hash", lambda: code_version().get("git_commit")):
        results = lm_eval.simple_evaluate(
            model=lm, tasks=names, num_fewshot=num_fewshot, limit=limit, task_manager=manager,
            bootstrap_iters=bootstrap_iters, log_samples=log_samples, random_seed=seed, numpy_random_seed=seed,
            torch_random_seed=seed, fewshot_random_seed=seed)
    results["mor_ds"] = {"routing": routing, **lm.get_model_info()}
    return results


def headline(results: dict[str, Any]) -> list[tuple[str, str, float, float | None]]:
    """(task, metric, value, stderr) rows: acc and acc_norm where reported, else every numeric metric. Groups
    (e.g. mmlu) appear with their aggregate, not their subtasks."""
    rows = []
    subtasks = {t for group, members in results.get("group_subtasks", {}).items() for t in members if t != group}
    for task, metrics in results["results"].items():
        if task in subtasks:
            continue
        values = {k.split(",")[0]: v for k, v in metrics.items()
                  if isinstance(v, (int, float)) and "_stderr" not in k and not k.startswith("sample_len")}
        stderr = {k.split(",")[0].replace("_stderr", ""): v for k, v in metrics.items() if "_stderr" in k}
        wanted = [m for m in ("acc", "acc_norm") if m in values] or sorted(values)
        for metric in wanted:
            err = stderr.get(metric)
            rows.append((task, metric, float(values[metric]), float(err) if isinstance(err, (int, float)) else None))
    return rows


def format_table(by_routing: dict[str, dict[str, Any]]) -> str:
    """One row per (task, metric), one column per routing; '*' marks the paper's headline metric."""
    columns = list(by_routing)
    table: dict[tuple[str, str], dict[str, str]] = {}
    for routing, results in by_routing.items():
        for task, metric, value, err in headline(results):
            cell = f"{value:.4f}" + (f" ± {err:.4f}" if err is not None else "")
            table.setdefault((task, metric), {})[routing] = cell
    width = max([len(f"{t} {m} *") for t, m in table] + [10])
    cell_width = max([len(c) for cells in table.values() for c in cells.values()] + [len(c) for c in columns])
    lines = [f"{'task / metric':<{width}}  " + "  ".join(f"{c:<{cell_width}}" for c in columns)]
    for (task, metric), cells in table.items():
        mark = " *" if PAPER_METRIC.get(task, "acc") == metric else ""
        row = "  ".join(f"{cells.get(c, '-'):<{cell_width}}" for c in columns)
        lines.append(f"{task + ' ' + metric + mark:<{width}}  " + row)
    return "\n".join(lines)


def evaluate_checkpoint(checkpoint: str | Path, tasks: str | list[str], *, routing: str = "causal",
                        tokenizer: str | None = None, **kwargs) -> dict[str, dict[str, Any]]:
    """Load a checkpoint and evaluate it under one routing or both; returns {routing: lm-eval results}."""
    from mor_ds.weights import load_model
    from mor_ds.interop.tokenizer import checkpoint_tokenizer

    if routing not in ROUTING_CHOICES:
        raise EvalError(f"--routing {routing!r} is not one of {', '.join(ROUTING_CHOICES)}")
    names = parse_tasks(tasks)
    manager = task_manager(names, kwargs.pop("include_path", None), kwargs.pop("include_defaults", True))
    model, cfg = load_model(checkpoint)
    tok = checkpoint_tokenizer(cfg, tokenizer)
    kwargs.setdefault("max_length", cfg.train.seq_len)
    routings = tuple(RoutingMode) if routing == "both" else (routing,)
    if routing == "both" and not (cfg.model.family == ModelFamily.MOR and cfg.router.type == RouterType.EXPERT_CHOICE):
        routings = (RoutingMode.CAUSAL,)  # routing only changes expert-choice MoR
    return {r: run_fewshot(model, tok, names, routing=r, manager=manager, **kwargs) for r in routings}


# ------------------------------------------------------------------------------------ `mor-ds eval --tasks …`


def task_data_missing(exc: Exception) -> str:
    """One line for a task whose Hugging Face dataset could not be loaded: which one, and how to supply it."""
    found = re.search(r"reach '([^']+)'|at (\S+) doesn't exist|(\S+/\S+)", str(exc))
    dataset = next((g for g in found.groups() if g), "?") if found else "?"
    return (f"--tasks: the task data {dataset!r} is neither reachable on the Hugging Face hub nor in the local cache "
            f"({str(exc).splitlines()[0]}); run the same command once with network access (the datasets cache, "
            f"$HF_HOME, keeps it; then HF_DATASETS_OFFLINE=1 works), or copy that cache from a machine that has it, "
            f"or give a local task YAML with --include-path whose dataset_path / dataset_kwargs name local files")


def add_fewshot_args(parser: argparse.ArgumentParser, json_flag: bool = True) -> None:
    """Flags of the few-shot part of `mor-ds eval` (active when --tasks is given); json_flag=False when the parser
    already has `--json` (dest json_out)."""
    g = parser.add_argument_group("few-shot evaluation (lm-eval)")
    g.add_argument("--tasks", default=None,
                   help="comma-separated lm-eval task names, or 'paper' (lambada_openai, hellaswag, piqa, winogrande, "
                        "arc_easy, arc_challenge, mmlu); given: run few-shot evaluation instead of validation loss")
    g.add_argument("--routing", default="causal", choices=ROUTING_CHOICES,
                   help="MoR routing at evaluation, for the tasks and for the validation loss alike: causal "
                        "(default; per-token decisions, no look-ahead), topk (training-time top-k over the whole "
                        "sequence, sees the future), or both")
    g.add_argument("--num-fewshot", type=int, default=None,
                   help="examples in context (default: each task's own, else 0)")
    g.add_argument("--limit", type=float, default=None,
                   help="examples per task (>= 1) or a fraction (< 1) — for quick checks, not for reporting")
    g.add_argument("--eval-batch-size", type=int, default=16, help="sequences per forward pass")
    g.add_argument("--dtype", default="auto", choices=list(DTYPES), help="auto: bf16 on GPU, fp32 on CPU")
    g.add_argument("--device", default=None, help="default: cuda if available, else cpu")
    g.add_argument("--tokenizer", default=None, help="tokenizer file (default: the one in the checkpoint's config)")
    g.add_argument("--include-path", action="append", default=[], help="directory of local lm-eval task YAMLs")
    if json_flag:
        g.add_argument("--json", dest="json_out", default=None, help="also write the full results (per routing) here")


def fewshot_main(args: argparse.Namespace) -> int:
    """Run `mor-ds eval --checkpoint … --tasks …`; prints the table, writes --json; returns the exit code."""
    import torch
    from datasets.exceptions import DatasetNotFoundError

    from mor_ds.train.checkpoint_dir import CheckpointError

    limit = args.limit
    if limit is not None and limit >= 1:
        limit = int(limit)
    try:
        by_routing = evaluate_checkpoint(
            args.checkpoint, args.tasks, routing=args.routing, tokenizer=args.tokenizer, num_fewshot=args.num_fewshot,
            limit=limit, batch_size=args.eval_batch_size, include_path=args.include_path, device=args.device,
            dtype=getattr(torch, DTYPES[args.dtype]) if DTYPES[args.dtype] else None)
    except (ValueError, CheckpointError) as exc:  # EvalError, InteropError, ConfigError, not-an-export
        print(f"mor-ds eval: {str(exc).splitlines()[0]}", file=sys.stderr)
        return 2
    except (ConnectionError, DatasetNotFoundError) as exc:  # task data neither reachable nor in the local cache
        print(f"mor-ds eval: {task_data_missing(exc)}", file=sys.stderr)
        return 2
    print(format_table(by_routing))
    if args.json_out:
        out = Path(args.json_out)
        out.parent.mkdir(parents=True, exist_ok=True)
        out.write_text(json.dumps(by_routing, indent=2, default=str) + "\n")
        print(f"results written to {out}")
    return 0
