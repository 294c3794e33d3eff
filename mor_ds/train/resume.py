"""Settings that may change when a run resumes, and the check of a resumed run's config against its checkpoint's.

A resumed run continues the checkpoint's computation: the model, optimizer, schedule shape, data and batch must
stay what they were, or the run's history mixes two experiments. What may change is how long it runs (the budget),
what is logged and saved, and how the same computation is laid out on the hardware. Any other change is refused,
naming each key with its old and new value, unless `--allow-changes` is given (then provenance.json records it).
"""

from __future__ import annotations

from typing import Any

from mor_ds.config import ConfigError

# dotted key or section prefix -> why a change leaves the run's computation as it was
SAFE_TO_CHANGE: dict[str, str] = {
    "name": "a label",
    "train.max_steps": "budget", "train.max_tokens": "budget", "train.max_flops": "budget",
    "train.flops_convention": "budget",
    "train.log_interval": "logging", "train.eval_interval": "logging", "train.eval_batches": "logging",
    "train.peak_tflops": "logging", "train.max_bad_steps": "fault handling",
    "train.collective_timeout_s": "fault handling",
    "checkpoint.": "checkpointing", "wandb.": "W&B",
    "train.micro_batch_size": "memory (the global batch stays)", "train.activation_checkpointing": "memory",
    "train.compile": "speed", "train.zero3_block_fetch": "speed", "model.attention_backend": "speed",
    "model.fused_loss": "speed", "model.loss_chunk_size": "speed", "optim.fused_step": "speed",
    "data.num_workers": "speed", "data.cache_dir": "where caches live",
}


def why_safe(key: str) -> str | None:
    for name, why in SAFE_TO_CHANGE.items():
        if key == name or (name.endswith(".") and key.startswith(name)):
            return why
    return None


def flatten(data: dict[str, Any], prefix: str = "") -> dict[str, Any]:
    out: dict[str, Any] = {}
    for key, value in data.items():
        full = f"{prefix}{key}"
        if isinstance(value, dict):
            out.update(flatten(value, f"{full}."))
        else:
            out[full] = value
    return out


def changed_settings(old: dict[str, Any], new: dict[str, Any]) -> dict[str, list[Any]]:
    """{dotted key: [old value, new value]} of every key whose value differs (a key only one side has: None)."""
    a, b = flatten(old), flatten(new)
    keys = list(a) + [k for k in b if k not in a]
    return {key: [a.get(key), b.get(key)] for key in keys if a.get(key) != b.get(key)}


def _fmt(changes: dict[str, list[Any]]) -> str:
    return ", ".join(f"{key}: {old!r} -> {new!r}" for key, (old, new) in changes.items())


def check_resume(old: dict[str, Any], new: dict[str, Any], source: str,
                 allow_changes: bool = False) -> tuple[dict[str, list[Any]], list[str]]:
    """(changes, notices): every changed key, and the lines to print; ConfigError naming every key that may not
    change (unless allow_changes)."""
    changes = changed_settings(old, new)
    safe = {k: v for k, v in changes.items() if why_safe(k)}
    unsafe = {k: v for k, v in changes.items() if not why_safe(k)}
    if unsafe and not allow_changes:
        safe_names = "the budget (train.max_steps/max_tokens/max_flops), logging and eval intervals, checkpoint.*, " \
                     "wandb.*, memory/speed settings (train.micro_batch_size, activation_checkpointing, compile, …)"
        raise ConfigError(f"resuming {source} with changed settings: {_fmt(unsafe)}; they change what the run "
                          f"computes (safe to change: {safe_names}); restore them, train into a new --run-dir, or "
                          f"pass --allow-changes to continue anyway")
    notices = []
    if safe:
        notices.append("resuming with changed settings (safe: "
                       + ", ".join(sorted({why_safe(k) for k in safe})) + "): " + _fmt(safe))
    if unsafe:
        notices.append(f"resuming with changed settings (--allow-changes): {_fmt(unsafe)}")
    return changes, notices
