"""One config system: dataclasses <-> YAML presets, `--set a.b=c` overrides, validation naming the key.

A run is described by one `Config`. It is built from a preset name (see `mor_ds.presets`) or a YAML
file (which may name a `preset:` to start from), then `--set key=value` overrides, then validated.
Every error is a `ConfigError` whose one-line message names the offending key and value.
"""

from __future__ import annotations

import dataclasses
import difflib
import math
import os
import re
import types
import typing
from dataclasses import dataclass, field
from enum import Enum
from pathlib import Path
from typing import Any, Callable, Iterator, Literal

import yaml

from mor_ds.choices import AttentionBackend, KVMode, ModelFamily, RouterType, SharingStrategy


class _YamlLoader(yaml.SafeLoader):
    """YAML 1.1 reads `1e-3` and `16.5e18` as strings; resolve them as floats the way YAML 1.2 does.
    A key given twice in one mapping is an error (PyYAML keeps the last one silently)."""

    def construct_mapping(self, node: yaml.Node, deep: bool = False) -> dict[Any, Any]:
        if isinstance(node, yaml.MappingNode):
            first_line: dict[Any, int] = {}
            for key_node, _ in node.value:
                if key_node.tag == "tag:yaml.org,2002:merge":  # `<<: *base` entries may be overridden
                    continue
                key = self.construct_object(key_node, deep=True)
                if key in first_line:
                    raise yaml.constructor.ConstructorError(
                        None, None, f"duplicate key {key!r} (first given on line {first_line[key] + 1})",
                        key_node.start_mark)
                first_line[key] = key_node.start_mark.line
        return super().construct_mapping(node, deep)


_YamlLoader.add_implicit_resolver(
    "tag:yaml.org,2002:float",
    re.compile(r"^[-+]?(?:[0-9][0-9_]*(?:\.[0-9_]*)?|\.[0-9_]+)(?:[eE][-+]?[0-9]+)?$|^[-+]?\.(?:inf|Inf|INF)$|^\.(?:nan|NaN|NAN)$"),
    list("-+0123456789."),
)


def yaml_load(text: str) -> Any:
    return yaml.load(text, Loader=_YamlLoader)


def yaml_error(exc: yaml.YAMLError) -> str:
    """One line for a YAML error: what is wrong and where (PyYAML's own message spans several lines)."""
    mark = getattr(exc, "problem_mark", None)
    problem = getattr(exc, "problem", None) or str(exc).splitlines()[0]
    where = f"line {mark.line + 1}, column {mark.column + 1}: " if mark is not None else ""
    return f"{where}{problem}"


class ConfigError(ValueError):
    """A bad config value; the message names the key (`model.hidden_size`) and the value. Several problems found at
    once are all in one message: `2 problems: a.b=1: …; c.d=2: …` (each also in `problems`)."""

    def __init__(self, message: str, problems: list[str] | None = None):
        super().__init__(message)
        self.problems = problems or [message]


def _raise_all(problems: list[str]) -> None:
    if len(problems) == 1:
        raise ConfigError(problems[0])
    if problems:
        raise ConfigError(f"{len(problems)} problems: " + "; ".join(problems), problems)


_AMOUNT_SUFFIX = {"": 1.0, "k": 1e3, "m": 1e6, "b": 1e9, "g": 1e9, "t": 1e12}
_AMOUNT = re.compile(r"\s*([-+]?[0-9]*\.?[0-9]+(?:[eE][-+]?[0-9]+)?)\s*([kKmMbBgGtT]?)\s*")


def parse_amount(text: str) -> float | None:
    """`20e9`, `20B`, `16.5e18`, `2.1M` -> float (k/M/B|G/T suffixes); None if `text` is not such a number."""
    match = _AMOUNT.fullmatch(text)
    return float(match[1]) * _AMOUNT_SUFFIX[match[2].lower()] if match else None


# --------------------------------------------------------------------------------------------
# Sections


@dataclass
class ModelConfig:
    family: ModelFamily = ModelFamily.VANILLA
    vocab_size: int = 49152
    hidden_size: int = 576  # d
    num_layers: int = 30  # L, the unrolled depth (vanilla layers the model is compared with)
    num_heads: int = 9
    num_kv_heads: int = 3  # GQA groups
    intermediate_size: int = 1536  # SwiGLU hidden size
    rope_theta: float = 10000.0
    rms_norm_eps: float = 1e-5
    tie_embeddings: bool = True
    init_std: float = 0.02
    # Recursion (family recursive / mor). Nr = num_recursions.
    num_recursions: int = 1
    sharing: SharingStrategy = SharingStrategy.MIDDLE_CYCLE
    # KV strategy: "cache" = recursion-wise KV caching, "share" = recursive KV sharing (first recursion's KV)
    kv_mode: KVMode = KVMode.CACHE
    # attention inside packed sequences stays within a document (EOS-delimited) when true
    document_mask: bool = False
    attention_backend: AttentionBackend = AttentionBackend.AUTO
    # LM head + cross-entropy (mor_ds/models/loss.py): chunked never materialises the (B·S, V) logits;
    # liger = Liger-Kernel's fused kernel (CUDA); auto = chunked on CUDA, plain elsewhere
    fused_loss: Literal["auto", "plain", "chunked", "liger"] = "auto"
    loss_chunk_size: int = 4096  # tokens per chunk of the chunked loss

    @property
    def head_dim(self) -> int:
        return self.hidden_size // self.num_heads


@dataclass
class RouterConfig:
    """MoR router (family mor only). Symbols as in the paper: alpha (α), capacity schedule, Nr."""

    type: RouterType = RouterType.EXPERT_CHOICE
    arch: Literal["linear", "mlp"] = "linear"
    activation: Literal["sigmoid", "softmax"] = "sigmoid"
    alpha: float = 0.1  # α: router weight g = α·act(router(h)) scales the block output
    # capacity per recursion step for expert-choice; empty = the paper's (Nr−i)/Nr schedule
    capacity: list[float] = field(default_factory=list)
    # how g combines a recursion step's output with the hidden state (mor_ds.models.mor_math): "paper" is the
    # paper's and the released code's rule, "delta" the ablation h ← h + g·(B_r(h) − h)
    combine: Literal["paper", "delta"] = "paper"
    # scale the recursion block's output by the router weight (off only for equivalence tests)
    scale_output: bool = True
    # expert-choice causality at inference: BCE aux loss on router logits, or a separate aux router
    causal_mode: Literal["aux_loss", "aux_router"] = "aux_loss"
    # its threshold τ_r: "calibrated" = EMA (threshold_momentum per optimizer step) of the logit where training's
    # top-k_r cuts, so inference keeps the capacity schedule's fractions; "zero" = logit > 0 (σ > 0.5)
    causal_threshold: Literal["calibrated", "zero"] = "calibrated"
    threshold_momentum: float = 0.99
    aux_loss_coef: float = 0.001
    z_loss_coef: float = 0.0
    # token-choice balancing: "loss" (Σ_i P_i·f_i) or "loss_free" (per-depth bias, all-reduced loads)
    balancing: Literal["loss", "loss_free"] = "loss"
    balance_loss_coef: float = 0.1
    bias_update_rate: float = 0.001
    mlp_hidden_size: int = 0  # for arch=mlp: Linear(d, m) → GELU → Linear(m, out); 0 = 2·hidden_size (released code)

    def capacities(self, num_recursions: int) -> list[float]:
        from mor_ds.models.mor_math import capacity_schedule

        return capacity_schedule(num_recursions, self.capacity)


@dataclass
class DataSource:
    """One prepared shard directory of a data mixture (`data.sources`)."""

    path: str = ""
    weight: float = 1.0  # share of the training windows, normalised over the sources
    name: str = ""  # in logs (data/<name>/...); empty = the directory's name


@dataclass
class DataConfig:
    # `embedded` (the installed demo corpus), a local path/glob, or hf:NAME[:CONFIG][@SPLIT]
    source: str = "embedded"
    text_field: str = "text"
    # a SentencePiece .model or a Hugging Face tokenizer.json; empty = train one on first use (tiny runs)
    tokenizer: str = ""
    # prepared shard directory (`mor-data prepare`); empty = derive from source (embedded) or stream
    prepared_dir: str = ""
    # auto = prepared when prepared_dir is set or the source is embedded, else stream (the run records its choice)
    mode: Literal["auto", "prepared", "stream"] = "auto"
    val_shards: int = 1  # held-out shards for validation
    num_workers: int = 1  # tokenizer worker processes in stream mode
    min_chars: int = 0
    max_chars: int = 0  # 0 = no limit
    cache_dir: str = "~/.cache/mor-ds"
    # a mixture of prepared shard directories (data_pipeline.mixture) instead of one prepared_dir, e.g.
    # [{path: shards/fineweb, weight: 0.7}, {path: shards/code, weight: 0.3, name: code}]
    sources: list[DataSource] = field(default_factory=list)


@dataclass
class OptimConfig:
    lr: float = 3e-3
    min_lr_ratio: float = 0.0
    betas: list[float] = field(default_factory=lambda: [0.9, 0.95])
    eps: float = 1e-8
    weight_decay: float = 0.1
    grad_clip: float = 1.0
    schedule: Literal["wsd", "cosine", "constant"] = "wsd"
    warmup_fraction: float = 0.05
    decay_fraction: float = 0.2  # wsd: linear decay to min_lr over the last 20% of steps
    # ZeRO-1/2 bf16 step as one Triton pass (clip + AdamW on the fp32 master + bf16 write-back, the fused-zero-step
    # patch of mor_ds/patches.py) instead of DeepSpeed's; auto = on for CUDA where supported, DeepSpeed's step elsewhere
    fused_step: Literal["auto", True, False] = "auto"


@dataclass
class TrainConfig:
    seq_len: int = 2048
    micro_batch_size: int = 16  # sequences per GPU per forward
    global_batch_size: int = 1024  # sequences per optimizer step (all GPUs, all accumulation steps)
    # budget: exactly one of these decides the number of optimizer steps (first non-zero wins)
    max_steps: int = 0
    max_tokens: int = 0
    max_flops: float = 0.0  # training FLOPs, planner's `flops_convention`
    flops_convention: Literal["exact", "paper"] = "paper"
    seed: int = 1234
    zero_stage: int = 2
    offload_optimizer: bool = False
    ds_config: str = ""  # DeepSpeed JSON template; "" = ds_configs/zero{stage}[-offload].json
    zero3_block_fetch: bool = True  # ZeRO-3 gathers a decoder block's weights in one go (one hook per block)
    precision: Literal["bf16", "fp32"] = "bf16"
    activation_checkpointing: bool = False
    compile: Literal["auto", True, False] = "auto"  # torch.compile per unique block; auto = on CUDA, off on CPU
    log_interval: int = 10
    eval_interval: int = 500
    eval_batches: int = 20
    max_bad_steps: int = 5  # consecutive NaN/Inf steps before abort
    peak_tflops: float = 0.0  # 0 = from the device
    # a collective that waits this long on a peer (dead rank or node, broken network) fails the run (exit 6)
    collective_timeout_s: float = 1800.0


@dataclass
class CheckpointConfig:
    interval: int = 1000
    keep_last: int = 3


@dataclass
class WandbConfig:
    enabled: bool = True
    project: str = "mor-ds"
    group: str = ""
    name: str = ""
    mode: Literal["auto", "online", "offline", "disabled"] = "auto"  # auto = offline without an API key


@dataclass
class Config:
    name: str = ""
    model: ModelConfig = field(default_factory=ModelConfig)
    router: RouterConfig = field(default_factory=RouterConfig)
    data: DataConfig = field(default_factory=DataConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    checkpoint: CheckpointConfig = field(default_factory=CheckpointConfig)
    wandb: WandbConfig = field(default_factory=WandbConfig)

    def to_dict(self) -> dict[str, Any]:
        """Plain Python values (choices as their strings): for YAML, JSON, W&B and checkpoints."""
        return dataclasses.asdict(self, dict_factory=_plain_dict)

    def to_yaml(self) -> str:
        return yaml.safe_dump(self.to_dict(), sort_keys=False)


def _plain_dict(items: list[tuple[str, Any]]) -> dict[str, Any]:
    return {key: value.value if isinstance(value, Enum) else value for key, value in items}


# --------------------------------------------------------------------------------------------
# dict -> dataclass with type checks (also the sweep file's tree, mor_ds.sweep)
#
# Field types: bool, int, float, str, a Literal, a StrEnum (mor_ds.choices), list[T], dict[str, T], T | None, Any,
# a dataclass (a nested section), or Annotated[T, parse] where parse(value, key) reads values of a shape the rest
# cannot say (e.g. a number or a list of numbers). A field without a default is required. A section may set
# `KEY_NOUN: ClassVar[str]` to name its keys in messages ("unknown axis").


def _coerce(value: Any, tp: Any, key: str) -> Any:
    if typing.get_origin(tp) is typing.Annotated:
        return typing.get_args(tp)[1](value, key)
    if tp is Any:
        return value
    if typing.get_origin(tp) in (typing.Union, types.UnionType):
        args = typing.get_args(tp)
        if len(args) != 2 or type(None) not in args:
            raise TypeError(f"unsupported config type {tp} at {key}: only T | None")
        return None if value is None else _coerce(value, next(a for a in args if a is not type(None)), key)
    if isinstance(tp, type) and issubclass(tp, Enum):
        try:
            return tp(value)
        except (ValueError, TypeError):
            raise ConfigError(f"{key}: {value!r} is not one of {', '.join(m.value for m in tp)}") from None
    origin = typing.get_origin(tp)
    if origin is Literal:
        choices = typing.get_args(tp)
        if value not in choices:
            raise ConfigError(f"{key}: {value!r} is not one of {', '.join(map(str, choices))}")
        return value
    if origin is list:
        if not isinstance(value, (list, tuple)):
            raise ConfigError(f"{key}: {value!r} is not a list")
        (item_tp,) = typing.get_args(tp)
        items, problems = [], []
        for i, v in enumerate(value):
            try:
                items.append(_coerce(v, item_tp, f"{key}[{i}]"))
            except ConfigError as exc:
                problems.append(str(exc))
        _raise_all(problems)
        return items
    if origin is dict:
        if not isinstance(value, dict):
            raise ConfigError(f"{key}: expected a mapping, got {value!r}")
        _, item_tp = typing.get_args(tp)
        return {str(k): _coerce(v, item_tp, f"{key}.{k}") for k, v in value.items()}
    if dataclasses.is_dataclass(tp):
        if not isinstance(value, dict):
            raise ConfigError(f"{key}: expected a mapping, got {value!r}")
        return from_mapping(tp, value, key)
    if tp is bool:
        if not isinstance(value, bool):
            raise ConfigError(f"{key}: {value!r} is not a bool (true/false)")
        return value
    if tp is int:
        if isinstance(value, str) and parse_amount(value) is not None:  # 20B tokens, as `mor-ds plan --tokens`
            value = parse_amount(value)
        if isinstance(value, bool) or not isinstance(value, int):
            if isinstance(value, float) and value.is_integer():
                return int(value)
            raise ConfigError(f"{key}: {value!r} is not an int")
        return value
    if tp is float:
        if isinstance(value, str) and parse_amount(value) is not None:
            value = parse_amount(value)
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise ConfigError(f"{key}: {value!r} is not a number")
        return float(value)
    if tp is str:
        if not isinstance(value, str):
            raise ConfigError(f"{key}: {value!r} is not a string")
        return value
    raise TypeError(f"unsupported config type {tp} at {key}")


def from_mapping(cls: type, data: dict[str, Any], prefix: str = "") -> Any:
    """The dataclass `cls` from a mapping, every value type-checked; every unknown key (with a did-you-mean), bad
    value and missing required key is reported, in one ConfigError naming each (`prefix.key`)."""
    hints = typing.get_type_hints(cls, include_extras=True)
    fields = {f.name: f for f in dataclasses.fields(cls)}
    kwargs, problems = {}, []
    for key, value in data.items():
        full = f"{prefix}.{key}" if prefix else key
        if key not in fields:
            noun = getattr(cls, "KEY_NOUN", "key")
            close = difflib.get_close_matches(key, fields, n=1)
            problems.append(f"{full}: unknown {noun}" + (f" (did you mean {close[0]}?)" if close else "")
                            + f" (known: {', '.join(sorted(fields))})")
            continue
        try:
            kwargs[key] = _coerce(value, hints[key], full)
        except ConfigError as exc:
            problems.extend(exc.problems)
    for name, f in fields.items():
        if name not in kwargs and f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING:
            problems.append(f"{prefix}.{name}: missing" if prefix else f"{name}: missing")
    _raise_all(problems)
    return cls(**kwargs)


def merge(base: dict[str, Any], update: dict[str, Any]) -> dict[str, Any]:
    """Recursive dict merge; mappings merge key by key, anything else replaces."""
    out = dict(base)
    for key, value in update.items():
        if isinstance(value, dict) and isinstance(out.get(key), dict):
            out[key] = merge(out[key], value)
        else:
            out[key] = value
    return out


def parse_override(text: str) -> dict[str, Any]:
    """`model.hidden_size=576` -> {"model": {"hidden_size": 576}}; the value is parsed as YAML."""
    if "=" not in text:
        raise ConfigError(f"--set {text!r}: expected key=value")
    key, raw = text.split("=", 1)
    key = key.strip()
    if not key or any(not part for part in key.split(".")):
        raise ConfigError(f"--set {text!r}: bad key {key!r}")
    try:
        value = yaml_load(raw) if raw.strip() else ""
    except yaml.YAMLError as exc:
        raise ConfigError(f"{key}: cannot parse value {raw!r} ({yaml_error(exc)})") from None
    out: dict[str, Any] = value
    for part in reversed(key.split(".")):
        out = {part: out}
    return out


def from_dict(data: dict[str, Any]) -> Config:
    cfg = from_mapping(Config, data)
    validate(cfg)
    return cfg


def from_saved(data: dict[str, Any]) -> Config:
    """The Config a checkpoint or an export saved (every field written out). A save without `router.combine` is
    from before that choice existed: it trained with the delta rule, and an MLP router's hidden width 0 meant
    hidden_size (today 2·hidden_size), so those keep their meaning instead of taking today's defaults."""
    router = data.get("router")
    if isinstance(router, dict) and "combine" not in router:
        router = {**router, "combine": "delta"}
        if router.get("arch") == "mlp" and not router.get("mlp_hidden_size"):
            router["mlp_hidden_size"] = (data.get("model") or {}).get("hidden_size", ModelConfig.hidden_size)
        data = {**data, "router": router}
    return from_dict(data)


def load_config(spec: str, overrides: list[str] | tuple[str, ...] = ()) -> Config:
    """Build a validated Config from a preset name or a YAML path, then `key=value` overrides."""
    from mor_ds.presets import preset_dict

    path = Path(spec)
    if spec.endswith((".yaml", ".yml")) or path.is_file():
        if not path.is_file():
            raise ConfigError(f"config file {spec}: not found")
        try:
            data = yaml_load(path.read_text()) or {}
        except yaml.YAMLError as exc:
            raise ConfigError(f"config file {spec}: invalid YAML at {yaml_error(exc)}") from None
        if not isinstance(data, dict):
            raise ConfigError(f"config file {spec}: expected a mapping at the top level")
        if "preset" in data:
            data = merge(preset_dict(data.pop("preset")), data)
    else:
        data = preset_dict(spec)
    for text in overrides:
        data = merge(data, parse_override(text))
    return from_dict(data)


def _absolute(path: str) -> str:
    return os.path.abspath(os.path.expanduser(path)) if path else path


def with_absolute_paths(cfg: Config) -> Config:
    """`cfg` with every local path (data.source when it is one, data.tokenizer, data.prepared_dir,
    data.cache_dir, data.sources[*].path, train.ds_config) made absolute against the current directory, as a run
    records them."""
    d = cfg.data
    local_source = d.source and d.source != "embedded" and not d.source.startswith("hf:")
    data = dataclasses.replace(d, source=_absolute(d.source) if local_source else d.source,
                               tokenizer=_absolute(d.tokenizer), prepared_dir=_absolute(d.prepared_dir),
                               cache_dir=_absolute(d.cache_dir),
                               sources=[dataclasses.replace(s, path=_absolute(s.path)) for s in d.sources])
    return dataclasses.replace(cfg, data=data, train=dataclasses.replace(cfg.train,
                                                                         ds_config=_absolute(cfg.train.ds_config)))


# --------------------------------------------------------------------------------------------
# validation: every message names the key and the value


def _non_finite(section: Any, prefix: str) -> Iterator[tuple[str, float]]:
    """Every float field (or list item) of a config tree that is NaN or infinite: no setting of a run means one (an
    infinite budget, learning rate or init scale only poisons the run later)."""
    for f in dataclasses.fields(section):
        value, key = getattr(section, f.name), f"{prefix}{f.name}"
        if dataclasses.is_dataclass(value):
            yield from _non_finite(value, f"{key}.")
        items = enumerate(value) if isinstance(value, list) else [(None, value)]
        for i, item in items:
            if isinstance(item, float) and not math.isfinite(item):
                yield (key if i is None else f"{key}[{i}]"), item


def validate(cfg: Config) -> None:
    """Every rule below is checked; one ConfigError names every value that breaks one (a NaN/inf value once, as
    not finite)."""
    problems = [f"{key}={value!r}: must be a finite number" for key, value in _non_finite(cfg, "")]
    non_finite = {key.split("[", 1)[0] for key, _ in _non_finite(cfg, "")}  # a list's key for its items too

    def _check(ok: bool, key: str, value: Any, why: str) -> None:
        if not ok and key.split("[", 1)[0] not in non_finite:
            problems.append(f"{key}={value!r}: {why}")

    _rules(cfg, _check)
    _raise_all(problems)


def _rules(cfg: Config, _check: Callable[[bool, str, Any, str], None]) -> None:
    m, r, t, o = cfg.model, cfg.router, cfg.train, cfg.optim
    for key in ("vocab_size", "hidden_size", "num_layers", "num_heads", "num_kv_heads", "intermediate_size"):
        _check(getattr(m, key) >= 1, f"model.{key}", getattr(m, key), "must be >= 1")
    if m.num_heads >= 1 and m.num_kv_heads >= 1:  # (else reported above)
        _check(m.hidden_size % m.num_heads == 0, "model.hidden_size", m.hidden_size,
               f"must be divisible by model.num_heads={m.num_heads}")
        _check(m.num_heads % m.num_kv_heads == 0, "model.num_kv_heads", m.num_kv_heads,
               f"must divide model.num_heads={m.num_heads}")
    _check(m.rope_theta > 0, "model.rope_theta", m.rope_theta, "must be > 0")
    _check(m.loss_chunk_size >= 1, "model.loss_chunk_size", m.loss_chunk_size, "must be >= 1")
    _check(m.init_std > 0, "model.init_std", m.init_std, "must be > 0")
    _check(m.num_recursions >= 1, "model.num_recursions", m.num_recursions, "must be >= 1")
    if m.family == ModelFamily.VANILLA:
        _check(m.num_recursions == 1, "model.num_recursions", m.num_recursions, "must be 1 for model.family=vanilla")
    elif m.num_recursions >= 1 and m.num_layers >= 1:
        from mor_ds.models.sharing import sharing_error

        err = sharing_error(m.num_layers, m.num_recursions, m.sharing)
        _check(err is None, "model.num_layers", m.num_layers, err or "")
    if m.family == ModelFamily.MOR:
        _check(m.sharing in (SharingStrategy.CYCLE, SharingStrategy.MIDDLE_CYCLE), "model.sharing", m.sharing,
               "MoR routes over contiguous recursion blocks: use cycle or middle_cycle")
        if r.type == RouterType.TOKEN_CHOICE:
            _check(m.num_recursions >= 2, "model.num_recursions", m.num_recursions,
                   "token-choice routing needs at least 2 depths")
        caps = r.capacity
        if caps:
            _check(len(caps) == m.num_recursions, "router.capacity", caps,
                   f"needs one entry per recursion (model.num_recursions={m.num_recursions})")
            for i, c in enumerate(caps):
                _check(0.0 < c <= 1.0, f"router.capacity[{i}]", c, "must be in (0, 1]")
            _check(all(a >= b for a, b in zip(caps, caps[1:])), "router.capacity", caps,
                   "must be non-increasing (hierarchical selection)")
    _check(r.alpha > 0, "router.alpha", r.alpha, "must be > 0")
    for key in ("aux_loss_coef", "z_loss_coef", "balance_loss_coef", "bias_update_rate"):
        _check(getattr(r, key) >= 0, f"router.{key}", getattr(r, key), "must be >= 0")
    _check(r.mlp_hidden_size >= 0, "router.mlp_hidden_size", r.mlp_hidden_size, "must be >= 0")
    _check(0.0 <= r.threshold_momentum < 1.0, "router.threshold_momentum", r.threshold_momentum, "must be in [0, 1)")

    _check(t.seq_len >= 2, "train.seq_len", t.seq_len, "must be >= 2")
    _check(t.micro_batch_size >= 1, "train.micro_batch_size", t.micro_batch_size, "must be >= 1")
    _check(t.global_batch_size >= t.micro_batch_size, "train.global_batch_size", t.global_batch_size,
           f"must be >= train.micro_batch_size={t.micro_batch_size}")
    _check(t.micro_batch_size < 1 or t.global_batch_size % t.micro_batch_size == 0, "train.global_batch_size",
           t.global_batch_size, f"must be a multiple of train.micro_batch_size={t.micro_batch_size}")
    for key in ("max_steps", "max_tokens", "max_flops"):
        _check(getattr(t, key) >= 0, f"train.{key}", getattr(t, key), "must be >= 0")
    _check(t.zero_stage in (0, 1, 2, 3), "train.zero_stage", t.zero_stage, "must be 0, 1, 2 or 3")
    for key in ("log_interval", "eval_interval", "eval_batches", "max_bad_steps"):
        _check(getattr(t, key) >= 1, f"train.{key}", getattr(t, key), "must be >= 1")
    _check(t.peak_tflops >= 0, "train.peak_tflops", t.peak_tflops, "must be >= 0")
    _check(t.collective_timeout_s > 0, "train.collective_timeout_s", t.collective_timeout_s, "must be > 0 (seconds)")

    _check(o.lr > 0, "optim.lr", o.lr, "must be > 0")
    _check(0 <= o.min_lr_ratio <= 1, "optim.min_lr_ratio", o.min_lr_ratio, "must be in [0, 1]")
    _check(len(o.betas) == 2 and all(0 <= b < 1 for b in o.betas), "optim.betas", o.betas,
           "must be two numbers in [0, 1)")
    _check(o.weight_decay >= 0, "optim.weight_decay", o.weight_decay, "must be >= 0")
    _check(o.grad_clip >= 0, "optim.grad_clip", o.grad_clip, "must be >= 0 (0 = off)")
    _check(0 <= o.warmup_fraction < 1, "optim.warmup_fraction", o.warmup_fraction, "must be in [0, 1)")
    _check(0 <= o.decay_fraction <= 1, "optim.decay_fraction", o.decay_fraction, "must be in [0, 1]")
    _check(o.fused_step is not True or (t.zero_stage in (1, 2) and t.precision == "bf16" and not t.offload_optimizer),
           "optim.fused_step", o.fused_step, "needs train.zero_stage 1 or 2, train.precision=bf16 and no "
           "train.offload_optimizer (use auto)")
    _check(o.warmup_fraction + o.decay_fraction <= 1, "optim.decay_fraction", o.decay_fraction,
           f"warmup_fraction + decay_fraction must be <= 1 (warmup_fraction={o.warmup_fraction})")

    _check(cfg.checkpoint.interval >= 1, "checkpoint.interval", cfg.checkpoint.interval, "must be >= 1")
    _check(cfg.checkpoint.keep_last >= 1, "checkpoint.keep_last", cfg.checkpoint.keep_last, "must be >= 1")
    _check(cfg.data.val_shards >= 0, "data.val_shards", cfg.data.val_shards, "must be >= 0")
    _check(cfg.data.num_workers >= 1, "data.num_workers", cfg.data.num_workers, "must be >= 1")
    sources = cfg.data.sources
    for i, source in enumerate(sources):
        _check(bool(source.path), f"data.sources[{i}].path", source.path, "must name a prepared shard directory")
        _check(source.weight > 0, f"data.sources[{i}].weight", source.weight, "must be > 0")
    names = [s.name or os.path.basename(os.path.normpath(s.path)) for s in sources]
    _check(len(set(names)) == len(names), "data.sources", names, "need distinct names (set data.sources[i].name)")
    _check(not (sources and cfg.data.prepared_dir), "data.prepared_dir", cfg.data.prepared_dir,
           "give data.prepared_dir or data.sources, not both")
    _check(not sources or cfg.data.mode != "stream", "data.mode", cfg.data.mode,
           "data.sources are prepared shard directories: use data.mode=auto or prepared")
