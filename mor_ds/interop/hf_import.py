"""`mor-ds import-hf PATH`: a local Hugging Face Llama checkpoint (e.g. a downloaded SmolLM) → our vanilla model.

Only what our block computes is accepted: Llama architecture, SiLU SwiGLU, no attention/MLP biases, default RoPE,
head_dim = hidden_size / num_heads. Anything else is a one-line InteropError naming the config key. Nothing is
downloaded: PATH must be a local directory.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch

from mor_ds.config import Config, ModelConfig, from_dict
from mor_ds.interop.errors import InteropError
from mor_ds.interop.progress import no_progress_bars
from mor_ds.interop.llama_names import from_hf
from mor_ds.models import CausalLM, build_model

TOKENIZER_FILES = ("tokenizer.json", "tokenizer.model")


def _rope_theta(hf) -> float:
    params = getattr(hf, "rope_parameters", None) or {}
    rope_type = params.get("rope_type", "default")
    scaling = getattr(hf, "rope_scaling", None)
    if rope_type != "default" or (scaling and scaling.get("rope_type", scaling.get("type")) not in (None, "default")):
        raise InteropError(f"import-hf: rope scaling {scaling or params} is not supported (only default RoPE)")
    return float(params.get("rope_theta", getattr(hf, "rope_theta", 10000.0)))


def model_config_from_hf(hf) -> ModelConfig:
    """Our ModelConfig of a transformers LlamaConfig; InteropError naming the first key we cannot represent."""
    if hf.model_type != "llama":
        raise InteropError(f"import-hf: model_type={hf.model_type!r}, expected 'llama' (a LlamaForCausalLM checkpoint)")
    checks = (("hidden_act", "silu"), ("attention_bias", False), ("mlp_bias", False), ("pretraining_tp", 1))
    for key, want in checks:
        value = getattr(hf, key, want)
        if value != want:
            raise InteropError(f"import-hf: config.json {key}={value!r} is not supported (need {want!r})")
    kv_heads = hf.num_key_value_heads or hf.num_attention_heads
    head_dim = getattr(hf, "head_dim", None) or hf.hidden_size // hf.num_attention_heads
    if head_dim * hf.num_attention_heads != hf.hidden_size:
        raise InteropError(f"import-hf: config.json head_dim={head_dim} with num_attention_heads="
                           f"{hf.num_attention_heads} does not give hidden_size={hf.hidden_size}")
    return ModelConfig(
        family="vanilla", vocab_size=hf.vocab_size, hidden_size=hf.hidden_size, num_layers=hf.num_hidden_layers,
        num_heads=hf.num_attention_heads, num_kv_heads=kv_heads, intermediate_size=hf.intermediate_size,
        rope_theta=_rope_theta(hf), rms_norm_eps=hf.rms_norm_eps, tie_embeddings=bool(hf.tie_word_embeddings),
        init_std=getattr(hf, "initializer_range", 0.02))


def find_tokenizer(path: Path) -> str:
    """The tokenizer file of a Hugging Face directory (tokenizer.json preferred), or ''."""
    for name in TOKENIZER_FILES:
        if (path / name).is_file():
            return str((path / name).resolve())
    return ""


def write_export(model: CausalLM, cfg: Config, out: str | Path, source: str) -> Path:
    """Save `model` as a mor-ds export (the single-safetensors format mor_ds.weights.load_model reads)."""
    from mor_ds.weights import CONFIG_KEY, write_safetensors

    return write_safetensors(model, out, {CONFIG_KEY: json.dumps(cfg.to_dict()), "step": "0", "tokens": "",
                                          "source": source})


def import_hf(path: str | Path, base: Config | None = None) -> tuple[CausalLM, Config]:
    """Load a local LlamaForCausalLM directory into our vanilla model. `base` supplies the non-model sections
    (data, optim, train…); its model section is replaced. data.tokenizer points at the checkpoint's tokenizer file
    when it has one; train.seq_len = max_position_embeddings unless `base` sets it."""
    from transformers import AutoConfig, LlamaForCausalLM

    path = Path(path).expanduser()
    if not (path / "config.json").is_file():
        raise InteropError(f"import-hf: {path} has no config.json (expected a local Hugging Face model directory)")
    if "auto_map" in json.loads((path / "config.json").read_text()):  # custom modeling code, e.g. a MoR export
        raise InteropError(f"import-hf: {path} needs its own modeling code (config.json has auto_map); import-hf "
                           f"reads Llama checkpoints — a mor-ds recursive/MoR model loads from its run dir or its "
                           f"`mor-ds export` file directly")
    try:  # never run a directory's code, and never ask whether to (transformers' [y/N] prompt)
        hf_config = AutoConfig.from_pretrained(str(path), local_files_only=True, trust_remote_code=False)
    except (ValueError, OSError) as exc:
        raise InteropError(f"import-hf: {path}/config.json: {str(exc).splitlines()[0]}") from None
    model_cfg = model_config_from_hf(hf_config)
    data = (base or Config()).to_dict()
    data["model"] = {**data["model"], **{k: v for k, v in vars(model_cfg).items()}}
    data["router"] = Config().to_dict()["router"]
    if base is None:
        data["train"]["seq_len"] = hf_config.max_position_embeddings
    tokenizer = find_tokenizer(path)
    if tokenizer:
        data["data"]["tokenizer"] = tokenizer
    cfg = from_dict(data)

    try:
        with no_progress_bars():
            hf = LlamaForCausalLM.from_pretrained(str(path), local_files_only=True, dtype=torch.float32)
    except (OSError, ValueError, RuntimeError) as exc:
        raise InteropError(f"import-hf: {path}: cannot load the weights ({str(exc).splitlines()[0]})") from None
    model = build_model(cfg.model, cfg.router)
    state = {}
    for name, tensor in hf.state_dict().items():
        ours = from_hf(name)
        if ours is None:
            raise InteropError(f"import-hf: {path}: unexpected parameter {name!r}")
        state[ours] = tensor
    if cfg.model.tie_embeddings:
        state.pop("lm_head.weight", None)
    missing, unexpected = model.load_state_dict(state, strict=False)
    missing = [k for k in missing if not (cfg.model.tie_embeddings and k == "lm_head.weight")]
    if missing or unexpected:
        raise InteropError(f"import-hf: {path}: weights do not match config.json (missing {missing[:3]}, "
                           f"unexpected {unexpected[:3]})")
    return model, cfg
