"""Uptraining: initialise a recursive / MoR model from a trained vanilla model, then train it as usual.

Every unrolled position p = 0…L_t−1 of the target's layer plan corresponds to a vanilla layer
v(p) = round(p·(L_v−1)/(L_t−1)) — the identity when both have the same depth (the presets name recursive / MoR
models after the vanilla model they unroll to); when the paper deepens the model to make (L−2) divisible by Nr
(360M Nr=4: 34 vs 32 layers) positions spread evenly over the vanilla stack, first and last kept.
A parameterised target layer j runs at the positions P_j = {p : plan.unrolled[p] uses j}, i.e. it replaces the
vanilla layers v(P_j) (for middle-cycle: the unique first/last layers replace vanilla layers 0 and L_v−1, shared
layer i replaces 1+i, 1+i+B, …, 1+i+(Nr−1)·B). Its weights are
  average  the mean of those vanilla layers' weights (attention, MLP and both norms)
  select   the vanilla layer at recursion step `select_step` (0 = the lowest one it replaces)
Embeddings, the final norm and the LM head are copied; MoR routers keep their fresh initialisation.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

import torch

from mor_ds.config import Config
from mor_ds.models import CausalLM

INIT_MODES = ("average", "select")
# model keys that must agree between the vanilla source and the target (shapes and the function they compute)
_MATCHING_KEYS = ("vocab_size", "hidden_size", "num_heads", "num_kv_heads", "intermediate_size", "rope_theta",
                  "rms_norm_eps", "tie_embeddings")


class UptrainError(ValueError):
    """A source model that cannot initialise the target; the one-line message names the mismatch."""


@dataclass
class UptrainPlan:
    """Which vanilla layers initialise each parameterised target layer (target layer id → vanilla layer ids)."""

    sources: dict[int, list[int]]
    mode: str
    select_step: int = 0
    chosen: dict[int, list[int]] = field(default_factory=dict)  # the layers actually used (select: one)

    def describe(self) -> str:
        return f"{self.mode}: " + ", ".join(f"{j}←{'+'.join(map(str, v))}" for j, v in self.chosen.items())


def check_compatible(source_cfg: Config, target_cfg: Config) -> None:
    src, dst = source_cfg.model, target_cfg.model
    if src.family != "vanilla":
        raise UptrainError(f"uptrain: the source model is family {src.family!r}; uptraining starts from a vanilla "
                           "model")
    if dst.family == "vanilla":
        raise UptrainError("uptrain: the target config is family 'vanilla'; use a recursive-… or mor-… config")
    for key in _MATCHING_KEYS:
        a, b = getattr(src, key), getattr(dst, key)
        if a != b:
            raise UptrainError(f"uptrain: model.{key} differs: source {a!r} vs target config {b!r}")


def layer_sources(target: CausalLM, vanilla_layers: int) -> dict[int, list[tuple[int, int]]]:
    """target layer id → [(vanilla layer, recursion step)] of every unrolled position it runs at."""
    unrolled = target.plan.unrolled
    scale = (vanilla_layers - 1) / max(1, len(unrolled) - 1)
    out: dict[int, list[tuple[int, int]]] = {}
    for position, (layer_id, step) in enumerate(unrolled):
        out.setdefault(layer_id, []).append((round(position * scale), step))
    return out


@torch.no_grad()
def init_from_vanilla(target: CausalLM, vanilla: CausalLM, mode: str = "average", select_step: int = 0) -> UptrainPlan:
    """Copy / average `vanilla`'s weights into `target` in place (see the module docstring); returns the plan."""
    if mode not in INIT_MODES:
        raise UptrainError(f"uptrain: init mode {mode!r} is not one of {', '.join(INIT_MODES)}")
    if not 0 <= select_step < target.plan.num_recursions:
        raise UptrainError(f"uptrain: select step {select_step} is outside 0…{target.plan.num_recursions - 1}")
    sources = layer_sources(target, len(vanilla.layers))
    plan = UptrainPlan({j: [v for v, _ in s] for j, s in sources.items()}, mode, select_step)
    for layer_id, layer in enumerate(target.layers):
        placed = sources[layer_id]
        if mode == "select":
            steps = {step: v for v, step in placed}
            chosen = [steps.get(select_step, placed[0][0])]  # unique layers run at step 0 only
        else:
            chosen = sorted({v for v, _ in placed}) if len(placed) > 1 else [placed[0][0]]
        plan.chosen[layer_id] = chosen
        for name, param in layer.state_dict().items():
            stacked = torch.stack([vanilla.layers[v].state_dict()[name].float() for v in chosen])
            param.copy_(stacked.mean(dim=0).to(param.dtype))
    target.embed.weight.copy_(vanilla.embed.weight)
    target.norm.weight.copy_(vanilla.norm.weight)
    if not target.cfg.tie_embeddings:
        target.lm_head.weight.copy_(vanilla.lm_head.weight)
    return plan


def load_vanilla(source: str | Path) -> tuple[CausalLM, Config]:
    """A vanilla model from a mor-ds checkpoint / export, or from a local Hugging Face Llama directory."""
    from mor_ds.weights import load_model
    from mor_ds.interop import import_hf

    path = Path(source).expanduser()
    if path.is_dir() and (path / "config.json").is_file():
        return import_hf(path)
    return load_model(path)


def uptrain_config(source_cfg: Config, target_cfg: Config) -> Config:
    """The target config, checked against the source; it inherits the source's tokenizer when it names none."""
    import dataclasses

    check_compatible(source_cfg, target_cfg)
    if not target_cfg.data.tokenizer and source_cfg.data.tokenizer:
        target_cfg = dataclasses.replace(target_cfg,
                                         data=dataclasses.replace(target_cfg.data, tokenizer=source_cfg.data.tokenizer))
    return target_cfg
