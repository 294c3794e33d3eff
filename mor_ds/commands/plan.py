"""`mor-ds plan`: parameters, FLOPs per token, steps for a budget, compute-matched arms, per-GPU memory."""

from __future__ import annotations

import argparse
import json
import math

from rich.console import Console
from rich.table import Table

from mor_ds.config import Config, ConfigError, load_config, parse_amount
from mor_ds.flops import CONVENTIONS, estimate_memory, flops_breakdown, param_counts, plan_budget
from mor_ds.presets import list_presets

def amount(text: str) -> float:
    """`20e9`, `20B`, `16.5e18`, `2.1M` -> float (k/M/B|G/T suffixes, as config values take them)."""
    value = parse_amount(text)
    if value is None or value <= 0:
        raise argparse.ArgumentTypeError(f"{text!r} is not a positive number (e.g. 20e9, 20B, 16.5e18)")
    return value


def register(subparsers: argparse._SubParsersAction) -> None:
    p = subparsers.add_parser(
        "plan", help="parameters, FLOPs, steps for a budget and per-GPU memory of a config",
        description="Parameters, training FLOPs per token, steps/tokens for a token or FLOPs budget (default: the "
                    "config's train.max_steps / max_tokens / max_flops), compute-matched token budgets, and a "
                    "per-GPU memory estimate.")
    p.add_argument("--config", help="preset name or YAML file")
    p.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                   help="override a config key of --config (repeatable), e.g. model.num_recursions=3")
    budget = p.add_mutually_exclusive_group()
    budget.add_argument("--tokens", type=amount, help="token budget (e.g. 20e9 or 20B)")
    budget.add_argument("--flops", type=amount, help="FLOPs budget under --convention (e.g. 16.5e18)")
    p.add_argument("--match-flops-of", metavar="PRESET",
                   help="reference arm (preset or YAML): the budget applies to it, and --config gets the token "
                        "budget that spends the same FLOPs")
    p.add_argument("--convention", choices=CONVENTIONS,
                   help="FLOPs convention for budgets (default: train.flops_convention of --config)")
    p.add_argument("--zero-stage", type=int, choices=(0, 1, 2, 3), help="default: train.zero_stage")
    p.add_argument("--micro-batch", type=int, help="sequences per GPU per forward (default: train.micro_batch_size)")
    p.add_argument("--gpus", type=int, default=1, help="data-parallel GPUs sharing the ZeRO partitions (default 1)")
    p.add_argument("--json", action="store_true", help="print JSON instead of tables")
    p.add_argument("--list", action="store_true", help="list the presets with their shapes")
    p.set_defaults(func=run)


# --------------------------------------------------------------------------------------------
# what gets reported


def _shape(cfg: Config) -> dict:
    m = cfg.model
    shape = {"family": m.family, "num_recursions": m.num_recursions, "num_layers": m.num_layers,
             "hidden_size": m.hidden_size, "num_heads": m.num_heads, "num_kv_heads": m.num_kv_heads,
             "intermediate_size": m.intermediate_size, "vocab_size": m.vocab_size, "seq_len": cfg.train.seq_len}
    if m.family != "vanilla":
        shape |= {"sharing": m.sharing, "kv_mode": m.kv_mode}
    if m.family == "mor":
        shape["router"] = cfg.router.type
    return shape


def _arm(cfg: Config, *, tokens: float | None, flops: float | None, convention: str | None) -> dict:
    exact, paper = flops_breakdown(cfg, "exact"), flops_breakdown(cfg, "paper")
    return {
        "name": cfg.name,
        "shape": _shape(cfg),
        "params": vars(param_counts(cfg)),
        "flops_per_token": {
            "exact": exact.training, "paper": paper.training,
            "exact_forward": {"linear": exact.linear, "attention": exact.attention, "lm_head": exact.lm_head,
                              "router": exact.router + exact.aux_router},
        },
        "plan": plan_budget(cfg, tokens=tokens, flops=flops, convention=convention).to_dict(),
    }


def build_report(args: argparse.Namespace) -> dict:
    cfg = load_config(args.config, args.overrides)
    cfg.name = cfg.name or args.config
    if args.match_flops_of:
        ref_cfg = load_config(args.match_flops_of)
        ref_cfg.name = ref_cfg.name or args.match_flops_of
        convention = args.convention or cfg.train.flops_convention
        ref = _arm(ref_cfg, tokens=args.tokens, flops=args.flops, convention=convention)
        matched = _arm(cfg, tokens=None, flops=ref["plan"]["flops"], convention=convention)
        matched["plan"]["budget"] = f"FLOPs of {ref_cfg.name}"
        arms = [matched, ref]
    else:
        arms = [_arm(cfg, tokens=args.tokens, flops=args.flops, convention=args.convention)]
    memory = {
        "zero_stage": cfg.train.zero_stage if args.zero_stage is None else args.zero_stage,
        "micro_batch": cfg.train.micro_batch_size if args.micro_batch is None else args.micro_batch,
        "gpus": args.gpus, "precision": cfg.train.precision, "offload_optimizer": cfg.train.offload_optimizer,
    }
    memory["bytes"] = estimate_memory(cfg, memory["zero_stage"], memory["micro_batch"], args.gpus)
    return {"config": cfg.name, "arms": arms, "memory": memory}


def list_report() -> list[dict]:
    rows = []
    for name in list_presets():
        cfg = load_config(name)
        rows.append({"name": name, **vars(param_counts(cfg)), "family": cfg.model.family,
                     "num_recursions": cfg.model.num_recursions, "num_layers": cfg.model.num_layers,
                     "hidden_size": cfg.model.hidden_size})
    return rows


# --------------------------------------------------------------------------------------------
# tables


def _si(x: float, unit: str = "") -> str:
    for scale, suffix in ((1e12, "T"), (1e9, "B"), (1e6, "M"), (1e3, "K")):
        if abs(x) >= scale:
            return f"{x / scale:.2f}{suffix}{unit}"
    return f"{x:.0f}{unit}"


def _sci(x: float) -> str:
    """1.973e+09 -> 1.973e9"""
    if x == 0:
        return "0"
    exponent = math.floor(math.log10(abs(x)))
    return f"{x / 10**exponent:.4g}e{exponent}"


def _gib(x: float) -> str:
    return f"{x / 2**30:.2f} GiB"


def _print_list(rows: list[dict], console: Console) -> None:
    table = Table(title="mor-ds presets (params: unrolled / held by the model)")
    for col in ("preset", "family", "Nr", "layers", "d", "params", "unique", "unique non-emb"):
        table.add_column(col, justify="left" if col in ("preset", "family") else "right")
    for r in rows:
        table.add_row(r["name"], r["family"], str(r["num_recursions"]), str(r["num_layers"]), str(r["hidden_size"]),
                      _si(r["total"]), _si(r["unique"]), _si(r["unique_non_embedding"]))
    console.print(table)


def _print_report(report: dict, console: Console) -> None:
    main = report["arms"][0]
    shape = ", ".join(f"{k}={v}" for k, v in main["shape"].items())
    console.print(f"[bold]{report['config']}[/bold]: {shape}")

    params = Table(title="Parameters")
    for col in ("arm", "total", "total non-emb", "unique", "unique non-emb"):
        params.add_column(col, justify="left" if col == "arm" else "right")
    flops = Table(title="FLOPs per token (exact: fwd+bwd, all matmuls; paper: the paper's forward-only count)")
    for col in ("arm", "exact", "paper", "fwd linear", "fwd attention", "fwd lm head", "fwd router"):
        flops.add_column(col, justify="left" if col == "arm" else "right")
    budget = Table(title="Budget (steps of train.global_batch_size × train.seq_len tokens)")
    for col in ("arm", "convention", "budget", "tokens/step", "steps", "tokens", "FLOPs"):
        budget.add_column(col, justify="left" if col in ("arm", "convention", "budget") else "right")
    for arm in report["arms"]:
        p, f, b = arm["params"], arm["flops_per_token"], arm["plan"]
        fwd = f["exact_forward"]
        params.add_row(arm["name"], _si(p["total"]), _si(p["total_non_embedding"]), _si(p["unique"]),
                       _si(p["unique_non_embedding"]))
        flops.add_row(arm["name"], _sci(f["exact"]), _sci(f["paper"]), _sci(fwd["linear"]), _sci(fwd["attention"]),
                      _sci(fwd["lm_head"]), _sci(fwd["router"]))
        budget.add_row(arm["name"], b["convention"], b["budget"], _si(b["tokens_per_step"]), str(b["steps"]),
                       _si(b["tokens"]), _sci(b["flops"]))
    console.print(params, flops, budget)

    mem = report["memory"]
    by = mem["bytes"]
    table = Table(title=f"Memory per GPU: ZeRO-{mem['zero_stage']}, {mem['gpus']} GPU(s), micro-batch "
                        f"{mem['micro_batch']}, {mem['precision']}"
                        + (", optimizer offloaded" if mem["offload_optimizer"] else ""))
    table.add_column("")
    table.add_column("no act. checkpointing", justify="right")
    table.add_column("act. checkpointing", justify="right")
    for key, label in (("weights", "weights"), ("gradients", "gradients"), ("optimizer", "optimizer states")):
        table.add_row(label, _gib(by[key]), _gib(by[key]))
    table.add_row("activations", _gib(by["activations"]), _gib(by["activations_checkpointed"]))
    table.add_row("[bold]total[/bold]", _gib(by["total"]), _gib(by["total_checkpointed"]))
    console.print(table)
    console.print("[dim]memory excludes CUDA context, communication buckets and allocator fragmentation[/dim]")


def run(args: argparse.Namespace) -> int:
    console = Console()
    if not console.is_terminal:  # pipes and logs: wide enough that no column is cut
        console = Console(width=160)
    if args.list:
        rows = list_report()
        if args.json:
            print(json.dumps(rows, indent=2))
        else:
            _print_list(rows, console)
        return 0
    if not args.config:
        raise ConfigError("--config PRESET|YAML is required (or --list)")
    report = build_report(args)
    if args.json:
        print(json.dumps(report, indent=2))
    else:
        _print_report(report, console)
    return 0
