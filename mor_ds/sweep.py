"""Compute-matched sweeps: a YAML grid of arms -> one resolved config and one sbatch job per arm.

A sweep file (see slurm/sweeps/*.yaml and docs/slurm.md) is read into `SweepFile`, a tree of dataclasses, by the
config system's own loader (`mor_ds.config.from_mapping`: type checks and one-line errors naming the key):

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
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path
from typing import Annotated, Any, ClassVar, Literal

import yaml

from mor_ds.choices import KVMode, ModelFamily, RouterType, SharingStrategy
from mor_ds.config import Config, ConfigError, from_dict, from_mapping, load_config, merge, yaml_error, yaml_load
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
NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]*")  # sweep and arm names: directory and job names

SIZES = (*PAPER_SIZES, "tiny")
RECURSIVE_FAMILIES = (ModelFamily.RECURSIVE, ModelFamily.MOR)


class SweepError(ValueError):
    """A bad sweep file or a failed submission; one line naming the file, key or arm."""


# --------------------------------------------------------------------------------------------
# readers of the values whose shape a type alone cannot say (Annotated[T, reader] fields)


def _as_list(value: Any) -> list[Any]:
    return list(value) if isinstance(value, (list, tuple)) else [value]


def _one_of(choices: tuple[Any, ...]) -> Callable[[Any, str], list[Any]]:
    """A value or a non-empty list of values, each one of `choices` (read as the choice itself)."""

    def read(value: Any, key: str) -> list[Any]:
        values = _as_list(value)
        if not values:
            raise ConfigError(f"{key}: empty list")
        for v in values:
            if v not in choices:
                raise ConfigError(f"{key}: unknown value {v!r} (one of {', '.join(map(str, choices))})")
        return [next(c for c in choices if c == v) for v in values]

    return read


def _counts(value: Any, key: str) -> list[int]:
    values = _as_list(value)
    if not values:
        raise ConfigError(f"{key}: empty list")
    for v in values:
        if isinstance(v, bool) or not isinstance(v, int) or v < 1:
            raise ConfigError(f"{key}: {v!r} is not an integer >= 1")
    return values


def _positive_numbers(value: Any, key: str) -> list[float]:
    out = []
    for raw in _as_list(value):
        try:
            number = float(raw)
        except (TypeError, ValueError):
            raise ConfigError(f"{key}={raw!r}: not a number") from None
        if not number > 0 or not math.isfinite(number):
            raise ConfigError(f"{key}={raw!r}: must be a positive number")
        out.append(number)
    return out


def _words(value: Any, key: str) -> list[str]:
    words = [str(a) for a in _as_list(value if value is not None else [])]
    if any(not a or any(c.isspace() for c in a) for a in words):
        raise ConfigError(f"{key}: one word per list item (no spaces), e.g. [--tasks, paper]")
    return words


def _sbatch_flags(value: Any, key: str) -> list[str]:
    if not isinstance(value, list) or not all(isinstance(v, str) and v.startswith("-") for v in value):
        raise ConfigError(f"{key}: expected a list of sbatch flags like \"--qos=high\"")
    return list(value)


def _environment(value: Any, key: str) -> dict[str, str]:
    if not isinstance(value, dict):
        raise ConfigError(f"{key}: expected a mapping NAME: value, got {value!r}")
    return {str(k): str(v) for k, v in value.items()}


def _nested(key: str, value: Any, where: str) -> dict[str, Any]:
    if not key or any(not part for part in key.split(".")):
        raise ConfigError(f"{where}: bad key {key!r} (dotted config keys, e.g. train.micro_batch_size)")
    out: dict[str, Any] = {}
    node = out
    parts = key.split(".")
    for part in parts[:-1]:
        node = node.setdefault(part, {})
    node[parts[-1]] = value
    return out


def _overrides(value: Any, key: str) -> dict[str, Any]:
    """A `set:` mapping (dotted keys, or nested mappings) as one nested dict."""
    if value is None:
        return {}
    if not isinstance(value, dict):
        raise ConfigError(f"{key}: expected a mapping of config keys to values, got {value!r}")
    out: dict[str, Any] = {}
    for k, v in value.items():
        out = merge(out, _nested(str(k), v, f"{key}.{k}"))
    return out


# --------------------------------------------------------------------------------------------
# the sweep file


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
    sbatch_args: Annotated[list[str], _sbatch_flags] = field(default_factory=list)  # e.g. ["--exclusive"]
    env: Annotated[dict[str, str], _environment] = field(default_factory=dict)  # exported in the job
    command: str = ""  # the mor-ds command in the job; empty = this installation's

    @property
    def ntasks_per_node(self) -> int:
        return self.tasks_per_node or self.gpus_per_node or 1

    @property
    def world_size(self) -> int:
        return self.nodes * self.ntasks_per_node

    def check(self, where: str) -> SlurmSpec:
        for key in ("nodes", "gpus_per_node", "tasks_per_node", "cpus_per_task", "signal_seconds"):
            if getattr(self, key) < 0:
                raise ConfigError(f"{where}.{key}={getattr(self, key)!r}: expected an integer >= 0")
        if self.nodes < 1:
            raise ConfigError(f"{where}.nodes={self.nodes}: must be >= 1")
        if not re.fullmatch(r"(\d+-)?\d+(:\d+){0,2}|\d+", self.time):
            raise ConfigError(f"{where}.time={self.time!r}: expected minutes, [D-]HH:MM:SS or MM:SS")
        return self

    def override(self, data: dict[str, Any], where: str) -> SlurmSpec:
        """These settings with the keys of `data` replaced (`env` merged name by name), checked."""
        return from_mapping(SlurmSpec, merge(dataclasses.asdict(self), data), where).check(where)

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


@dataclass
class BudgetSpec:
    """The training budget of every arm: FLOPs or tokens, one value or a list (one more grid axis)."""

    flops: Annotated[list[float], _positive_numbers] = field(default_factory=list)
    tokens: Annotated[list[float], _positive_numbers] = field(default_factory=list)
    convention: Literal["exact", "paper"] | None = None  # FLOPs counting; None = each config's train.flops_convention

    @property
    def kind(self) -> str:
        return "flops" if self.flops else "tokens"

    @property
    def values(self) -> list[float]:
        return self.flops or self.tokens

    def check(self, where: str) -> None:
        if bool(self.flops) == bool(self.tokens):
            raise ConfigError(f"{where}: give exactly one of flops or tokens")


@dataclass
class GridSpec:
    """The cartesian product of the axes, in this order (arm names follow it). Axes that do not apply to a
    family (APPLIES_TO) take their default there, so their values collapse into one arm."""

    KEY_NOUN: ClassVar[str] = "axis"
    APPLIES_TO: ClassVar[dict[str, tuple[ModelFamily, ...]]] = {
        "num_recursions": RECURSIVE_FAMILIES, "sharing": RECURSIVE_FAMILIES, "router": (ModelFamily.MOR,),
        "kv_mode": RECURSIVE_FAMILIES}

    family: Annotated[list[ModelFamily], _one_of(tuple(ModelFamily))] = field(default_factory=list)
    size: Annotated[list[str], _one_of(SIZES)] = field(default_factory=list)
    num_recursions: Annotated[list[int], _counts] = field(default_factory=lambda: [2])
    sharing: Annotated[list[SharingStrategy], _one_of(tuple(SharingStrategy))] = field(
        default_factory=lambda: [SharingStrategy.MIDDLE_CYCLE])
    router: Annotated[list[RouterType], _one_of(tuple(RouterType))] = field(
        default_factory=lambda: [RouterType.EXPERT_CHOICE])
    kv_mode: Annotated[list[KVMode], _one_of(tuple(KVMode))] = field(default_factory=lambda: [KVMode.CACHE])

    def check(self, where: str) -> None:
        for key in ("family", "size"):
            if not getattr(self, key):
                raise ConfigError(f"{where}: the grid needs a {key} axis")

    def points(self) -> list[dict[str, Any]]:
        """The distinct grid points, each {axis: value}, in product order."""
        axes = [f.name for f in dataclasses.fields(self)]
        defaults = GridSpec()
        points, seen = [], set()
        for combo in itertools.product(*(getattr(self, a) for a in axes)):
            point = dict(zip(axes, combo))
            point = {a: v if point["family"] in self.APPLIES_TO.get(a, (point["family"],)) else getattr(defaults, a)[0]
                     for a, v in point.items()}
            key = tuple(point.values())
            if key not in seen:
                seen.add(key)
                points.append(point)
        return points


@dataclass
class ArmSpec:
    """An explicit arm: a preset name or a YAML file (relative to the sweep file), its overrides and resources."""

    config: str
    name: str = ""  # default: the config's name
    set: Annotated[dict[str, Any], _overrides] = field(default_factory=dict)
    slurm: dict[str, Any] = field(default_factory=dict)  # keys of the sweep's slurm settings to change


@dataclass
class EvalSpec:
    """A few-shot eval job after each arm's training job (afterok): `mor-ds eval` arguments and resources."""

    args: Annotated[list[str], _words] = field(default_factory=list)
    slurm: dict[str, Any] = field(default_factory=dict)  # default: one task on at most one GPU for 4 hours


@dataclass
class EstimateSpec:
    """For the estimated-hours column: exact training FLOPs at `mfu` of `peak_tflops` per GPU."""

    peak_tflops: float = 989.0
    mfu: float = 0.4

    def check(self, where: str) -> None:
        if not (self.peak_tflops > 0 and 0 < self.mfu <= 1):
            raise ConfigError(f"{where}: peak_tflops must be > 0 and mfu in (0, 1]")


@dataclass
class SweepFile:
    budget: BudgetSpec
    name: str = ""  # default: the file's stem
    output_dir: str = ""  # default: runs/sweeps/<name>
    grid: GridSpec | None = None
    arms: list[ArmSpec] | None = None
    set: Annotated[dict[str, Any], _overrides] = field(default_factory=dict)  # for every arm
    slurm: SlurmSpec = field(default_factory=SlurmSpec)
    eval: EvalSpec | None = None
    estimate: EstimateSpec = field(default_factory=EstimateSpec)

    def check(self) -> None:
        if self.name and not NAME.fullmatch(self.name):
            raise ConfigError(f"name={self.name!r}: letters, digits, '.', '_' and '-' only")
        self.budget.check("budget")
        if self.grid is not None:
            self.grid.check("grid")
        self.slurm.check("slurm")
        self.estimate.check("estimate")


def read_sweep_file(path: Path) -> SweepFile:
    """The sweep file as a SweepFile; SweepError naming the file and the key."""
    if not path.is_file():
        raise SweepError(f"sweep file {path}: not found")
    try:
        data = yaml_load(path.read_text())
    except yaml.YAMLError as exc:
        raise SweepError(f"sweep file {path}: invalid YAML at {yaml_error(exc)}") from None
    if not isinstance(data, dict):
        raise SweepError(f"sweep file {path}: expected a mapping at the top level")
    try:
        spec = from_mapping(SweepFile, data)
        spec.check()
    except ConfigError as exc:
        raise SweepError(f"{path}: {exc}") from None
    return spec


# --------------------------------------------------------------------------------------------
# the sweep


@dataclass
class Arm:
    name: str
    cfg: Config
    plan: Plan
    slurm: SlurmSpec
    source: str  # preset name or config file it was built from
    overrides: dict[str, Any] = field(default_factory=dict)  # dotted key -> value where cfg differs from source

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


def _grid_arm(point: dict[str, Any]) -> tuple[str, str, dict[str, Any]]:
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
        overlay = {"model": {"sharing": sharing.value, "num_layers": paper_num_layers(base_layers, nr, sharing)}}
        name = f"{preset}-{sharing.replace('_', '')}"
    return name, preset, overlay


def _budget_suffix(value: float, kind: str) -> str:
    return f"{kind[0]}{value:.3g}".replace("+", "")


def _flat(data: dict[str, Any], prefix: str = "") -> dict[str, Any]:
    out: dict[str, Any] = {}
    for key, value in data.items():
        if isinstance(value, dict):
            out.update(_flat(value, f"{prefix}{key}."))
        else:
            out[f"{prefix}{key}"] = value
    return out


def config_overrides(cfg: Config, source: dict[str, Any]) -> dict[str, Any]:
    """`--set` keys and values that turn the config `source` (a to_dict()) into `cfg`."""
    before = _flat(source)
    return {k: v for k, v in _flat(cfg.to_dict()).items() if k not in before or before[k] != v}


@dataclass
class _Candidate:
    name: str
    source: str
    base: dict[str, Any]  # config dict before the common overrides and the budget
    source_config: dict[str, Any]  # the source's resolved config (to_dict)
    slurm: SlurmSpec


def _grid_candidates(grid: GridSpec, slurm: SlurmSpec) -> tuple[list[_Candidate], list[tuple[str, str]]]:
    candidates, skipped = [], []
    for point in grid.points():
        arm_name, preset, overlay = _grid_arm(point)
        source = preset_dict(preset)
        base = merge(source, overlay)
        try:
            from_dict(base)
        except ConfigError as exc:  # a combination the config rules forbid: skip it, say why
            skipped.append((arm_name, str(exc)))
            continue
        candidates.append(_Candidate(arm_name, preset, base, from_dict(source).to_dict(), slurm))
    return candidates, skipped


def _explicit_candidates(spec: SweepFile, path: Path) -> list[_Candidate]:
    candidates = []
    for i, arm in enumerate(spec.arms or []):
        where = f"arms[{i}]"
        source = arm.config
        config = str(path.parent / source) if source.endswith((".yaml", ".yml")) else source
        try:
            resolved = load_config(config).to_dict()
        except ConfigError as exc:
            raise SweepError(f"{path}: {where}: {exc}") from None
        try:
            slurm = spec.slurm.override(arm.slurm, f"{where}.slurm")
        except ConfigError as exc:
            raise SweepError(f"{path}: {exc}") from None
        candidates.append(_Candidate(arm.name or Path(source).stem, source, merge(resolved, arm.set), resolved,
                                     slurm))
    return candidates


def load_sweep(path: str | os.PathLike) -> Sweep:
    """Read, expand and budget-match a sweep file; SweepError names the file and the key or arm at fault."""
    path = Path(path)
    spec = read_sweep_file(path)
    name = spec.name or path.stem
    if not NAME.fullmatch(name):
        raise SweepError(f"{path}: name={name!r}: letters, digits, '.', '_' and '-' only")
    candidates, skipped = _grid_candidates(spec.grid, spec.slurm) if spec.grid is not None else ([], [])
    candidates += _explicit_candidates(spec, path)
    if not candidates:
        reasons = "; ".join(f"{n}: {why}" for n, why in skipped[:3])
        raise SweepError(f"{path}: no arms (give grid: or arms:)" + (f"; all grid points invalid: {reasons}"
                                                                      if skipped else ""))

    budget = spec.budget
    arms: list[Arm] = []
    for c in candidates:
        for value in budget.values:
            full_name = c.name + (f"-{_budget_suffix(value, budget.kind)}" if len(budget.values) > 1 else "")
            arms.append(_budgeted_arm(full_name, c, spec.set, budget.kind, value, budget.convention, name))
    names = [a.name for a in arms]
    dupes = sorted({n for n in names if names.count(n) > 1})
    if dupes:
        raise SweepError(f"{path}: arm name {dupes[0]!r} appears twice (give explicit arms distinct names)")
    for arm in arms:
        if not NAME.fullmatch(arm.name):
            raise SweepError(f"{path}: arm name {arm.name!r}: letters, digits, '.', '_' and '-' only")

    eval_args, eval_slurm = None, None
    if spec.eval is not None:
        eval_args = spec.eval.args
        base = dataclasses.replace(spec.slurm, nodes=1, gpus_per_node=min(spec.slurm.gpus_per_node, 1),
                                   tasks_per_node=1, time="04:00:00")
        try:
            eval_slurm = base.override(spec.eval.slurm, "eval.slurm")
        except ConfigError as exc:
            raise SweepError(f"{path}: {exc}") from None
    output_dir = Path(spec.output_dir or Path("runs") / "sweeps" / name).absolute()
    return Sweep(name=name, path=path, output_dir=output_dir, budget_kind=budget.kind, arms=arms, skipped=skipped,
                 eval_args=eval_args, eval_slurm=eval_slurm, peak_tflops=spec.estimate.peak_tflops,
                 mfu=spec.estimate.mfu)


def _budgeted_arm(name: str, candidate: _Candidate, common: dict[str, Any], kind: str, budget: float,
                  convention: str | None, group: str) -> Arm:
    data = merge(candidate.base, common)
    data = merge(data, {"name": name, "wandb": {"group": group, "name": name}})
    try:
        cfg = from_dict(data)
    except ConfigError as exc:
        raise SweepError(f"arm {name}: {exc}") from None
    try:
        plan = plan_budget(cfg, **{kind: budget}, convention=convention)
    except ConfigError as exc:
        raise SweepError(f"arm {name}: {exc}") from None
    spec = candidate.slurm
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
    return Arm(name=name, cfg=cfg, plan=plan, slurm=spec, source=candidate.source,
               overrides=config_overrides(cfg, candidate.source_config))


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
        start, end = lines.index(next(x for x in lines if x.startswith(CONFIG_MARK))), lines.index(END_CONFIG_MARK)
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
    out = lines[:sbatch[0]] + header + [x for i, x in enumerate(lines) if i > sbatch[0] and i not in sbatch]
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

    def fmt(r: tuple[str, ...]) -> str:
        return "  ".join(c.ljust(w) if i == 0 else c.rjust(w) for i, (c, w) in enumerate(zip(r, widths)))

    convention = sweep.arms[0].plan.convention
    lines = [f"sweep {sweep.name}: {len(sweep.arms)} arms, budget {sweep.budget_kind} "
             f"({convention} convention), W&B group {sweep.name}, output {sweep.output_dir}",
             fmt(head), fmt(tuple("-" * w for w in widths)), *map(fmt, rows)]
    lines.append(f"(est. h: exact training FLOPs at {sweep.mfu:.0%} MFU of {sweep.peak_tflops:g} TFLOP/s per GPU)")
    for name, why in sweep.skipped:
        lines.append(f"skipped {name}: {why}")
    return "\n".join(lines)


def to_json(sweep: Sweep) -> dict[str, Any]:
    """The dry run for scripts (`mor-ds sweep --dry-run --json`): per arm its source config and the overrides that
    make its resolved config (`mor-ds train --config SOURCE --set KEY=VALUE …` reproduces it), its budget and
    resources."""
    arms = []
    for arm in sweep.arms:
        arms.append({"name": arm.name, "source": arm.source, "overrides": arm.overrides, "flops": arm.plan.flops,
                     "tokens": arm.plan.tokens, "steps": arm.plan.steps, "convention": arm.plan.convention,
                     "nodes": arm.slurm.nodes, "gpus_per_node": arm.slurm.gpus_per_node,
                     "world_size": arm.slurm.world_size, "run_dir": str(sweep.arm_dir(arm)),
                     "estimated_hours": sweep.estimated_hours(arm)})
    return {"sweep": sweep.name, "file": str(sweep.path), "output_dir": str(sweep.output_dir),
            "budget": sweep.budget_kind, "arms": arms,
            "skipped": [{"name": name, "reason": why} for name, why in sweep.skipped]}


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


# --------------------------------------------------------------------------------------------
# status


def slurm_states(job_ids: list[str]) -> dict[str, str]:
    """job id -> Slurm state (PENDING, RUNNING, COMPLETED, …): `scontrol show job` (queued jobs and those finished
    within MinJobAge), else `sacct` (when accounting is on), else "unknown"."""
    states: dict[str, str] = {}
    for job in job_ids:
        if shutil.which("scontrol"):
            out = subprocess.run(["scontrol", "show", "job", job], capture_output=True, text=True).stdout
            match = re.search(r"\bJobState=(\S+)", out)
            if match:
                states[job] = match.group(1)
                continue
        if shutil.which("sacct"):
            proc = subprocess.run(["sacct", "-n", "-X", "-P", "-o", "State", "-j", job], capture_output=True,
                                  text=True)
            lines = proc.stdout.split() if proc.returncode == 0 else []
            if lines:
                states[job] = lines[-1]
                continue
        states[job] = "unknown"
    return states


def _duration(seconds: float) -> str:
    seconds = int(seconds)
    days, rest = divmod(seconds, 86400)
    return (f"{days}-" if days else "") + f"{rest // 3600:02d}:{rest // 60 % 60:02d}:{rest % 60:02d}"


def arm_progress(sweep: Sweep, arm: Arm) -> dict[str, Any]:
    """What the arm's run dir says: last logged step (of the planned steps), loss, latest val loss, tokens/s and the
    ETA at that rate (queue time, eval and checkpoints not counted)."""
    from mor_ds.train.callbacks.metrics import METRICS_FILE, read_metrics

    path = sweep.arm_dir(arm) / METRICS_FILE
    records = read_metrics(path) if path.is_file() else []
    out: dict[str, Any] = {"step": 0, "steps": arm.plan.steps, "loss": None, "val_loss": None,
                           "tokens_per_s": None, "eta_s": None}
    if not records:
        return out
    last = records[-1]
    rates = [r["perf/tokens_per_s"] for r in records if r.get("perf/tokens_per_s")]
    vals = [r["val/loss"] for r in records if "val/loss" in r]
    out.update(step=last["step"], loss=last["loss"], val_loss=vals[-1] if vals else None,
               tokens_per_s=rates[-1] if rates else None)
    if out["tokens_per_s"]:
        out["eta_s"] = (arm.plan.steps - last["step"]) * arm.plan.tokens_per_step / out["tokens_per_s"]
    return out


def status(sweep: Sweep) -> list[dict[str, Any]]:
    """One row per arm: its jobs (from the state file) and their Slurm states, and its progress."""
    state = SubmitState.load(sweep.output_dir / STATE_FILE)
    jobs = [j for r in state.arms.values() for j in (r.get("job_id"), r.get("eval_job_id")) if j]
    states = slurm_states(jobs) if jobs else {}
    rows = []
    for arm in sweep.arms:
        record = state.arms.get(arm.name, {})
        job, eval_job = record.get("job_id"), record.get("eval_job_id")
        rows.append({"arm": arm.name, "job_id": job, "state": states.get(job, "not submitted") if job else
                     "not submitted", "eval_job_id": eval_job, "eval_state": states.get(eval_job) if eval_job else None,
                     **arm_progress(sweep, arm)})
    return rows


def status_table(sweep: Sweep, rows: list[dict[str, Any]]) -> str:
    head = ("arm", "job", "state", "step", "loss", "val loss", "tokens/s", "ETA", "eval job")
    def fmt_loss(x: float | None) -> str:
        return "-" if x is None else f"{x:.4f}"

    body = []
    for r in rows:
        eta = "done" if r["step"] >= r["steps"] else "-" if r["eta_s"] is None else _duration(r["eta_s"])
        body.append((r["arm"], r["job_id"] or "-", r["state"], f"{r['step']}/{r['steps']}", fmt_loss(r["loss"]),
                     fmt_loss(r["val_loss"]), "-" if r["tokens_per_s"] is None else _si(r["tokens_per_s"]), eta,
                     f"{r['eval_job_id']} {r['eval_state']}" if r["eval_job_id"] else "-"))
    widths = [max(len(row[i]) for row in (head, *body)) for i in range(len(head))]

    def fmt(row: tuple[str, ...]) -> str:
        return "  ".join(c.ljust(w) if i in (0, 2, 8) else c.rjust(w) for i, (c, w) in enumerate(zip(row, widths))
                         ).rstrip()

    return "\n".join([f"sweep {sweep.name}: {len(rows)} arms, output {sweep.output_dir} (ETA: the remaining steps at "
                      f"the last logged tokens/s)", fmt(head), fmt(tuple("-" * w for w in widths)), *map(fmt, body)])
