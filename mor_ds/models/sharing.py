"""Layer -> shared-block maps for the four parameter-sharing strategies.

L unrolled layers, Nr recursions. A `LayerPlan` says which parameterised layer runs at each unrolled
position and at which recursion step r (0-based). Strategies (paper, Sec. 2):
  cycle            B = L/Nr; unrolled layer i + r·B uses shared layer i
  sequence         B = L/Nr; unrolled layers i·Nr … (i+1)·Nr−1 use shared layer i
  middle_cycle     layers 0 and L−1 unique; B = (L−2)/Nr; unrolled 1 + i + r·B uses shared layer i
  middle_sequence  layers 0 and L−1 unique; the middle grouped as in sequence
"""

from __future__ import annotations

from dataclasses import dataclass

from mor_ds.choices import SharingStrategy


@dataclass(frozen=True)
class LayerPlan:
    num_layers: int  # L, unrolled depth
    num_recursions: int  # Nr
    num_unique_layers: int  # parameterised layers
    prelude: tuple[int, ...]  # unique layers before the recursion (layer ids)
    coda: tuple[int, ...]  # unique layers after it
    # (layer id, recursion step r) per unrolled position of the recursive part, in execution order
    recursive_part: tuple[tuple[int, int], ...]

    @property
    def unrolled(self) -> tuple[tuple[int, int], ...]:
        """(layer id, recursion step) for every unrolled position; unique layers have step 0."""
        return tuple((i, 0) for i in self.prelude) + self.recursive_part + tuple((i, 0) for i in self.coda)

    def block(self, step: int) -> tuple[int, ...]:
        """Layer ids run at recursion step r, for strategies whose steps are contiguous (cycle-type)."""
        return tuple(i for i, r in self.recursive_part if r == step)

    @property
    def steps_contiguous(self) -> bool:
        steps = [r for _, r in self.recursive_part]
        return steps == sorted(steps)


@dataclass(frozen=True)
class _Shape:
    middle: bool  # layers 0 and L−1 unique
    cycle: bool  # recursion r runs the whole shared block (cycle) rather than each layer Nr times in a row


SHAPES: dict[SharingStrategy, _Shape] = {
    SharingStrategy.CYCLE: _Shape(middle=False, cycle=True),
    SharingStrategy.SEQUENCE: _Shape(middle=False, cycle=False),
    SharingStrategy.MIDDLE_CYCLE: _Shape(middle=True, cycle=True),
    SharingStrategy.MIDDLE_SEQUENCE: _Shape(middle=True, cycle=False),
}


def _middle(strategy: str) -> bool:
    return SHAPES[strategy].middle


def sharing_error(num_layers: int, num_recursions: int, strategy: str) -> str | None:
    """Why (L, Nr, strategy) is not a valid plan, or None."""
    if strategy not in SHAPES:
        return f"unknown sharing strategy {strategy!r} (one of {', '.join(SharingStrategy)})"
    shared = num_layers - 2 if _middle(strategy) else num_layers
    if shared < num_recursions:
        least = num_recursions + 2 * _middle(strategy)
        return f"{strategy} sharing with Nr={num_recursions} needs at least {least} layers"
    if shared % num_recursions:
        what = "num_layers - 2" if _middle(strategy) else "num_layers"
        return f"{what}={shared} must be divisible by num_recursions={num_recursions} for {strategy} sharing"
    return None


def layer_plan(num_layers: int, num_recursions: int, strategy: str = SharingStrategy.MIDDLE_CYCLE) -> LayerPlan:
    err = sharing_error(num_layers, num_recursions, strategy)
    if err:
        raise ValueError(err)
    middle = _middle(strategy)
    shared = num_layers - 2 if middle else num_layers
    base = shared // num_recursions  # B, shared layers per recursion
    first = 1 if middle else 0
    if SHAPES[strategy].cycle:
        part = tuple((first + i, r) for r in range(num_recursions) for i in range(base))
    else:
        part = tuple((first + i, r) for i in range(base) for r in range(num_recursions))
    return LayerPlan(
        num_layers=num_layers,
        num_recursions=num_recursions,
        num_unique_layers=base + 2 * first,
        prelude=(0,) if middle else (),
        coda=(base + 1,) if middle else (),
        recursive_part=part,
    )


def paper_num_layers(num_layers: int, num_recursions: int, strategy: str = SharingStrategy.MIDDLE_CYCLE) -> int:
    """The paper's depth adjustment: the smallest L' >= L with a valid plan (e.g. 360M Nr=4: 32 -> 34)."""
    depth = num_layers
    while sharing_error(depth, num_recursions, strategy):
        depth += 1
    return depth
