"""Trained weights for eval and inference, without DeepSpeed's engine.

    model, cfg = load_model("runs/mor3/model.safetensors")     # an export (`mor-ds export`)
    model, cfg = load_model("runs/mor3")                        # a run dir / checkpoints dir / step_* dir:
                                                                # ZeRO shards consolidated on the fly (their
                                                                # digests checked: a damaged one is refused)

An export is one safetensors file of the fp32 state dict (tied weights stored once) whose metadata holds the
resolved config (`mor_ds.config`), the step and the token count, so it is self-describing.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import torch
from safetensors import safe_open
from safetensors.torch import load_model as _load_safetensors_model
from safetensors.torch import save_model as _save_safetensors_model

from mor_ds.config import Config, from_saved
from mor_ds.models import build_model

CONFIG_KEY = "mor_ds_config"


def _build(cfg: Config) -> torch.nn.Module:
    return build_model(cfg.model, cfg.router)


def export_checkpoint(checkpoint: str | Path, out: str | Path) -> dict[str, Any]:
    """Consolidate a (ZeRO-sharded) checkpoint into one safetensors file; returns the metadata written."""
    from mor_ds.distributed import consolidate_checkpoint
    from mor_ds.train.checkpoint_dir import checkpoint_meta, intact_checkpoint

    ref = intact_checkpoint(checkpoint)
    meta = checkpoint_meta(ref)
    cfg = from_saved(meta["config"])
    state = consolidate_checkpoint(ref.root, ref.tag)
    model = _build(cfg)
    model.load_state_dict(state, strict=True)  # every weight accounted for, names as the plain model has them
    metadata = {CONFIG_KEY: json.dumps(cfg.to_dict()), "step": str(meta["step"]),
                "tokens": str(meta.get("tokens", "")), "source": str(ref.path)}
    write_safetensors(model, out, metadata)
    return metadata


def write_safetensors(model: torch.nn.Module, out: str | Path, metadata: dict[str, str]) -> Path:
    """`model`'s state dict to `out`, atomically (a reader never sees half a file), mode per the umask."""
    from mor_ds.outputs import honour_umask

    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_name(f".{out.name}.tmp")
    _save_safetensors_model(model, str(tmp), metadata=metadata)
    honour_umask(tmp)
    tmp.replace(out)
    return out


def read_export_metadata(path: str | Path) -> dict[str, str]:
    with safe_open(str(path), framework="pt") as f:
        return f.metadata() or {}


def load_model(path: str | Path, device: str | torch.device = "cpu") -> tuple[torch.nn.Module, Config]:
    """(model in eval mode, its Config) from an export file or a DeepSpeed checkpoint written by `mor-ds train`."""
    path = Path(path)
    if path.is_file():
        metadata = read_export_metadata(path)
        if CONFIG_KEY not in metadata:
            raise ValueError(f"{path}: not a mor-ds export (no {CONFIG_KEY!r} in the safetensors metadata)")
        cfg = from_saved(json.loads(metadata[CONFIG_KEY]))
        model = _build(cfg)
        _load_safetensors_model(model, str(path), strict=True)
    else:
        from mor_ds.distributed import consolidate_checkpoint
        from mor_ds.train.checkpoint_dir import checkpoint_meta, intact_checkpoint

        ref = intact_checkpoint(path)
        cfg = from_saved(checkpoint_meta(ref)["config"])
        model = _build(cfg)
        model.load_state_dict(consolidate_checkpoint(ref.root, ref.tag), strict=True)
    return model.to(device).eval(), cfg
