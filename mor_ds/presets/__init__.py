"""Preset names -> config dicts.

Scheme: `<family>-<size>[-nr<N>][-tc][-kvshare]` for the paper's sizes (135m, 360m, 730m, 1.7b) and
`tiny-<family>[-nr<N>][-tc][-kvshare]` for CPU runs, with family vanilla | recursive | mor.
Examples: vanilla-360m, recursive-360m-nr3, mor-360m-nr3, mor-360m-nr3-tc, tiny-mor.
Recursive/MoR presets are named after the vanilla model they unroll to; when (L−2) is not divisible
by Nr the depth grows as in the paper (360M Nr=4: 34 layers, 135M Nr=3: 32 layers).
Defaults follow the paper: middle-cycle sharing, expert-choice routing, recursion-wise KV caching.
"""

from __future__ import annotations

import difflib
import re
from functools import cache
from pathlib import Path
from typing import Any

from mor_ds.choices import KVMode, ModelFamily, RouterType, SharingStrategy
from mor_ds.config import ConfigError, merge, yaml_load
from mor_ds.models.sharing import paper_num_layers

PRESET_DIR = Path(__file__).parent
PAPER_SIZES = ("135m", "360m", "730m", "1.7b")  # one YAML each beside this file
NUM_RECURSIONS = (2, 3, 4)
TINY_DEFAULT_NR = 2


def _alternatives(values) -> str:
    return "|".join(re.escape(str(v)) for v in values)


_NAME = re.compile(
    rf"^(?:(?P<family>{_alternatives(ModelFamily)})-(?P<size>{_alternatives(PAPER_SIZES)})"
    rf"|tiny-(?P<tiny_family>{_alternatives(ModelFamily)}))"
    r"(?:-nr(?P<nr>\d+))?(?P<tc>-tc)?(?P<kvshare>-kvshare)?$"
)


@cache
def _yaml(name: str) -> dict[str, Any]:
    return yaml_load((PRESET_DIR / f"{name}.yaml").read_text())


def preset_dict(name: str) -> dict[str, Any]:
    """The config dict of a preset name; a ConfigError naming the preset if it does not parse."""
    match = _NAME.match(name)
    if not match:
        close = difflib.get_close_matches(name, list_presets(), n=3, cutoff=0.75)
        hint = f"did you mean {', '.join(close)}? " if close else ""
        raise ConfigError(f"preset {name!r}: unknown ({hint}see `mor-ds plan --list`; scheme "
                          f"<family>-<size>[-nr<N>][-tc][-kvshare], N in {', '.join(map(str, NUM_RECURSIONS))})")
    tiny = match["tiny_family"] is not None
    family = ModelFamily(match["tiny_family"] or match["family"])
    nr = int(match["nr"]) if match["nr"] else None
    if family == ModelFamily.VANILLA and (nr or match["tc"] or match["kvshare"]):
        raise ConfigError(f"preset {name!r}: vanilla presets take no -nr/-tc/-kvshare suffix")
    if family != ModelFamily.VANILLA and nr is None:
        if not tiny:
            raise ConfigError(f"preset {name!r}: {family} presets need -nr<N> (N in "
                              f"{', '.join(map(str, NUM_RECURSIONS))})")
        nr = TINY_DEFAULT_NR
    if match["tc"] and family != ModelFamily.MOR:
        raise ConfigError(f"preset {name!r}: -tc (token-choice routing) is for mor presets")
    if nr is not None and nr not in NUM_RECURSIONS:
        raise ConfigError(f"preset {name!r}: -nr{nr} is not a preset (N in {', '.join(map(str, NUM_RECURSIONS))}; "
                          f"other depths: a YAML config with model.num_recursions)")

    data = _yaml("tiny") if tiny else merge(_yaml("_paper_recipe"), _yaml(match["size"]))
    model: dict[str, Any] = {"family": family.value}
    if family != ModelFamily.VANILLA:
        sharing = SharingStrategy.MIDDLE_CYCLE
        model["num_recursions"] = nr
        model["sharing"] = sharing.value
        model["num_layers"] = paper_num_layers(data["model"]["num_layers"], nr, sharing)
    if match["kvshare"]:
        model["kv_mode"] = KVMode.SHARE.value
    overlay: dict[str, Any] = {"name": name, "model": model}
    if match["tc"]:
        # token-choice as in the released paper configs: linear router, softmax over Nr depths, α = 1, balancing
        # loss 0.1, z-loss 1e-5
        overlay["router"] = {"type": RouterType.TOKEN_CHOICE.value, "activation": "softmax", "arch": "linear",
                             "alpha": 1.0, "z_loss_coef": 1e-5}
    return merge(data, overlay)


@cache
def list_presets() -> list[str]:
    """Every name the scheme accepts."""
    names = []
    for size in PAPER_SIZES:
        names.append(f"vanilla-{size}")
        for nr in NUM_RECURSIONS:
            for stem in (f"recursive-{size}-nr{nr}", f"mor-{size}-nr{nr}", f"mor-{size}-nr{nr}-tc"):
                names += [stem, f"{stem}-kvshare"]
    names.append("tiny-vanilla")
    for stem in ("tiny-recursive", "tiny-mor", "tiny-mor-tc"):
        names += [stem, f"{stem}-kvshare"]
    return names
