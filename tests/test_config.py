"""Config system: presets, YAML files, --set overrides, and one-line errors naming the key."""

from __future__ import annotations

import pytest
import torch

from mor_ds.config import Config, ConfigError, from_dict, load_config, parse_override, yaml_load
from mor_ds.presets import list_presets


def test_every_listed_preset_loads_and_validates():
    names = list_presets()
    assert {"vanilla-360m", "recursive-360m-nr3", "mor-360m-nr3", "mor-360m-nr3-tc", "tiny-mor"} <= set(names)
    for name in names:
        cfg = load_config(name)
        assert cfg.name == name


def test_paper_defaults():
    cfg = load_config("mor-360m-nr3")
    m, r, t = cfg.model, cfg.router, cfg.train
    assert (m.family, m.num_recursions, m.sharing, m.kv_mode) == ("mor", 3, "middle_cycle", "cache")
    assert (r.type, r.activation, r.alpha, r.aux_loss_coef) == ("expert_choice", "sigmoid", 0.1, 0.001)
    assert r.capacities(3) == [1.0, 2 / 3, 1 / 3]
    assert (t.seq_len, t.global_batch_size, cfg.optim.lr, cfg.optim.betas) == (2048, 1024, 3e-3, [0.9, 0.95])
    assert load_config("mor-360m-nr4").model.num_layers == 34  # (L−2) divisible by Nr, as in the paper
    assert load_config("mor-135m-nr3").model.num_layers == 32
    tc = load_config("mor-360m-nr2-tc").router
    assert (tc.type, tc.activation, tc.balance_loss_coef, tc.z_loss_coef) == ("token_choice", "softmax", 0.1, 1e-5)


def test_yaml_file_with_preset_and_overrides(tmp_path):
    path = tmp_path / "run.yaml"
    path.write_text("preset: tiny-mor\nmodel:\n  hidden_size: 256\ntrain:\n  max_steps: 7\n")
    cfg = load_config(str(path), ["model.num_heads=8", "router.capacity=[1.0, 0.25]", "wandb.group=abc"])
    assert (cfg.model.hidden_size, cfg.model.num_heads, cfg.train.max_steps) == (256, 8, 7)
    assert cfg.router.capacity == [1.0, 0.25] and cfg.wandb.group == "abc"
    # round trip through YAML
    assert from_dict(__import__("yaml").safe_load(cfg.to_yaml())) == cfg


@pytest.mark.parametrize("override,message", [
    ("model.hiden_size=5", "model.hiden_size: unknown key"),
    ("modle.hidden_size=5", "modle: unknown key"),
    ("model.num_recursions=0", "model.num_recursions=0: must be >= 1"),
    ("router.capacity=[1.0, 1.5]", "router.capacity[1]=1.5: must be in (0, 1]"),
    ("router.capacity=[1.0, 0.0]", "router.capacity[1]=0.0: must be in (0, 1]"),
    ("router.capacity=[1.0]", "router.capacity=[1.0]: needs one entry per recursion"),
    ("model.hidden_size=130", "model.hidden_size=130: must be divisible by model.num_heads=4"),
    ("model.num_kv_heads=3", "model.num_kv_heads=3: must divide model.num_heads=4"),
    ("model.num_layers=7", "model.num_layers=7: num_layers - 2=5 must be divisible by num_recursions=2"),
    ("model.sharing=sequence", "model.sharing='sequence': MoR routes over contiguous recursion blocks"),
    ("model.sharing=spiral", "model.sharing: 'spiral' is not one of cycle, sequence, middle_cycle, middle_sequence"),
    ("router.type=expert", "router.type: 'expert' is not one of expert_choice, token_choice"),
    ("model.hidden_size=big", "model.hidden_size: 'big' is not an int"),
    ("train.micro_batch_size=3", "train.global_batch_size=16: must be a multiple of train.micro_batch_size=3"),
    ("optim.betas=[0.9]", "optim.betas=[0.9]: must be two numbers in [0, 1)"),
    ("train.zero_stage=4", "train.zero_stage=4: must be 0, 1, 2 or 3"),
    ("model.tie_embeddings=maybe", "model.tie_embeddings: 'maybe' is not a bool"),
    ("router.alpha=0", "router.alpha=0.0: must be > 0"),
    ("train.compile=blocks", "train.compile: 'blocks' is not one of auto, True, False"),
    ("train.collective_timeout_s=0", "train.collective_timeout_s=0.0: must be > 0 (seconds)"),
    ("nokey", "--set 'nokey': expected key=value"),
])
def test_bad_values_name_the_key(override, message):
    with pytest.raises(ConfigError) as err:
        load_config("tiny-mor", [override])
    assert message in str(err.value)
    assert "\n" not in str(err.value)


@pytest.mark.parametrize("name,message", [
    ("mor-999m-nr2", "preset 'mor-999m-nr2': unknown"),
    ("vanilla-360m-nr2", "vanilla presets take no -nr"),
    ("mor-360m", "mor presets need -nr<N>"),
    ("recursive-360m-nr2-tc", "-tc (token-choice routing) is for mor presets"),
])
def test_bad_preset_names(name, message):
    with pytest.raises(ConfigError, match=message.replace("(", r"\(").replace(")", r"\)")):
        load_config(name)


def test_missing_or_invalid_yaml_file(tmp_path):
    with pytest.raises(ConfigError, match="config file .*nope.yaml: not found"):
        load_config(str(tmp_path / "nope.yaml"))
    bad = tmp_path / "bad.yaml"
    bad.write_text("model: [unclosed\n  hidden_size: 64\n")
    with pytest.raises(ConfigError) as err:
        load_config(str(bad))
    assert str(err.value) == f"config file {bad}: invalid YAML at line 2, column 14: expected ',' or ']', but got ':'"


def test_duplicate_yaml_keys_are_refused(tmp_path):
    """PyYAML keeps the last of two equal keys; a config that says a value twice is a mistake, not a choice."""
    path = tmp_path / "run.yaml"
    path.write_text("preset: tiny-mor\noptim:\n  lr: 0.001\n  weight_decay: 0.1\n  lr: 0.01\n")
    with pytest.raises(ConfigError) as err:
        load_config(str(path))
    assert str(err.value) == (f"config file {path}: invalid YAML at line 5, column 3: duplicate key 'lr' "
                              f"(first given on line 3)")
    with pytest.raises(ConfigError, match="duplicate key 'a'"):
        load_config("tiny-mor", ["router.capacity={a: 1, a: 2}"])
    assert yaml_load("base: &b {lr: 1}\noptim:\n  <<: *b\n  lr: 2\n")["optim"] == {"lr": 2}  # merge keys override


@pytest.mark.parametrize("override,key", [
    ("optim.lr=.inf", "optim.lr=inf"), ("model.init_std=.inf", "model.init_std=inf"),
    ("train.max_flops=.inf", "train.max_flops=inf"), ("train.max_flops=1e400", "train.max_flops=inf"),
    ("optim.lr=.nan", "optim.lr=nan"), ("optim.betas=[0.9, .nan]", "optim.betas[1]=nan"),
    ("router.alpha=-.inf", "router.alpha=-inf"), ("train.peak_tflops=.inf", "train.peak_tflops=inf"),
])
def test_non_finite_numbers_are_refused_for_every_float_key(override, key):
    with pytest.raises(ConfigError) as err:
        load_config("tiny-mor", [override])
    assert str(err.value) == f"{key}: must be a finite number"


def test_validate_checks_programmatic_configs_too():
    from mor_ds.config import validate

    cfg = Config()
    cfg.model.rms_norm_eps = float("inf")
    with pytest.raises(ConfigError, match=r"^model.rms_norm_eps=inf: must be a finite number$"):
        validate(cfg)


def test_override_values_are_yaml_typed():
    assert parse_override("a.b=3") == {"a": {"b": 3}}
    assert parse_override("a=1e-3") == {"a": 1e-3}
    assert parse_override("a=[1, 2]") == {"a": [1, 2]}
    assert parse_override("a=text") == {"a": "text"}


def test_defaults_are_valid():
    from mor_ds.config import validate

    validate(Config())


def test_compile_is_auto_by_default_and_follows_the_device():
    from mor_ds.distributed import resolve_compile

    assert load_config("tiny-mor").train.compile == "auto"
    assert resolve_compile("auto", torch.device("cuda")) and not resolve_compile("auto", torch.device("cpu"))
    for value in (True, False):
        setting = load_config("tiny-mor", [f"train.compile={str(value).lower()}"]).train.compile
        assert setting is value and resolve_compile(setting, torch.device("cpu")) is value


def test_each_choice_is_one_enum_for_config_registry_presets_and_sweep():
    """Families, sharing strategies, KV modes, router types, routing modes and attention backends: one StrEnum
    each (mor_ds.choices), the config field's type, the registry's keys and the lists names are parsed from."""
    import typing

    import yaml

    from mor_ds.attention import BACKENDS
    from mor_ds.choices import AttentionBackend, KVMode, ModelFamily, RouterType, RoutingMode, SharingStrategy
    from mor_ds.config import ModelConfig, RouterConfig
    from mor_ds.evaluation.harness import ROUTING_CHOICES
    from mor_ds.models.recursion import MOR_STACKS
    from mor_ds.models.sharing import SHAPES
    from mor_ds.presets import preset_dict
    from mor_ds.config import from_mapping
    from mor_ds.sweep import GridSpec

    model, router = typing.get_type_hints(ModelConfig), typing.get_type_hints(RouterConfig)
    assert (model["family"], model["sharing"], model["kv_mode"], model["attention_backend"], router["type"]) == (
        ModelFamily, SharingStrategy, KVMode, AttentionBackend, RouterType)
    assert set(SHAPES) == set(SharingStrategy) and set(MOR_STACKS) == set(RouterType)
    assert {AttentionBackend.REFERENCE, AttentionBackend.SDPA} <= set(BACKENDS) <= set(AttentionBackend) - {"auto"}
    assert ROUTING_CHOICES == ("causal", "topk", "both") and tuple(RoutingMode) == ("causal", "topk")
    grid = from_mapping(GridSpec, {"family": list(ModelFamily), "size": "tiny", "sharing": "cycle"}, "grid")
    assert grid.family == list(ModelFamily) and type(grid.sharing[0]) is SharingStrategy
    for family in ModelFamily:  # the preset-name pattern is built from the enum
        assert preset_dict(f"tiny-{family}")["model"]["family"] == family
    cfg = load_config("tiny-mor-tc", ["model.attention_backend=sdpa"])
    assert type(cfg.model.family) is ModelFamily and type(cfg.router.type) is RouterType
    assert type(cfg.model.attention_backend) is AttentionBackend
    saved = cfg.to_dict()  # plain strings for YAML, JSON, W&B and checkpoints
    assert {type(saved["model"][k]) for k in ("family", "sharing", "kv_mode", "attention_backend")} == {str}
    assert type(saved["router"]["type"]) is str and yaml.safe_load(cfg.to_yaml()) == saved
    with pytest.raises(ConfigError, match=r"^model.family: 'moe' is not one of vanilla, recursive, mor$"):
        load_config("tiny-mor", ["model.family=moe"])
    with pytest.raises(ConfigError, match=r"^model.sharing='sequence': MoR routes over contiguous"):
        load_config("tiny-mor", ["model.sharing=sequence"])


def test_every_mistake_of_a_yaml_file_is_reported_at_once(tmp_path):
    path = tmp_path / "run.yaml"
    path.write_text("preset: tiny-mor\nmodel: {hiden_size: 64, num_heads: many}\noptim: {lr: -1}\n"
                    "train: {seq_len: 1, zero_stage: 4}\n")
    with pytest.raises(ConfigError) as err:
        load_config(str(path))
    message = str(err.value)
    assert message.startswith("2 problems: model.num_heads: 'many' is not an int; model.hiden_size: unknown key "
                              "(did you mean hidden_size?) (known: ") and "\n" not in message
    path.write_text("preset: tiny-mor\noptim: {lr: -1}\ntrain: {seq_len: 1, zero_stage: 4}\n")
    with pytest.raises(ConfigError) as err:  # the values parse: every rule they break
        load_config(str(path))
    assert str(err.value) == ("3 problems: train.seq_len=1: must be >= 2; train.zero_stage=4: must be 0, 1, 2 or 3; "
                              "optim.lr=-1.0: must be > 0")


def test_amounts_take_the_planner_suffixes():
    cfg = load_config("tiny-mor", ["train.max_tokens=20B", "train.max_flops=1.5e18", "train.max_steps=2k"])
    assert (cfg.train.max_tokens, cfg.train.max_flops, cfg.train.max_steps) == (20_000_000_000, 1.5e18, 2000)
    with pytest.raises(ConfigError, match=r"train.max_tokens: '20 bananas' is not an int"):
        load_config("tiny-mor", ["train.max_tokens=20 bananas"])
    with pytest.raises(ConfigError, match=r"train.max_steps: 1.5 is not an int"):
        load_config("tiny-mor", ["train.max_steps=1.5"])


@pytest.mark.parametrize("name,message", [
    ("mor-360m-nr5", "preset 'mor-360m-nr5': -nr5 is not a preset (N in 2, 3, 4; other depths: a YAML config with "
                     "model.num_recursions)"),
    ("mor-360-nr3", "preset 'mor-360-nr3': unknown (did you mean mor-360m-nr3"),
])
def test_preset_names_say_what_exists(name, message):
    with pytest.raises(ConfigError) as err:
        load_config(name)
    assert str(err.value).startswith(message)
    assert {"mor-360m-nr3-kvshare", "recursive-135m-nr2-kvshare", "mor-1.7b-nr4-tc-kvshare"} <= set(list_presets())
