"""Uptraining a vanilla model into recursive / MoR: the layer mapping, average / select initialisation, errors, and
end to end through the real trainer: uptrained MoR beats the same MoR from scratch after the same few steps."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest
import torch
from transformers import LlamaConfig, LlamaForCausalLM

from fixtures.tiny_lm import VOCAB, tiny_config, tiny_model
from mor_ds.cli import main as cli_main
from mor_ds.interop import write_export
from mor_ds.models import build_model
from mor_ds.uptrain import UptrainError, init_from_vanilla, layer_sources, load_vanilla, uptrain_config


def layer_params(layer) -> dict[str, torch.Tensor]:
    return {k: v.clone() for k, v in layer.state_dict().items()}


def test_middle_cycle_layer_sources():
    # L=6, Nr=2: layer 0 and 3 unique; shared layer 1 at positions 1 and 3, shared layer 2 at 2 and 4
    target = build_model(tiny_config("tiny-mor").model)
    assert layer_sources(target, 6) == {0: [(0, 0)], 1: [(1, 0), (3, 1)], 2: [(2, 0), (4, 1)], 3: [(5, 0)]}
    # deeper target (L=8, Nr=3) over a 6-layer vanilla: positions spread evenly, first and last kept
    deeper = build_model(tiny_config("tiny-mor", "model.num_layers=8", "model.num_recursions=3").model)
    placed = [v for s in layer_sources(deeper, 6).values() for v, _ in s]
    assert sorted(placed) == [0, 1, 1, 2, 3, 4, 4, 5]


@pytest.mark.parametrize("mode, step", [("average", 0), ("select", 0), ("select", 1)])
def test_init_average_and_select(mode, step):
    vanilla = tiny_model(tiny_config("tiny-vanilla"), seed=1)
    cfg = tiny_config("tiny-mor")
    target = tiny_model(cfg, seed=2)
    fresh_routers = {k: v.clone() for k, v in target.state_dict().items() if k.startswith("recursion.")}
    plan = init_from_vanilla(target, vanilla, mode, step)

    replaced = {1: (1, 3), 2: (2, 4)}  # shared layer -> the vanilla layers it replaces at steps 0, 1
    for j, sources in replaced.items():
        want = [layer_params(vanilla.layers[v]) for v in (sources if mode == "average" else (sources[step],))]
        for name, value in target.layers[j].state_dict().items():
            torch.testing.assert_close(value, torch.stack([w[name] for w in want]).mean(0))
    for j, v in ((0, 0), (3, 5)):  # unique first / last layers are copies
        for name, value in target.layers[j].state_dict().items():
            assert torch.equal(value, vanilla.layers[v].state_dict()[name])
    assert torch.equal(target.embed.weight, vanilla.embed.weight)
    assert torch.equal(target.norm.weight, vanilla.norm.weight)
    for k, v in fresh_routers.items():  # routers start fresh
        assert torch.equal(target.state_dict()[k], v)
    assert plan.chosen[1] == ([1, 3] if mode == "average" else [replaced[1][step]])


@pytest.mark.parametrize("mode", ["average", "select"])
def test_recursion_free_target_reproduces_the_vanilla_model(mode):
    """A recursive model with Nr=1 unrolls to the vanilla stack itself: after init its logits equal the vanilla's."""
    vanilla = tiny_model(tiny_config("tiny-vanilla", "model.tie_embeddings=false"), seed=1)
    cfg = tiny_config("tiny-recursive", "model.num_recursions=1", "model.tie_embeddings=false")
    target = tiny_model(cfg, seed=2)
    init_from_vanilla(target, vanilla, mode)
    ids = torch.randint(0, VOCAB, (2, 21), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        torch.testing.assert_close(target(ids).logits, vanilla(ids).logits)


def test_from_hugging_face_llama_directory(tmp_path):
    torch.manual_seed(0)
    hf = LlamaForCausalLM(LlamaConfig(vocab_size=VOCAB, hidden_size=64, intermediate_size=128, num_hidden_layers=6,
                                      num_attention_heads=4, num_key_value_heads=2, tie_word_embeddings=True,
                                      rms_norm_eps=1e-5, max_position_embeddings=64))
    hf.save_pretrained(tmp_path / "llama")
    vanilla, source_cfg = load_vanilla(tmp_path / "llama")
    cfg = uptrain_config(source_cfg, tiny_config("tiny-mor"))
    target = build_model(cfg.model, cfg.router)
    init_from_vanilla(target, vanilla)
    assert torch.equal(target.embed.weight, hf.model.embed_tokens.weight)
    assert torch.equal(target.layers[0].attn.q_proj.weight, hf.model.layers[0].self_attn.q_proj.weight)


def test_incompatible_sources_are_one_line_errors(tmp_path, capsys):
    vanilla_cfg, mor_cfg = tiny_config("tiny-vanilla"), tiny_config("tiny-mor")
    with pytest.raises(UptrainError, match=r"^uptrain: model.hidden_size differs: source 64 vs target config 96$"):
        uptrain_config(vanilla_cfg, tiny_config("tiny-mor", "model.hidden_size=96"))
    with pytest.raises(UptrainError, match=r"^uptrain: the target config is family 'vanilla'"):
        uptrain_config(vanilla_cfg, vanilla_cfg)
    with pytest.raises(UptrainError, match=r"^uptrain: init mode 'mean' is not one of average, select$"):
        init_from_vanilla(build_model(mor_cfg.model), build_model(vanilla_cfg.model), "mean")

    # through the command: a MoR checkpoint as --from, and a shape mismatch
    mor_file = write_export(tiny_model(mor_cfg), mor_cfg, tmp_path / "mor.safetensors", source="test")
    assert cli_main(["uptrain", "--from", str(mor_file), "--config", "tiny-mor", "--run-dir", str(tmp_path / "r")]) == 2
    err = capsys.readouterr().err.strip()
    assert err == (f"mor-ds uptrain: --from {mor_file}: the source model is family 'mor'; "
                   f"uptraining starts from a vanilla model")
    van_file = write_export(tiny_model(vanilla_cfg), vanilla_cfg, tmp_path / "van.safetensors", source="test")
    assert cli_main(["uptrain", "--from", str(van_file), "--config", "tiny-mor", "--run-dir", str(tmp_path / "r")]) == 2
    err = capsys.readouterr().err.strip()
    assert err == f"mor-ds uptrain: --from {van_file}: model.vocab_size differs: source {VOCAB} vs target config 4096"
    assert not (tmp_path / "r").exists()


# ------------------------------------------------------------------------------------ end to end with the trainer

# a small, fast run of the embedded demo corpus (its tokenizer has 4096 ids)
TRAIN_SETS = ["model.hidden_size=64", "model.num_heads=2", "model.num_kv_heads=1", "model.intermediate_size=128",
              "train.seq_len=64", "train.micro_batch_size=8", "train.global_batch_size=8", "train.eval_batches=4",
              "train.log_interval=50", "train.zero_stage=1", "wandb.enabled=false"]


def mor_ds(*argv: str, steps: int, cwd) -> None:
    sets = [x for s in TRAIN_SETS + [f"train.max_steps={steps}", f"train.eval_interval={steps}"] for x in ("--set", s)]
    # one intra-op thread: on a 2-core machine shared with other jobs torch's thread pool is many times slower
    env = {**os.environ, "OMP_NUM_THREADS": "1", "WANDB_MODE": "disabled"}
    subprocess.run([sys.executable, "-m", "mor_ds.cli", *argv, *sets], check=True, env=env, cwd=cwd, timeout=600,
                   stdout=subprocess.DEVNULL)


def final_val_loss(run_dir) -> float:
    records = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    return [r["val/loss"] for r in records if "val/loss" in r][-1]


def test_uptrained_mor_beats_mor_from_scratch(tmp_path):
    """Through the Hugging Face round trip a user takes: export --format hf → import-hf → uptrain. The import names
    the export's tokenizer.json, converted from the tokenizer.model the shards were made with: the same tokenizer."""
    mor_ds("train", "--config", "tiny-vanilla", "--run-dir", str(tmp_path / "vanilla"), steps=120, cwd=tmp_path)
    for argv in (["export", "--checkpoint", "vanilla", "--format", "hf", "--out", "hf"],
                 ["import-hf", "hf", "--out", "imported.safetensors"]):
        subprocess.run([sys.executable, "-m", "mor_ds.cli", *argv], check=True, cwd=tmp_path, timeout=600,
                       stdout=subprocess.DEVNULL)
    mor_ds("uptrain", "--from", str(tmp_path / "imported.safetensors"), "--config", "tiny-mor", "--run-dir",
           str(tmp_path / "up"), steps=8, cwd=tmp_path)
    assert json.loads((tmp_path / "up" / "provenance.json").read_text())["starts"][0]["data"]["tokenizer"]["path"] \
        == str(tmp_path / "hf" / "tokenizer.json")
    mor_ds("train", "--config", "tiny-mor", "--run-dir", str(tmp_path / "scratch"), steps=8, cwd=tmp_path)
    uptrained, scratch = final_val_loss(tmp_path / "up"), final_val_loss(tmp_path / "scratch")
    assert uptrained < scratch - 0.5, (uptrained, scratch)
