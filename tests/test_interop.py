"""Hugging Face interop: export (vanilla → LlamaForCausalLM, recursive/MoR → trust_remote_code) and import of a local
Llama checkpoint, checked by logits against our own forward pass; bad input gives one-line errors."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer, GPT2Config, LlamaConfig, LlamaForCausalLM

from fixtures.tiny_lm import VOCAB, tiny_config, tiny_model, tiny_tokenizer
from mor_ds.weights import load_model
from mor_ds.cli import main as cli_main
from mor_ds.interop import InteropError, export_hf, import_hf, write_export
from mor_ds.interop.hf_export import export_tokenizer

RECURSIVE = {"recursive": ("tiny-recursive", "model.num_layers=8"),
             "recursive_kvshare": ("tiny-recursive", "model.num_layers=8", "model.kv_mode=share"),
             "mor_ec": ("tiny-mor", "model.num_layers=8"),
             "mor_ec_aux_router": ("tiny-mor", "model.num_layers=8", "router.causal_mode=aux_router"),
             "mor_tc": ("tiny-mor-tc", "model.num_layers=8"),
             "mor_kvshare": ("tiny-mor-kvshare", "model.num_layers=8")}
TEXTS = ["The sky is blue.", "Bees make honey in the warm sun\nand fish live in water.", "Which number comes after 3?"]


@pytest.fixture(scope="module")
def tokenizer(tmp_path_factory):
    return tiny_tokenizer(tmp_path_factory.mktemp("tok"))


def token_batch(seed: int = 0, length: int = 29) -> torch.Tensor:
    return torch.randint(0, VOCAB, (2, length), generator=torch.Generator().manual_seed(seed))


def test_vanilla_export_is_a_plain_llama(tokenizer, tmp_path):
    cfg = tiny_config("tiny-vanilla", "model.rope_theta=50000.0")
    model = tiny_model(cfg)
    out = export_hf(model, cfg, tmp_path / "hf", tokenizer.path)
    assert json.loads((out / "config.json").read_text())["model_type"] == "llama"
    assert not list(out.glob("*.py"))
    hf = LlamaForCausalLM.from_pretrained(out).eval()
    ids = token_batch()
    with torch.no_grad():
        torch.testing.assert_close(hf(ids).logits, model(ids).logits, atol=1e-5, rtol=1e-5)

    hf_tok = AutoTokenizer.from_pretrained(out)
    for text in TEXTS:  # texts not starting with whitespace tokenize identically (see docs/evaluation.md)
        ids = tokenizer.encode_batch([text])[0]
        assert hf_tok.encode(text, add_special_tokens=False) == ids
        assert hf_tok.decode(ids) == text
    assert hf_tok.eos_token_id == tokenizer.eos_id == hf.config.eos_token_id


def test_export_with_a_hugging_face_tokenizer_json(tokenizer, tmp_path):
    """Runs tokenized with a tokenizer.json (e.g. SmolLM's) ship that file; AutoTokenizer encodes as we do."""
    from data_pipeline.tokenizer import load_tokenizer

    source = tmp_path / "tok"
    source.mkdir()
    export_tokenizer(tokenizer, source)  # a tokenizer.json (+ tokenizer_config.json naming EOS) to start from
    hf_json = load_tokenizer(str(source / "tokenizer.json"))
    assert hf_json.kind == "hf"
    cfg = tiny_config("tiny-vanilla")
    out = export_hf(tiny_model(cfg), cfg, tmp_path / "hf", hf_json.path)
    assert not (out / "tokenizer.model").exists()
    hf_tok = AutoTokenizer.from_pretrained(out)
    for text in TEXTS:
        assert hf_tok.encode(text, add_special_tokens=False) == hf_json.encode_batch([text])[0]
    assert hf_tok.eos_token_id == hf_json.eos_id


@pytest.mark.parametrize("family", list(RECURSIVE))
def test_recursive_and_mor_export_with_remote_code(tokenizer, tmp_path, family):
    cfg = tiny_config(*RECURSIVE[family])
    model = tiny_model(cfg)
    out = export_hf(model, cfg, tmp_path / "hf", tokenizer.path)
    assert {"configuration_mor.py", "modeling_mor.py"} <= {p.name for p in out.glob("*.py")}
    hf = AutoModelForCausalLM.from_pretrained(out, trust_remote_code=True).eval()
    assert type(hf).__name__ == "MoRForCausalLM"
    ids = token_batch()
    for routing in ("causal", "topk"):
        with torch.no_grad():
            ours = model(ids, routing=routing)
            theirs = hf(ids, routing=routing).logits
        torch.testing.assert_close(theirs, ours.logits, atol=1e-5, rtol=1e-5)
        if family.startswith("mor") and routing == "causal":  # routing is really exercised: some tokens stop early
            assert 0.0 < float(ours.stats[f"depth_frac/{cfg.model.num_recursions - 1}"]) < 1.0


def test_mor_export_handles_left_padding(tokenizer, tmp_path):
    """transformers batches prompts with left padding: real tokens get the logits of the unpadded sequence."""
    cfg = tiny_config(*RECURSIVE["mor_kvshare"])
    model = tiny_model(cfg)
    hf = AutoModelForCausalLM.from_pretrained(export_hf(model, cfg, tmp_path / "hf", tokenizer.path),
                                              trust_remote_code=True).eval()
    ids = token_batch(length=11)
    padded = torch.cat([torch.zeros(2, 4, dtype=torch.long), ids], dim=1)
    mask = torch.cat([torch.zeros(2, 4, dtype=torch.long), torch.ones_like(ids)], dim=1)
    with torch.no_grad():
        torch.testing.assert_close(hf(padded, attention_mask=mask).logits[:, 4:], model(ids).logits,
                                   atol=1e-5, rtol=1e-5)
        with pytest.raises(ValueError, match="routing='topk' selects over whole sequences"):
            hf(padded, attention_mask=mask, routing="topk")


def test_mor_export_loads_without_mor_ds(tokenizer, tmp_path):
    """The exported directory is self-contained: transformers loads it (and generates) with mor_ds unimportable."""
    cfg = tiny_config(*RECURSIVE["mor_ec"])
    model = tiny_model(cfg)
    out = export_hf(model, cfg, tmp_path / "hf", tokenizer.path)
    ids = token_batch(length=9)
    torch.save(ids, tmp_path / "ids.pt")
    script = f"""
import sys, torch
sys.modules["mor_ds"] = None  # any import of mor_ds now fails
from transformers import AutoModelForCausalLM, AutoTokenizer
model = AutoModelForCausalLM.from_pretrained({str(out)!r}, trust_remote_code=True).eval()
AutoTokenizer.from_pretrained({str(out)!r}, trust_remote_code=True)
ids = torch.load({str(tmp_path / 'ids.pt')!r})
with torch.no_grad():
    torch.save({{"logits": model(ids).logits,
                "generated": model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=4,
                                            do_sample=False, eos_token_id=None, pad_token_id=0)}},
               {str(tmp_path / 'out.pt')!r})
"""
    env = {**os.environ, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1"}
    subprocess.run([sys.executable, "-c", script], check=True, env=env, cwd=tmp_path, timeout=300)
    result = torch.load(tmp_path / "out.pt")
    with torch.no_grad():
        torch.testing.assert_close(result["logits"], model(ids).logits, atol=1e-5, rtol=1e-5)
        seq = ids
        for _ in range(4):  # greedy decoding with our model, full prefix each step
            seq = torch.cat([seq, model(seq).logits[:, -1].argmax(-1, keepdim=True)], dim=1)
    assert torch.equal(result["generated"], seq)


def tiny_llama(tmp_path, tokenizer, **overrides) -> tuple[LlamaForCausalLM, str]:
    config = dict(vocab_size=VOCAB, hidden_size=64, intermediate_size=96, num_hidden_layers=3, num_attention_heads=4,
                  num_key_value_heads=2, max_position_embeddings=128, rope_theta=50000.0, rms_norm_eps=1e-6,
                  tie_word_embeddings=False, eos_token_id=tokenizer.eos_id, bos_token_id=tokenizer.bos_id)
    torch.manual_seed(0)
    hf = LlamaForCausalLM(LlamaConfig(**{**config, **overrides})).eval()
    path = tmp_path / "llama"
    hf.save_pretrained(path)
    export_tokenizer(tokenizer, path)
    return hf, str(path)


@pytest.mark.parametrize("tied", [False, True])
def test_import_local_llama_gives_identical_logits(tokenizer, tmp_path, tied):
    hf, path = tiny_llama(tmp_path, tokenizer, tie_word_embeddings=tied)
    model, cfg = import_hf(path)
    assert (cfg.model.family, cfg.model.num_layers, cfg.model.num_kv_heads, cfg.model.rope_theta) == \
        ("vanilla", 3, 2, 50000.0)
    assert cfg.model.tie_embeddings is tied and cfg.train.seq_len == 128
    assert cfg.data.tokenizer.endswith("tokenizer.json")
    ids = token_batch()
    with torch.no_grad():
        torch.testing.assert_close(model.eval()(ids).logits, hf(ids).logits, atol=1e-5, rtol=1e-5)


def test_import_hf_command_writes_a_loadable_export(tokenizer, tmp_path, capsys):
    hf, path = tiny_llama(tmp_path, tokenizer)
    out = tmp_path / "imported.safetensors"
    assert cli_main(["import-hf", path, "--out", str(out), "--config", "tiny-vanilla"]) == 0
    assert "imported" in capsys.readouterr().out
    model, cfg = load_model(out)
    assert cfg.train.micro_batch_size == 8  # the non-model sections come from --config
    ids = token_batch()
    with torch.no_grad():
        torch.testing.assert_close(model(ids).logits, hf(ids).logits, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("overrides, message", [
    ({"attention_bias": True}, "import-hf: config.json attention_bias=True is not supported (need False)"),
    ({"hidden_act": "gelu"}, "import-hf: config.json hidden_act='gelu' is not supported (need 'silu')"),
    ({"rope_scaling": {"rope_type": "linear", "factor": 2.0}}, "import-hf: rope scaling"),
], ids=["attention_bias", "hidden_act", "rope_scaling"])
def test_import_rejects_what_our_block_does_not_compute(tokenizer, tmp_path, overrides, message):
    _, path = tiny_llama(tmp_path, tokenizer, **overrides)
    with pytest.raises(InteropError) as info:
        import_hf(path)
    assert str(info.value).startswith(message) and "\n" not in str(info.value)


def test_import_bad_paths_and_families(tmp_path, capsys):
    with pytest.raises(InteropError, match=r"^import-hf: .*nope has no config.json"):
        import_hf(tmp_path / "nope")
    gpt2 = tmp_path / "gpt2"
    GPT2Config(n_layer=1, n_embd=32, n_head=2).save_pretrained(gpt2)
    with pytest.raises(InteropError, match=r"^import-hf: model_type='gpt2', expected 'llama'"):
        import_hf(gpt2)
    assert cli_main(["import-hf", str(gpt2), "--out", str(tmp_path / "x.safetensors")]) == 2
    err = capsys.readouterr().err.strip()
    assert err == "mor-ds import-hf: model_type='gpt2', expected 'llama' (a LlamaForCausalLM checkpoint)"


def test_export_bad_tokenizer(tokenizer, tmp_path):
    cfg = tiny_config("tiny-vanilla")
    model = tiny_model(cfg)
    with pytest.raises(InteropError, match=r"^export: tokenizer .*missing.model: tokenizer file not found$"):
        export_hf(model, cfg, tmp_path / "a", str(tmp_path / "missing.model"))
    small = tiny_config("tiny-vanilla", "model.vocab_size=100")
    with pytest.raises(InteropError, match=rf"^export: tokenizer .* has {VOCAB} ids but model.vocab_size=100$"):
        export_hf(tiny_model(small), small, tmp_path / "b", tokenizer.path)


def test_mor_ds_export_format_hf(tokenizer, tmp_path, capsys):
    """`mor-ds export --format hf` of a mor-ds export file, with the tokenizer named in its config."""
    cfg = tiny_config(*RECURSIVE["mor_tc"], f"data.tokenizer={tokenizer.path}")
    model = tiny_model(cfg)
    path = write_export(model, cfg, tmp_path / "model.safetensors", source="test")
    out = tmp_path / "hf"
    assert cli_main(["export", "--checkpoint", str(path), "--format", "hf", "--out", str(out),
                     "--dtype", "bfloat16"]) == 0
    assert "MoRForCausalLM" in capsys.readouterr().out
    hf = AutoModelForCausalLM.from_pretrained(out, trust_remote_code=True, dtype=torch.float32).eval()
    assert json.loads((out / "config.json").read_text())["dtype"] == "bfloat16"
    ids = token_batch()
    with torch.no_grad():
        torch.testing.assert_close(hf(ids).logits, model.to(torch.bfloat16).float()(ids).logits, atol=1e-4, rtol=1e-4)

    # import-hf reads Llama checkpoints: a MoR export (custom code) is one line, no "run the custom code? [y/N]"
    capsys.readouterr()
    assert cli_main(["import-hf", str(out), "--out", str(tmp_path / "back.safetensors")]) == 2
    assert capsys.readouterr().err.strip().startswith(f"mor-ds import-hf: {out} needs its own modeling code "
                                                      f"(config.json has auto_map)")
    # the checkpoint's config names a tokenizer that is gone: one line naming it
    gone = tiny_config("tiny-vanilla", "data.tokenizer=/nonexistent/tok.model")
    path = write_export(tiny_model(gone), gone, tmp_path / "gone.safetensors", source="test")
    capsys.readouterr()
    assert cli_main(["export", "--checkpoint", str(path), "--format", "hf", "--out", str(tmp_path / "x")]) == 2
    assert capsys.readouterr().err.strip() == ("mor-ds export: tokenizer: /nonexistent/tok.model: tokenizer file not "
                                               "found (pass --tokenizer PATH)")


def test_exports_follow_the_umask_and_are_never_misnamed_or_silently_replaced(tokenizer, tmp_path, capsys):
    """safetensors writes 0600 whatever the umask; on a shared cluster the group must read exports."""
    import os
    import stat

    cfg = tiny_config("tiny-vanilla", f"data.tokenizer={tokenizer.path}")
    old = os.umask(0o027)
    try:
        path = write_export(tiny_model(cfg), cfg, tmp_path / "model.safetensors", source="test")
        assert stat.S_IMODE(path.stat().st_mode) == 0o640
        assert cli_main(["export", "--checkpoint", str(path), "--format", "hf", "--out", str(tmp_path / "hf")]) == 0
        modes = {p.name: stat.S_IMODE(p.stat().st_mode) for p in (tmp_path / "hf").iterdir() if p.is_file()}
        assert modes["model.safetensors"] == 0o640 and set(modes.values()) == {0o640}, modes
    finally:
        os.umask(old)
    capsys.readouterr()
    assert cli_main(["export", "--checkpoint", str(path), "--format", "hf", "--out", str(tmp_path / "hf")]) == 2
    assert capsys.readouterr().err.strip() == (f"mor-ds export: --out {tmp_path / 'hf'}: exists; pass --force to "
                                               f"replace it")
    assert cli_main(["export", "--checkpoint", str(path), "--out", str(tmp_path / "x.bin")]) == 2
    assert capsys.readouterr().err.strip() == (f"mor-ds export: --out {tmp_path / 'x.bin'}: the file is safetensors, "
                                               f"name it *.safetensors")
    assert cli_main(["import-hf", str(tmp_path / "hf"), "--out", str(path)]) == 2
    assert capsys.readouterr().err.strip() == f"mor-ds import-hf: --out {path}: exists; pass --force to replace it"
    assert cli_main(["import-hf", str(tmp_path / "hf"), "--out", str(path), "--force"]) == 0
    assert not (tmp_path / "x.bin").exists()
