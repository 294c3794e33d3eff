"""report.md: the comparison table per budget, the runs that are missing or unfinished, held-out data and routing."""

from __future__ import annotations

from typing import Any

from mor_ds.report.runs import finite

COLUMNS = ("arm", "family", "Nr", "router", "KV", "combine", "params total", "params unique", "FLOPs exact",
           "FLOPs paper", "tokens", "steps", "train loss", "val loss", "val ppl", "few-shot", "wall", "tokens/s", "MFU",
           "peak mem")
ROUTERS = {"expert_choice": "expert-choice", "token_choice": "token-choice"}
DASH = "—"


def _si(value: float, digits: int = 4) -> str:
    for unit, scale in (("T", 1e12), ("G", 1e9), ("M", 1e6), ("k", 1e3)):
        if abs(value) >= scale:
            return f"{value / scale:.{digits}g}{unit}"
    return f"{value:.{digits}g}"


def _wall(seconds: float) -> str:
    minutes, s = divmod(round(seconds), 60)
    hours, minutes = divmod(minutes, 60)
    return f"{hours}h {minutes:02d}m" if hours else (f"{minutes}m {s:02d}s" if minutes else f"{s}s")


def _fmt(value: Any, kind: str) -> str:
    if value is None or (isinstance(value, float) and not finite(value)):
        return DASH if value is None else str(value)
    if kind == "loss":
        return f"{value:.4f}"
    if kind == "ppl":
        return f"{value:.2f}"
    if kind == "flops":
        return f"{value:.3e}"
    if kind == "si":
        return _si(value)
    if kind == "pct":
        return f"{100 * value:.1f}%"
    return str(value)


def row_cells(row: dict[str, Any]) -> list[str]:
    """The table cells of one summary row (see runs.summary), in COLUMNS order."""
    name = row["arm"]
    if row["status"] == "unfinished":
        name += f" (unfinished: step {row['steps']} of {row['planned_steps']})"
    fewshot = "; ".join(f"{k} {v:.3f}" for k, v in row["fewshot"].items()) or DASH
    val_loss = _fmt(row["val_loss"], "loss") + ("*" if row["val_source"] == "metrics.jsonl" else "")
    mem = DASH if row["peak_mem_gib"] is None else (
        f"{row['peak_mem_gib']:.1f} GiB" + (" (host RSS)" if row["peak_mem_kind"] == "host rss" else ""))
    return [name, row["family"], str(row["num_recursions"]), ROUTERS.get(row["router"], DASH),
            row["kv_mode"] or DASH, row["combine"] or DASH, _fmt(row["params_total"], "si"),
            _fmt(row["params_unique"], "si"), _fmt(row["flops_exact"], "flops"), _fmt(row["flops_paper"], "flops"),
            _fmt(row["tokens"], "si"), str(row["steps"]), _fmt(row["train_loss"], "loss"), val_loss,
            _fmt(row["val_ppl"], "ppl"), fewshot, DASH if row["wall_s"] is None else _wall(row["wall_s"]),
            _fmt(row["tokens_per_s"], "si"), _fmt(row["mfu"], "pct"), mem]


def _table(header: tuple[str, ...] | list[str], rows: list[list[str]]) -> list[str]:
    return ["| " + " | ".join(header) + " |", "|" + "|".join("---" for _ in header) + "|",
            *("| " + " | ".join(cells) + " |" for cells in rows)]


def _held_out_lines(rows: list[dict[str, Any]]) -> list[str]:
    scored = [r for r in rows if r["val_loss"] is not None]
    if not scored:
        return ["No run has a validation loss (run `mor-ds eval --checkpoint RUN_DIR`)."]
    fingerprints = {r["held_out"] for r in scored if r["val_source"] == "eval.json"}
    windows = {(r["held_out"], r["val_tokens"]) for r in scored if r["val_source"] == "eval.json"}
    from_training = [r["arm"] for r in scored if r["val_source"] != "eval.json"]
    lines = []
    evaluated = [r["arm"] for r in scored if r["val_source"] == "eval.json"]
    if len(windows) == 1:
        (fingerprint, tokens), = windows
        lines.append(f"- {', '.join(evaluated)}: validation loss from `mor-ds eval` (eval.json), the same held-out "
                     f"windows in each: {tokens:,} tokens, fingerprint `{(fingerprint or '?')[:16]}` (validation "
                     f"shards, tokenizer and window length).")
    elif windows:
        lines.append("- **The eval.json files scored different held-out windows; their losses do not compare:**")
        lines += [f"  - {r['arm']}: {r['val_tokens']:,} tokens, fingerprint `{(r['held_out'] or '?')[:16]}`"
                  for r in scored if r["val_source"] == "eval.json"]
    if from_training:
        lines.append(f"- \\* {', '.join(from_training)}: no eval.json; the run's last in-training evaluation "
                     f"(its first train.eval_batches held-out windows).")
    if fingerprints and any(r["val_step"] is not None and r["val_step"] != r["steps"] for r in scored
                            if r["val_source"] == "eval.json"):
        lines += [f"- {r['arm']}: eval.json is of step {r['val_step']}, the run logged {r['steps']} steps"
                  for r in scored if r["val_source"] == "eval.json" and r["val_step"] not in (None, r["steps"])]
    return lines


def _routing_lines(rows: list[dict[str, Any]]) -> list[str]:
    routed = [r for r in rows if r["family"] == "mor"]
    if not routed:
        return []
    nr = max(r["num_recursions"] for r in routed)
    header = ["arm", "router", *(f"step {i}: target / train / held-out" for i in range(nr)), "router weight std"]
    body = []
    for r in routed:
        cells = [r["arm"], ROUTERS[r["router"]]]
        for i in range(nr):
            if i >= r["num_recursions"]:
                cells.append(DASH)
                continue
            parts = [r["depth_target"][i], r["depth_train"][i], r["depth_held_out"][i] if r["depth_held_out"] else None]
            cells.append(" / ".join(DASH if p is None else f"{p:.3f}" for p in parts))
        cells.append(_fmt(r["router_weight_std"], "loss"))
        body.append(cells)
    return ["## Routing", "",
            "Fraction of tokens reaching each recursion step: the target (expert-choice: the capacity schedule "
            "k_r/S; token-choice: the uniform depth distribution its balancing aims at), the last training step "
            "(expert-choice training selects exactly the target), and held-out causal routing (each token decides "
            "from its own router score, as at inference). Router weight std: the spread of the router weights "
            "g = α·σ(logit) at the last logged step.", "", *_table(header, body), ""]


def render(title: str, groups: list[tuple[str, list[dict[str, Any]]]], missing: list[dict[str, Any]],
           plots: dict[str, str], notes: list[str]) -> str:
    """The whole report.md: groups = [(budget label, summary rows)], missing = rows of missing runs,
    plots = {file name: caption}."""
    lines = [f"# {title}", ""]
    lines += notes + ([""] if notes else [])
    rows = [r for _, group in groups for r in group]
    for budget, group in groups:
        lines += [f"## Budget {budget}", "", *_table(COLUMNS, [row_cells(r) for r in group]), ""]
        absent = [m for m in missing if m.get("budget") == budget]
        lines += [f"- **missing: {m['arm']}** ({m['why']})" for m in absent] + ([""] if absent else [])
    orphans = [m for m in missing if m.get("budget") not in {b for b, _ in groups}]
    if orphans:
        lines += ["## Missing runs", "", *(f"- **{m['arm']}** ({m['why']})" for m in orphans), ""]
    lines += ["Columns: params total = the unrolled (vanilla-equivalent) model, unique = what the model holds "
              "(embeddings included); FLOPs exact = forward + backward of every matmul the model ran "
              "(`mor_ds.flops`; token-choice at the logged depth fractions), paper = Bae et al.'s forward-only "
              "convention; tokens and steps as logged; train loss = the last logged step's LM loss; val = held-out "
              "loss under causal routing; wall = the training loop's wall time summed over resumed segments "
              "(start-up excluded); tokens/s and MFU = median over the logging windows after the first; peak mem = "
              "the largest allocated CUDA memory logged (host RSS on CPU).", ""]
    lines += ["## Held-out data", "", *_held_out_lines(rows), ""]
    lines += _routing_lines(rows)
    if plots:
        lines += ["## Plots", ""]
        for name, caption in plots.items():
            lines += [f"![{caption}]({name})", "", f"*{caption}*", ""]
    return "\n".join(lines).rstrip() + "\n"
