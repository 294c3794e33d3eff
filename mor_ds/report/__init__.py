"""`mor-ds report`: compare training runs (the arms of a sweep) in one markdown table per budget and a set of plots.

    write_report(load_sweep_runs("runs/sweeps/isoflop-360m")[1], "report/", title="isoflop-360m")

runs.py reads run directories and computes each row's numbers, markdown.py writes report.md, plots.py draws the
PNGs; report.json holds the rows at full precision.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

from mor_ds.report.markdown import render
from mor_ds.report.plots import FIGURES, build_figures
from mor_ds.report.runs import ReportError, Run, load_run, load_sweep_runs, summary

__all__ = ["Report", "ReportError", "Run", "build_report", "load_run", "load_sweep_runs", "write_report"]

REPORT_FILE = "report.md"
JSON_FILE = "report.json"


@dataclass
class Report:
    title: str
    groups: list[tuple[str, list[dict]]]  # (budget label, rows of runs with logged steps), in run order
    missing: list[dict]  # rows of runs with nothing logged
    figures: dict  # file name -> matplotlib Figure

    @property
    def rows(self) -> list[dict]:
        return [row for _, group in self.groups for row in group]


def build_report(runs: list[Run], title: str) -> Report:
    if not runs:
        raise ReportError("no runs to report on")
    names = [r.name for r in runs]
    dupes = sorted({n for n in names if names.count(n) > 1})
    if dupes:
        raise ReportError(f"two runs are named {dupes[0]!r} (run directories need distinct names)")
    present = [r for r in runs if not r.missing]
    groups: dict[str, list[dict]] = {}
    for run in present:
        groups.setdefault(run.budget, []).append(summary(run))
    missing = [{"arm": r.name, "budget": r.budget, "status": "missing", "why": r.missing, "dir": str(r.dir)}
               for r in runs if r.missing]
    return Report(title, list(groups.items()), missing, build_figures(present) if present else {})


def write_report(runs: list[Run], out: str | Path, title: str = "mor-ds report") -> Report:
    """Write OUT/report.md, OUT/report.json and OUT/*.png; returns the report (figures closed after saving)."""
    report = build_report(runs, title)
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    for name, fig in report.figures.items():
        fig.savefig(out / name)
    unfinished = [r["arm"] for r in report.rows if r["status"] == "unfinished"]
    notes = [f"{len(report.rows)} of {len(runs)} runs logged training steps"
             + (f"; unfinished: {', '.join(unfinished)}" if unfinished else "")
             + (f"; missing: {', '.join(m['arm'] for m in report.missing)}" if report.missing else "") + "."]
    captions = {name: caption for name, (_, caption) in FIGURES.items() if name in report.figures}
    (out / REPORT_FILE).write_text(render(title, report.groups, report.missing, captions, notes))
    (out / JSON_FILE).write_text(json.dumps({"title": title, "groups": [{"budget": b, "rows": rows}
                                                                        for b, rows in report.groups],
                                             "missing": report.missing, "plots": list(captions)}, indent=2) + "\n")
    return report
