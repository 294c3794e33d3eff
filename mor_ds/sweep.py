"""Compute-matched sweeps: a YAML grid of arms -> one resolved config and one sbatch job per arm.

A sweep file (see slurm/sweeps/*.yaml and docs/slurm.md):

    name: isoflop-360m                  # W&B group, output directory name, job-name prefix
    output_dir: runs/sweeps/isoflop-360m   # optional; default runs/sweeps/<name>
    budget: {flops: 16.5e18}            # or {tokens: 20e9}; a list of values is one more grid axis
    grid:                               # the cartesian product, axes that do not apply to a family dropped
      family: [vanilla, recursive, mor]
      size: [360m]                      # 135m | 360m | 730m | 1.7b | tiny
      num_recursions: [2, 3, 4]         # Nr (recursive, mor)
      sharing: [middle_cycle]           # cycle | sequence | middle_cycle | middle_sequence (recursive, mor)
      router: [expert_choice]           # expert_choice | token_choice (mor)
      kv_mode: [cache]                  # cache | share (recursive, mor)
    arms:                               # optional explicit arms: {name, config: preset or YAML, set, slurm}
      - {name: mor-360m-nr3-mlp, config: mor-360m-nr3, set: {router.arch: mlp}}
    set: {train.micro_batch_size: 16}   # overrides for every arm (dotted keys)
    slurm: {nodes: 1, gpus_per_node: 4, cpus_per_task: 8, time: "24:00:00", partition: gpu}
    eval: {args: [--tasks, paper], slurm: {time: "04:00:00"}}   # optional eval job per arm, afterok
    estimate: {peak_tflops: 989, mfu: 0.4}   # for the estimated-hours column

Every arm gets the same training budget through the planner (`mor_ds.flops.plan_budget`): its steps are
written into the arm's config as train.max_steps, so the trainer and this table agree on the number.
Grid combinations that the config rules forbid (e.g. MoR with sequence sharing) are skipped and listed.

Submission is idempotent: OUTPUT_DIR/sweep-state.json records each submitted arm and its job ids as soon as
sbatch answers, and a re-run submits only the arms not recorded there. OUTPUT_DIR/sweep.json lists every arm of
the sweep with its budget and plan (what `mor-ds report --sweep OUTPUT_DIR` expects to find); `write_arms` writes it
and each arm's files without submitting, for running the arms without Slurm.
"""

from __future__ import annotations

import dataclasses
import itertools
import json
import math
import os
import re
import shlex
import shutil
import subprocess
import sys
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import yaml

from mor_ds.choices import KVMode, ModelFamily, RouterType, SharingStrategy
from mor_ds.config import Config, ConfigError, from_dict, load_config, merge, yaml_error, yaml_load
from mor_ds.flops import Plan, flops_per_token, param_counts, plan_budget
from mor_ds.models.sharing import paper_num_layers
from mor_ds.presets import PAPER_SIZES, preset_dict

SLURM_DIR = Path(__file__).resolve().parent.parent / "slurm"
TRAIN_TEMPLATE = SLURM_DIR / "train.sbatch"
EVAL_TEMPLATE = SLURM_DIR / "eval.sbatch"
STATE_FILE = "sweep-state.json"
MANIFEST_FILE = "sweep.json"
CONFIG_MARK = "# ---- configuration"
END_CONFIG_MARK = "# ---- no edits needed below ----"

SIZES = (*PAPER_SIZES, "tiny")
FAMILIES = tuple(ModelFamily)
RECURSIVE = (ModelFamily.RECURSIVE, ModelFamily.MOR)
# grid axes in naming order, and the families each applies to
AXES: dict[str, tuple[str, ...]] = {
    "family": FAMILIES,
    "size": FAMILIES,
    "num_recursions": RECURSIVE,
    "sharing": RECURSIVE,
    "router": (ModelFamily.MOR,),
    "kv_mode": RECURSIVE,
}
AXIS_DEFAULTS = {"num_recursions": 2, "sharing": SharingStrategy.MIDDLE_CYCLE, "router": RouterType.EXPERT_CHOICE,
                 "kv_mode": KVMode.CACHE}
TOP_KEYS = ("name", "output_dir", "budget", "grid", "arms", "set", "slurm", "eval", "estimate")


class SweepError(ValueError):
    """A bad sweep file or a failed submission; one line naming the file, key or arm."""


# --------------------------------------------------------------------------------------------
# resources


@dataclass(frozen=True)
class SlurmSpec:
    """sbatch resources of one job. tasks_per_node 0 = one task per GPU."""

    nodes: int = 1
    gpus_per_node: int = 8
    tasks_per_node: int = 0
    cpus_per_task: int = 8
    time: str = "24:00:00"
    partition: str = ""
    account: str = ""
    qos: str = ""
    signal_seconds: int = 600  # SIGUSR1 this long before the time limit: checkpoint and requeue
    sbatch_args: tuple[str, ...] = ()  # more directives, e.g. ("--constraint=h100", "--exclusive")
    env: tuple[tuple[str, str], ...] = ()  # exported in the job, e.g. (("NCCL_SOCKET_IFNAME", "ib0"),)
    command: str = ""  # the mor-ds command in the job; empty = this installation's

    @property
    def ntasks_per_node(self) -> int:
        return self.tasks_per_node or self.gpus_per_node or 1

    @property
    def world_size(self) -> int:
        return self.nodes * self.ntasks_per_node

    @classmethod
    def parse(cls, data: Any, where: str, base: SlurmSpec | None = None) -> SlurmSpec:
        if data is None:
            return base or cls()
        if not isinstance(data, dict):
            raise SweepError(f"{where}: expected a mapping of sbatch settings, got {data!r}")
        known = {f.name: f for f in dataclasses.fields(cls)}
        values = dataclasses.asdict(base or cls())
        for key, value in data.items():
            if key not in known:
                raise SweepError(f"{where}.{key}: unknown key (known: {', '.join(known)})")
            default = getattr(cls(), key)
            if key == "env":
                if not isinstance(value, dict):
                    raise SweepError(f"{where}.env: expected a mapping NAME: value, got {value!r}")
                value = tuple((str(k), str(v)) for k, v in {**dict(values["env"]), **value}.items())
            elif key == "sbatch_args":
                if not isinstance(value, list) or not all(isinstance(v, str) and v.startswith("-") for v in value):
                    raise SweepError(f"{where}.sbatch_args: expected a list of sbatch flags like \"--qos=high\"")
                value = tuple(value)
            elif isinstance(default, int) and not isinstance(default, bool):
                if isinstance(value, bool) or not isinstance(value, int) or value < 0:
                    raise SweepError(f"{where}.{key}={value!r}: expected an integer >= 0")
            elif not isinstance(value, str):
                raise SweepError(f"{where}.{key}={value!r}: expected a string")
            values[key] = value
        spec = cls(**values)
        if spec.nodes < 1:
            raise SweepError(f"{where}.nodes={spec.nodes}: must be >= 1")
        if not re.fullmatch(r"(\d+-)?\d+(:\d+){0,2}|\d+", spec.time):
            raise SweepError(f"{where}.time={spec.time!r}: expected minutes, [D-]HH:MM:SS or MM:SS")
        return spec

    def directives(self, job_name: str, output: Path | None) -> list[str]:
        lines = [f"--job-name={job_name}", f"--nodes={self.nodes}", f"--ntasks-per-node={self.ntasks_per_node}",
                 f"--gpus-per-node={self.gpus_per_node}", f"--cpus-per-task={self.cpus_per_task}",
                 f"--time={self.time}"]
        lines += [f"--{key}={getattr(self, key)}" for key in ("partition", "account", "qos") if getattr(self, key)]
        if output is not None:
            lines.append(f"--output={output}")
        return lines + list(self.sbatch_args)


def time_limit_seconds(text: str) -> int:
    """Slurm's time formats: minutes, MM:SS, HH:MM:SS, D-HH[:MM[:SS]]."""
    days, _, rest = text.rpartition("-")
    parts = [int(p) for p in rest.split(":")]
    if days:
        parts += [0] * (3 - len(parts))
        return int(days) * 86400 + parts[0] * 3600 + parts[1] * 60 + parts[2]
    if len(parts) == 1:
        return parts[0] * 60
    if len(parts) == 2:
        return parts[0] * 60 + parts[1]
    return parts[0] * 3600 + parts[1] * 60 + parts[2]


# --------------------------------------------------------------------------------------------
# the sweep


@dataclass
class Arm:
    name: str
    cfg: Config
    plan: Plan
    slurm: SlurmSpec
    source: str  # preset name or config file it was built from

    @property
    def gpus(self) -> int:
        return self.slurm.nodes * self.slurm.gpus_per_node


@dataclass
class Sweep:
    name: str
    path: Path
    output_dir: Path
    budget_kind: str  # "flops" | "tokens"
    arms: list[Arm]
    skipped: list[tuple[str, str]] = field(default_factory=list)  # (grid arm, why)
    eval_args: list[str] | None = None  # None = no eval jobs
    eval_slurm: SlurmSpec | None = None
    peak_tflops: float = 989.0
    mfu: float = 0.4

    def arm_dir(self, arm: Arm) -> Path:
        return self.output_dir / arm.name

    def estimated_hours(self, arm: Arm) -> float | None:
        """Wall-clock hours at `mfu` of `peak_tflops` per GPU (exact FLOPs: forward + backward)."""
        if arm.gpus == 0:
            return None
        total = arm.plan.tokens * flops_per_token(arm.cfg, "exact")
        return total / (arm.gpus * self.peak_tflops * 1e12 * self.mfu) / 3600


def _nested(key: str, value: Any, where: str) -> dict[str, Any]:
    if not key or any(not part for part in key.split(".")):
        raise SweepError(f"{where}: bad key {key!r} (dotted config keys, e.g. train.micro_batch_size)")
    out: dict[str, Any] = {}
    node = out
    parts = key.split(".")
    for part in parts[:-1]:
        node = node.setdefault(part, {})
    node[parts[-1]] = value
    return out


def _overrides(data: Any, where: str) -> dict[str, Any]:
    """A `set:` mapping (dotted keys, or nested mappings) as one nested dict."""
    if data is None:
        return {}
    if not isinstance(data, dict):
        raise SweepError(f"{where}: expected a mapping of config keys to values, got {data!r}")
    out: dict[str, Any] = {}
    for key, value in data.items():
        out = merge(out, _nested(str(key), value, f"{where}.{key}"))
    return out


def _as_list(value: Any) -> list[Any]:
    return list(value) if isinstance(value, (list, tuple)) else [value]


def _parse_budget(data: Any, where: str) -> tuple[str, list[float], str | None]:
    if not isinstance(data, dict):
        raise SweepError(f"{where}: expected a mapping like {{flops: 16.5e18}} or {{tokens: 20e9}}")
    unknown = set(data) - {"flops", "tokens", "convention"}
    if unknown:
        raise SweepError(f"{where}.{sorted(unknown)[0]}: unknown key (known: flops, tokens, convention)")
    kinds = [k for k in ("flops", "tokens") if k in data]
    if len(kinds) != 1:
        raise SweepError(f"{where}: give exactly one of flops or tokens")
    kind = kinds[0]
    values = []
    for raw in _as_list(data[kind]):
        try:
            value = float(raw)
        except (TypeError, ValueError):
            raise SweepError(f"{where}.{kind}={raw!r}: not a number") from None
        if not value > 0 or not math.isfinite(value):
            raise SweepError(f"{where}.{kind}={raw!r}: must be a positive number")
        values.append(value)
    convention = data.get("convention")
    if convention not in (None, "exact", "paper"):
        raise SweepError(f"{where}.convention={convention!r}: one of exact, paper")
    return kind, values, convention


def _grid_axes(data: Any, where: str) -> dict[str, list[Any]]:
    if not isinstance(data, dict):
        raise SweepError(f"{where}: expected a mapping of axes ({', '.join(AXES)}) to lists of values")
    allowed: dict[str, tuple[Any, ...] | None] = {"family": FAMILIES, "size": SIZES, "sharing": tuple(SharingStrategy),
                                                  "router": tuple(RouterType), "kv_mode": tuple(KVMode),
                                                  "num_recursions": None}
    axes: dict[str, list[Any]] = {}
    for key, raw in data.items():
        if key not in AXES:
            raise SweepError(f"{where}.{key}: unknown axis (known: {', '.join(AXES)})")
        values = _as_list(raw)
        if not values:
            raise SweepError(f"{where}.{key}: empty list")
        for value in values:
            choices = allowed[key]
            if choices is None:
                if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                    raise SweepError(f"{where}.{key}: {value!r} is not an integer >= 1")
            elif value not in choices:
                raise SweepError(f"{where}.{key}: unknown value {value!r} (one of {', '.join(map(str, choices))})")
        axes[key] = values
    for key in ("family", "size"):
        if key not in axes:
            raise SweepError(f"{where}: the grid needs a {key} axis")
    return axes


def _grid_point(point: dict[str, Any]) -> tuple[str, str, dict[str, Any]]:
    """(arm name, preset name, config overlay) of one grid point."""
    family, size = point["family"], point["size"]
    nr, sharing = point["num_recursions"], point["sharing"]
    tc, kvshare = point["router"] == RouterType.TOKEN_CHOICE, point["kv_mode"] == KVMode.SHARE
    stem = f"tiny-{family}" if size == "tiny" else f"{family}-{size}"
    if family == ModelFamily.VANILLA:
        return stem, stem, {}
    preset = stem + f"-nr{nr}" + ("-tc" if tc else "") + ("-kvshare" if kvshare else "")
    overlay: dict[str, Any] = {}
    name = preset
    if sharing != SharingStrategy.MIDDLE_CYCLE:
        base_layers = preset_dict("tiny-vanilla" if size == "tiny" else f"vanilla-{size}")["model"]["num_layers"]
        overlay = {"model": {"sharing": sharing, "num_layers": paper_num_layers(base_layers, nr, sharing)}}
        name = f"{preset}-{sharing.replace('_', '')}"
    return name, preset, overlay


def _expand_grid(axes: dict[str, list[Any]]) -> list[tuple[str, str, dict[str, Any]]]:
    points, seen = [], set()
    names = list(AXES)
    for combo in itertools.product(*(axes.get(a, [AXIS_DEFAULTS.get(a)]) for a in names)):
        point = dict(zip(names, combo))
        # axes that do not apply to the family take their default, so duplicates collapse
        point = {a: (v if point["family"] in AXES[a] else AXIS_DEFAULTS[a]) for a, v in point.items()}
        key = tuple(point[a] for a in names)
        if key not in seen:
            seen.add(key)
            points.append(_grid_point(point))
    return points


def _budget_suffix(value: float, kind: str) -> str:
    return f"{kind[0]}{value:.3g}".replace("+", "")


def load_sweep(path: str | os.PathLike) -> Sweep:
    """Parse, expand and budget-match a sweep file; SweepError/ConfigError name the key or arm at fault."""
    path = Path(path)
    if not path.is_file():
        raise SweepError(f"sweep file {path}: not found")
    try:
        data = yaml_load(path.read_text())
    except yaml.YAMLError as exc:
        raise SweepError(f"sweep file {path}: invalid YAML at {yaml_error(exc)}") from None
    if not isinstance(data, dict):
        raise SweepError(f"sweep file {path}: expected a mapping at the top level")
    for key in data:
        if key not in TOP_KEYS:
            raise SweepError(f"{path}: {key}: unknown key (known: {', '.join(TOP_KEYS)})")
    name = data.get("name") or path.stem
    if not isinstance(name, str) or not re.fullmatch(r"[A-Za-z0-9][A-Za-z0-9._-]*", name):
        raise SweepError(f"{path}: name={name!r}: letters, digits, '.', '_' and '-' only")
    if "budget" not in data:
        raise SweepError(f"{path}: budget: missing (e.g. budget: {{flops: 16.5e18}})")
    kind, budgets, convention = _parse_budget(data["budget"], f"{path}: budget")
    common = _overrides(data.get("set"), f"{path}: set")
    slurm = SlurmSpec.parse(data.get("slurm"), f"{path}: slurm")

    # (arm name, source, config dict before budget, slurm spec)
    candidates: list[tuple[str, str, dict[str, Any], SlurmSpec]] = []
    skipped: list[tuple[str, str]] = []
    if data.get("grid") is not None:
        for arm_name, preset, overlay in _expand_grid(_grid_axes(data["grid"], f"{path}: grid")):
            base = merge(preset_dict(preset), overlay)
            try:
                from_dict(base)
            except ConfigError as exc:  # a combination the config rules forbid: skip it, say why
                skipped.append((arm_name, str(exc)))
                continue
            candidates.append((arm_name, preset, base, slurm))
    for i, arm in enumerate(data.get("arms") or []):
        where = f"{path}: arms[{i}]"
        if not isinstance(arm, dict):
            raise SweepError(f"{where}: expected a mapping with name, config, set, slurm")
        unknown = set(arm) - {"name", "config", "set", "slurm"}
        if unknown:
            raise SweepError(f"{where}.{sorted(unknown)[0]}: unknown key (known: name, config, set, slurm)")
        if not arm.get("config"):
            raise SweepError(f"{where}: config: missing (a preset name or a YAML file)")
        source = str(arm["config"])
        config_path = path.parent / source
        spec = str(config_path) if source.endswith((".yaml", ".yml")) else source
        try:
            base = load_config(spec).to_dict()
        except ConfigError as exc:
            raise SweepError(f"{where}: {exc}") from None
        base = merge(base, _overrides(arm.get("set"), f"{where}.set"))
        arm_name = str(arm.get("name") or Path(source).stem)
        candidates.append((arm_name, source, base, SlurmSpec.parse(arm.get("slurm"), f"{where}.slurm", slurm)))
    if not candidates:
        reasons = "; ".join(f"{n}: {why}" for n, why in skipped[:3])
        raise SweepError(f"{path}: no arms (give grid: or arms:)" + (f"; all grid points invalid: {reasons}"
                                                                      if skipped else ""))

    arms: list[Arm] = []
    for arm_name, source, base, spec in candidates:
        for budget in budgets:
            full_name = arm_name + (f"-{_budget_suffix(budget, kind)}" if len(budgets) > 1 else "")
            arms.append(_budgeted_arm(full_name, source, base, common, spec, kind, budget, convention, name))
    names = [a.name for a in arms]
    dupes = sorted({n for n in names if names.count(n) > 1})
    if dupes:
        raise SweepError(f"{path}: arm name {dupes[0]!r} appears twice (give explicit arms distinct names)")
    for arm in arms:
        if not re.fullmatch(r"[A-Za-z0-9][A-Za-z0-9._-]*", arm.name):
            raise SweepError(f"{path}: arm name {arm.name!r}: letters, digits, '.', '_' and '-' only")

    eval_args, eval_slurm = None, None
    if data.get("eval") is not None:
        ev = data["eval"]
        if not isinstance(ev, dict) or set(ev) - {"args", "slurm"}:
            raise SweepError(f"{path}: eval: expected a mapping with args (list) and slurm")
        eval_args = [str(a) for a in _as_list(ev.get("args") or [])]
        if any(not a or any(c.isspace() for c in a) for a in eval_args):
            raise SweepError(f"{path}: eval.args: one word per list item (no spaces), e.g. [--tasks, paper]")
        eval_slurm = SlurmSpec.parse(ev.get("slurm"), f"{path}: eval.slurm",
                                     dataclasses.replace(slurm, nodes=1, gpus_per_node=min(slurm.gpus_per_node, 1),
                                                         tasks_per_node=1, time="04:00:00"))
    estimate = data.get("estimate") or {}
    if not isinstance(estimate, dict) or set(estimate) - {"peak_tflops", "mfu"}:
        raise SweepError(f"{path}: estimate: expected a mapping with peak_tflops and mfu")
    peak, mfu = estimate.get("peak_tflops", 989.0), estimate.get("mfu", 0.4)
    if not (isinstance(peak, (int, float)) and peak > 0 and isinstance(mfu, (int, float)) and 0 < mfu <= 1):
        raise SweepError(f"{path}: estimate: peak_tflops must be > 0 and mfu in (0, 1]")
    output_dir = Path(data.get("output_dir") or Path("runs") / "sweeps" / name).absolute()
    return Sweep(name=name, path=path, output_dir=output_dir, budget_kind=kind, arms=arms, skipped=skipped,
                 eval_args=eval_args, eval_slurm=eval_slurm, peak_tflops=float(peak), mfu=float(mfu))


def _budgeted_arm(name: str, source: str, base: dict[str, Any], common: dict[str, Any], spec: SlurmSpec,
                  kind: str, budget: float, convention: str | None, group: str) -> Arm:
    data = merge(base, common)
    data = merge(data, {"name": name, "wandb": {"group": group, "name": name}})
    try:
        cfg = from_dict(data)
    except ConfigError as exc:
        raise SweepError(f"arm {name}: {exc}") from None
    try:
        plan = plan_budget(cfg, **{kind: budget}, convention=convention)
    except ConfigError as exc:
        raise SweepError(f"arm {name}: {exc}") from None
    if spec.signal_seconds >= time_limit_seconds(spec.time):
        raise SweepError(f"arm {name}: slurm.signal_seconds={spec.signal_seconds} is not below slurm.time="
                         f"{spec.time}: the checkpoint-and-requeue signal would come at once")
    t = cfg.train
    per_step = t.micro_batch_size * spec.world_size
    if t.global_batch_size % per_step:
        raise SweepError(f"arm {name}: train.global_batch_size={t.global_batch_size} is not a multiple of "
                         f"train.micro_batch_size={t.micro_batch_size} x {spec.world_size} processes "
                         f"({spec.nodes} node(s) x {spec.ntasks_per_node} tasks)")
    # the planned steps decide the run; the trainer then needs no planner of its own to agree with this table
    cfg.train.max_steps, cfg.train.max_tokens, cfg.train.max_flops = plan.steps, 0, 0.0
    cfg.train.flops_convention = plan.convention
    return Arm(name=name, cfg=cfg, plan=plan, slurm=spec, source=source)


# --------------------------------------------------------------------------------------------
# rendering


def default_command() -> str:
    """This installation's `mor-ds`, so jobs run the same code and venv as the sweep command."""
    script = Path(sys.executable).parent / "mor-ds"
    return shlex.quote(str(script)) if script.is_file() else f"{shlex.quote(sys.executable)} -m mor_ds.cli"


def render_script(template: str, directives: list[str], settings: dict[str, str], extra_env: dict[str, str],
                  banner: str = "") -> str:
    """The template with its #SBATCH block replaced by `directives`, each `NAME=${NAME:-…}` line of its
    configuration section for a NAME in `settings` fixed to that value, `extra_env` exported after it, and
    `banner` as a comment under the #! line."""
    lines = template.splitlines()
    sbatch = [i for i, line in enumerate(lines) if line.startswith("#SBATCH")]
    try:
        start, end = lines.index(next(l for l in lines if l.startswith(CONFIG_MARK))), lines.index(END_CONFIG_MARK)
    except (StopIteration, ValueError):
        raise SweepError(f"sbatch template: no '{CONFIG_MARK} …' / '{END_CONFIG_MARK}' section") from None
    if not sbatch:
        raise SweepError("sbatch template: no #SBATCH lines")
    pending = dict(settings)
    for i in range(start, end):
        match = re.fullmatch(r"([A-Z_][A-Z0-9_]*)=\$\{\1:-.*\}", lines[i])
        if match and match.group(1) in pending:
            lines[i] = f"{match.group(1)}={shlex.quote(pending.pop(match.group(1)))}"
    if pending:
        raise SweepError(f"sbatch template: no configuration line for {', '.join(sorted(pending))}")
    exports = [f"export {k}={shlex.quote(v)}" for k, v in extra_env.items()]
    lines[end:end] = exports + ([""] if exports else [])
    header = [f"#SBATCH {d}" for d in directives]
    if banner and lines[0].startswith("#!"):
        lines[1:1] = [f"# {banner}"]
        sbatch = [i + 1 for i in sbatch]
    out = lines[:sbatch[0]] + header + [l for i, l in enumerate(lines) if i > sbatch[0] and i not in sbatch]
    return "\n".join(out) + "\n"


def _job_name(sweep: Sweep, arm: Arm, suffix: str = "") -> str:
    return f"{sweep.name}.{arm.name}{suffix}"


def render_train(sweep: Sweep, arm: Arm, template: str | None = None) -> str:
    arm_dir = sweep.arm_dir(arm)
    spec = arm.slurm
    directives = spec.directives(_job_name(sweep, arm), arm_dir / "slurm-%j.out")
    directives[6:6] = [f"--signal=B:USR1@{spec.signal_seconds}", "--requeue", "--open-mode=append"]
    settings = {"MOR_DS_CONFIG": str(arm_dir / "config.yaml"), "MOR_DS_RUN_DIR": str(arm_dir),
                "MOR_DS_CMD": spec.command or default_command()}
    return render_script(template or TRAIN_TEMPLATE.read_text(), directives, settings, dict(spec.env),
                         banner=f"rendered by `mor-ds sweep {sweep.path}` for arm {arm.name}")


def render_eval(sweep: Sweep, arm: Arm, template: str | None = None) -> str:
    assert sweep.eval_slurm is not None and sweep.eval_args is not None
    arm_dir = sweep.arm_dir(arm)
    spec = sweep.eval_slurm
    directives = spec.directives(_job_name(sweep, arm, ".eval"), arm_dir / "slurm-eval-%j.out")
    directives.append("--open-mode=append")
    settings = {"MOR_DS_RUN_DIR": str(arm_dir), "MOR_DS_CMD": spec.command or default_command(),
                "MOR_DS_EVAL_ARGS": " ".join(sweep.eval_args)}
    return render_script(template or EVAL_TEMPLATE.read_text(), directives, settings, dict(spec.env),
                         banner=f"rendered by `mor-ds sweep {sweep.path}` for arm {arm.name}")


# --------------------------------------------------------------------------------------------
# dry-run table


def _si(value: float) -> str:
    for unit, scale in (("E", 1e18), ("P", 1e15), ("T", 1e12), ("G", 1e9), ("M", 1e6), ("k", 1e3)):
        if abs(value) >= scale:
            return f"{value / scale:.3g}{unit}"
    return f"{value:.3g}"


def table(sweep: Sweep) -> str:
    head = ("arm", "params", "non-emb", "steps", "tokens", "FLOPs", "nodes x gpus", "est. h")
    rows = []
    for arm in sweep.arms:
        counts = param_counts(arm.cfg)
        hours = sweep.estimated_hours(arm)
        rows.append((arm.name, _si(counts.unique), _si(counts.unique_non_embedding), str(arm.plan.steps),
                     _si(arm.plan.tokens), f"{arm.plan.flops:.3g}",
                     f"{arm.slurm.nodes} x {arm.slurm.gpus_per_node}", "-" if hours is None else f"{hours:.1f}"))
    widths = [max(len(r[i]) for r in (head, *rows)) for i in range(len(head))]
    fmt = lambda r: "  ".join(c.ljust(w) if i == 0 else c.rjust(w) for i, (c, w) in enumerate(zip(r, widths)))
    convention = sweep.arms[0].plan.convention
    lines = [f"sweep {sweep.name}: {len(sweep.arms)} arms, budget {sweep.budget_kind} "
             f"({convention} convention), W&B group {sweep.name}, output {sweep.output_dir}",
             fmt(head), fmt(tuple("-" * w for w in widths)), *map(fmt, rows)]
    lines.append(f"(est. h: exact training FLOPs at {sweep.mfu:.0%} MFU of {sweep.peak_tflops:g} TFLOP/s per GPU)")
    for name, why in sweep.skipped:
        lines.append(f"skipped {name}: {why}")
    return "\n".join(lines)


# --------------------------------------------------------------------------------------------
# submission


@dataclass
class SubmitState:
    """OUTPUT_DIR/sweep-state.json: arm -> {job_id, eval_job_id, submitted}; written after every sbatch."""

    path: Path
    arms: dict[str, dict[str, Any]] = field(default_factory=dict)

    @classmethod
    def load(cls, path: Path) -> SubmitState:
        if not path.exists():
            return cls(path)
        try:
            data = json.loads(path.read_text())
            return cls(path, dict(data["arms"]))
        except (json.JSONDecodeError, KeyError, TypeError) as exc:
            raise SweepError(f"{path}: unreadable sweep state ({exc.__class__.__name__}); fix or remove it") from None

    def save(self, sweep: str) -> None:
        tmp = self.path.with_name(f".{self.path.name}.tmp")
        tmp.write_text(json.dumps({"sweep": sweep, "arms": self.arms}, indent=2) + "\n")
        tmp.replace(self.path)


def sbatch(script: Path, dependency: str | None = None) -> str:
    """Submit `script`; the job id, or SweepError with sbatch's own message."""
    cmd = ["sbatch", "--parsable"] + ([f"--dependency={dependency}", "--kill-on-invalid-dep=yes"] if dependency
                                      else []) + [str(script)]
    proc = subprocess.run(cmd, capture_output=True, text=True, cwd=script.parent)
    if proc.returncode:
        message = (proc.stderr.strip() or proc.stdout.strip() or f"exit code {proc.returncode}").splitlines()[-1]
        raise SweepError(message)
    return proc.stdout.strip().split(";")[0]


def _write(path: Path, text: str, mode: int | None = None) -> None:
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_text(text)
    if mode is not None:
        tmp.chmod(mode)
    tmp.replace(path)


def manifest(sweep: Sweep) -> dict[str, Any]:
    """What OUTPUT_DIR/sweep.json holds: the sweep and every arm with its budget and plan, in sweep order."""
    return {"sweep": sweep.name, "file": str(sweep.path.absolute()), "budget_kind": sweep.budget_kind,
            "arms": [{"name": arm.name, "dir": str(sweep.arm_dir(arm)), "source": arm.source, **arm.plan.to_dict()}
                     for arm in sweep.arms],
            "skipped": [{"name": name, "why": why} for name, why in sweep.skipped]}


def write_manifest(sweep: Sweep) -> Path:
    sweep.output_dir.mkdir(parents=True, exist_ok=True)
    path = sweep.output_dir / MANIFEST_FILE
    _write(path, json.dumps(manifest(sweep), indent=2) + "\n")
    return path


def _write_arm(sweep: Sweep, arm: Arm) -> Path:
    """OUTPUT_DIR/<arm>/{config.yaml, plan.json, train.sbatch[, eval.sbatch]}."""
    arm_dir = sweep.arm_dir(arm)
    arm_dir.mkdir(parents=True, exist_ok=True)
    _write(arm_dir / "config.yaml", arm.cfg.to_yaml())
    _write(arm_dir / "plan.json", json.dumps(arm.plan.to_dict(), indent=2) + "\n")
    _write(arm_dir / "train.sbatch", render_train(sweep, arm), 0o755)
    if sweep.eval_args is not None:
        _write(arm_dir / "eval.sbatch", render_eval(sweep, arm), 0o755)
    return arm_dir


def write_arms(sweep: Sweep) -> list[Path]:
    """Write sweep.json and every arm's config, plan and job scripts; submit nothing. An arm is then trained with
    `mor-ds train --config OUTPUT_DIR/<arm>/config.yaml --run-dir OUTPUT_DIR/<arm>` (or its train.sbatch)."""
    write_manifest(sweep)
    return [_write_arm(sweep, arm) for arm in sweep.arms]


def submit(sweep: Sweep, resubmit: tuple[str, ...] = (), echo=print) -> SubmitState:
    """Write each arm's config and scripts and submit the arms not yet recorded in the state file.

    On an sbatch failure: SweepError naming the arm, sbatch's message and the arms submitted so far (with job
    ids); those stay recorded, so the next run submits only the rest."""
    if shutil.which("sbatch") is None:
        raise SweepError("sbatch not found on PATH: run `mor-ds sweep` where Slurm's client commands are "
                         "installed, or use --dry-run")
    unknown = sorted(set(resubmit) - {a.name for a in sweep.arms})
    if unknown:
        raise SweepError(f"--resubmit {unknown[0]}: no such arm (arms: {', '.join(a.name for a in sweep.arms)})")
    write_manifest(sweep)
    state = SubmitState.load(sweep.output_dir / STATE_FILE)
    for name in resubmit:
        state.arms.pop(name, None)
    for arm in sweep.arms:
        record = state.arms.get(arm.name)
        want_eval = sweep.eval_args is not None
        if record and (record.get("eval_job_id") or not want_eval):
            echo(f"{arm.name}: already submitted as job {record['job_id']}"
                 + (f" (eval job {record['eval_job_id']})" if record.get("eval_job_id") else "") + "; skipped")
            continue
        arm_dir = sweep.arm_dir(arm)
        try:
            if record is None:
                _write_arm(sweep, arm)
                job = sbatch(arm_dir / "train.sbatch")
                record = {"job_id": job, "eval_job_id": None,
                          "submitted": datetime.now(timezone.utc).isoformat(timespec="seconds")}
                state.arms[arm.name] = record
                state.save(sweep.name)
                echo(f"{arm.name}: submitted job {job} ({arm.plan.steps} steps, run dir {arm_dir})")
            if want_eval:
                _write(arm_dir / "eval.sbatch", render_eval(sweep, arm), 0o755)
                record["eval_job_id"] = sbatch(arm_dir / "eval.sbatch", dependency=f"afterok:{record['job_id']}")
                state.save(sweep.name)
                echo(f"{arm.name}: submitted eval job {record['eval_job_id']} (after job {record['job_id']} succeeds)")
        except SweepError as exc:
            done = ", ".join(f"{n}={r['job_id']}" for n, r in state.arms.items()) or "none"
            raise SweepError(f"arm {arm.name}: sbatch failed: {exc}; submitted so far: {done} (recorded in "
                             f"{state.path}; re-run to submit the rest)") from None
    return state
