"""Presets: every name loads, sizes match their names and the paper, the paper recipe is carried, bad names
fail with one line naming the preset."""

from __future__ import annotations

import re

import pytest

from mor_ds.cli import main
from mor_ds.config import ConfigError, load_config
from mor_ds.flops import count_params, router_params
from mor_ds.models.sharing import paper_num_layers
from mor_ds.presets import PAPER_SIZES, list_presets, preset_dict

SIZE = {"135m": 135e6, "360m": 360e6, "730m": 730e6, "1.7b": 1.7e9}
PAPER_BUDGET = {"135m": 16.5e18, "360m": 16.5e18, "730m": 16.5e18, "1.7b": 68.5e18}


def test_every_listed_preset_loads_and_names_are_unique():
    names = list_presets()
    assert len(names) == len(set(names))
    for size in PAPER_SIZES:
        assert f"vanilla-{size}" in names
        for nr in (2, 3, 4):
            assert {f"recursive-{size}-nr{nr}", f"mor-{size}-nr{nr}", f"mor-{size}-nr{nr}-tc"} <= set(names)
    for name in names:
        cfg = load_config(name)
        assert cfg.name == name


@pytest.mark.parametrize("size", PAPER_SIZES)
def test_vanilla_parameter_count_within_2_percent_of_its_name(size):
    cfg = load_config(f"vanilla-{size}")
    params = count_params(cfg.model, cfg.router, unique=True, embedding=True)
    assert params == pytest.approx(SIZE[size], rel=0.02)


@pytest.mark.parametrize("size", PAPER_SIZES)
@pytest.mark.parametrize("nr", (2, 3, 4))
@pytest.mark.parametrize("family", ("recursive", "mor"))
def test_recursive_presets_unroll_to_their_vanilla_model(size, nr, family):
    """Named after the vanilla model they unroll to: same shape, same depth unless (L−2) is not divisible by
    Nr, where the depth grows as in the paper (360M Nr=4: 34 layers, 135M Nr=3: 32 layers)."""
    vanilla = load_config(f"vanilla-{size}").model
    cfg = load_config(f"{family}-{size}-nr{nr}")
    m = cfg.model
    assert (m.hidden_size, m.num_heads, m.num_kv_heads, m.intermediate_size, m.vocab_size) == (
        vanilla.hidden_size, vanilla.num_heads, vanilla.num_kv_heads, vanilla.intermediate_size, vanilla.vocab_size)
    assert (m.family, m.num_recursions, m.sharing, m.kv_mode) == (family, nr, "middle_cycle", "cache")
    assert m.num_layers == paper_num_layers(vanilla.num_layers, nr, "middle_cycle")
    # unrolled non-embedding parameters = the vanilla model's layers at the (adjusted) depth + MoR routers
    vanilla_layers = count_params(vanilla, unique=True, embedding=False) - vanilla.hidden_size  # minus final norm
    unrolled = count_params(m, cfg.router, unique=False, embedding=False) - m.hidden_size - router_params(m, cfg.router)
    assert unrolled * vanilla.num_layers == vanilla_layers * m.num_layers
    assert (router_params(m, cfg.router) > 0) == (family == "mor")


def test_paper_depth_adjustments():
    assert load_config("mor-360m-nr4").model.num_layers == 34
    assert load_config("mor-135m-nr3").model.num_layers == 32
    assert load_config("mor-360m-nr3").model.num_layers == 32


@pytest.mark.parametrize("name,paper_millions", [
    ("vanilla-360m", 315), ("mor-360m-nr2", 167), ("mor-360m-nr3", 118),
    ("recursive-360m-nr2", 167), ("recursive-360m-nr3", 118),
])
def test_unique_non_embedding_params_match_the_paper_at_360m(name, paper_millions):
    cfg = load_config(name)
    assert count_params(cfg.model, cfg.router, unique=True, embedding=False) == pytest.approx(paper_millions * 1e6,
                                                                                             rel=0.03)


@pytest.mark.parametrize("size", PAPER_SIZES)
def test_paper_presets_carry_the_paper_recipe(size):
    for name in (f"vanilla-{size}", f"mor-{size}-nr2", f"mor-{size}-nr3-tc"):
        t = load_config(name).train
        assert (t.seq_len, t.global_batch_size, t.flops_convention) == (2048, 1024, "paper")
        assert t.max_flops == PAPER_BUDGET[size]
        assert t.precision == "bf16" and t.zero_stage == 2
    o = load_config(f"vanilla-{size}").optim
    assert (o.lr, o.betas, o.weight_decay, o.grad_clip, o.schedule) == (3e-3, [0.9, 0.95], 0.1, 1.0, "wsd")
    assert (o.warmup_fraction, o.decay_fraction) == (0.05, 0.2)


def test_paper_router_defaults():
    ec = load_config("mor-360m-nr3")
    assert (ec.router.type, ec.router.activation, ec.router.alpha, ec.router.aux_loss_coef) == (
        "expert_choice", "sigmoid", 0.1, 0.001)
    assert ec.router.capacities(3) == pytest.approx([1.0, 2 / 3, 1 / 3])
    tc = load_config("mor-360m-nr3-tc")
    assert (tc.router.type, tc.router.balance_loss_coef, tc.router.z_loss_coef) == ("token_choice", 0.1, 1e-5)
    assert load_config("tiny-mor-kvshare").model.kv_mode == "share"


BAD_NAMES = [
    "vanilla-999m",  # unknown size
    "gpt-360m",  # unknown family
    "vanilla-360m-nr2",  # vanilla takes no recursion
    "vanilla-360m-tc",
    "recursive-360m",  # recursive needs -nr
    "mor-360m",
    "recursive-360m-nr2-tc",  # token choice is for MoR
    "mor-360m-nr0",
    "mor-360m-nr3-tc-extra",
]


@pytest.mark.parametrize("name", BAD_NAMES)
def test_bad_preset_name_is_a_one_line_error_naming_it(name):
    with pytest.raises(ConfigError) as err:
        preset_dict(name)
    message = str(err.value)
    assert name in message and "\n" not in message


@pytest.mark.parametrize("name", ["vanilla-360m-nr2", "mor-999m-nr2"])
def test_plan_reports_bad_preset_on_one_stderr_line(name, capsys):
    assert main(["plan", "--config", name]) == 2
    captured = capsys.readouterr()
    lines = captured.err.strip().splitlines()
    assert len(lines) == 1 and name in lines[0] and lines[0].startswith("mor-ds plan: config error:")
    assert captured.out == ""


def test_plan_list_names_every_preset_with_its_shape(capsys):
    assert main(["plan", "--list"]) == 0
    out = capsys.readouterr().out
    for name in list_presets():
        assert re.search(rf"^│ {re.escape(name)} +│", out, re.M), name
    row = next(line for line in out.splitlines() if line.startswith("│ mor-360m-nr2 "))
    cells = [c.strip() for c in row.strip("│").split("│")]
    assert cells == ["mor-360m-nr2", "mor", "2", "32", "960", "361.82M", "214.34M", "167.15M"]
