"""Few-shot evaluation through lm-eval: the adapter's numbers against our own forward pass, the tiny local tasks end
to end on CPU, causal vs top-k routing, and one-line errors."""

from __future__ import annotations

import json

import pytest
import torch
import torch.nn.functional as F
from lm_eval.api.instance import Instance
from safetensors.torch import save_model

from fixtures.tiny_lm import TASKS_DIR, tiny_config, tiny_model, tiny_tokenizer
from mor_ds.weights import CONFIG_KEY
from mor_ds.evaluation.adapter import MoRLM
from mor_ds.cli import main as cli_main
from mor_ds.evaluation.harness import EvalError, format_table, run_fewshot

FAMILIES = {"vanilla": ("tiny-vanilla",), "mor_ec": ("tiny-mor", "model.num_layers=8"),
            "mor_tc": ("tiny-mor-tc", "model.num_layers=8"), "mor_kvshare": ("tiny-mor-kvshare", "model.num_layers=8")}
PAIRS = [("Question: What colour is the sky?\nAnswer:", " blue"), ("Bees make", " honey in the warm sun"),
         ("", "The dog barks."), ("Trailing space ", "here"), ("Fish live in water and a dog barks at the owl while "
                                                              "cats have four legs", " and snow is white")]


@pytest.fixture(scope="module")
def tokenizer(tmp_path_factory):
    return tiny_tokenizer(tmp_path_factory.mktemp("tok"))


def requests(kind: str, args: list[tuple]) -> list[Instance]:
    return [Instance(request_type=kind, doc={}, arguments=a, idx=i) for i, a in enumerate(args)]


@torch.no_grad()
def reference_loglikelihood(model, tokenizer, context: str, continuation: str, routing: str, max_length: int = 64):
    """Σ log p(continuation | context) from one unpadded forward pass, tokenized as lm-eval's HF model does."""
    def encode(text: str) -> list[int]:
        return tokenizer.encode_batch([text])[0]

    if context:
        spaces = len(context) - len(context.rstrip())
        context, continuation = context[:len(context) - spaces], context[len(context) - spaces:] + continuation
        whole, ctx = encode(context + continuation), encode(context)
        cont = whole[len(ctx):]
    else:
        ctx, cont = [tokenizer.eos_id], encode(continuation)
    tokens = (ctx + cont)[-(max_length + 1):]
    logp = F.log_softmax(model(torch.tensor([tokens[:-1]]), routing=routing).logits[0].float(), -1)
    logp = logp[-len(cont):]
    target = torch.tensor(cont)
    return float(logp.gather(1, target[:, None]).sum()), bool((logp.argmax(-1) == target).all())


@pytest.mark.parametrize("family", list(FAMILIES))
@pytest.mark.parametrize("routing", ["causal", "topk"])
def test_loglikelihood_equals_our_forward(tokenizer, family, routing):
    cfg = tiny_config(*FAMILIES[family])
    model = tiny_model(cfg)
    # batch 3 mixes lengths under causal routing (right padding); topk batches equal lengths only
    lm = MoRLM(model, tokenizer, routing=routing, batch_size=3, max_length=64, device="cpu")
    got = lm.loglikelihood(requests("loglikelihood", PAIRS))
    for (context, continuation), (logprob, greedy) in zip(PAIRS, got):
        want, want_greedy = reference_loglikelihood(model, tokenizer, context, continuation, routing)
        assert logprob == pytest.approx(want, abs=1e-4)
        assert greedy == want_greedy


def test_routing_reaches_the_model(tokenizer):
    """Expert-choice MoR: causal (thresholded) and top-k routing give different scores, and causal routing really
    drops tokens (the test model is not running every token at every step)."""
    cfg = tiny_config(*FAMILIES["mor_ec"])
    model = tiny_model(cfg)
    ids = torch.tensor([tokenizer.encode_batch([PAIRS[4][0]])[0]])
    stats = model(ids, routing="causal").stats
    assert 0.0 < float(stats["depth_frac/1"]) < 1.0
    scores = {r: [lp for lp, _ in MoRLM(model, tokenizer, routing=r, device="cpu").loglikelihood(
        requests("loglikelihood", PAIRS))] for r in ("causal", "topk")}
    assert scores["causal"] != pytest.approx(scores["topk"], abs=1e-3)


def test_causal_scores_do_not_depend_on_batching(tokenizer):
    cfg = tiny_config(*FAMILIES["mor_ec"])
    model = tiny_model(cfg)
    one = MoRLM(model, tokenizer, batch_size=1, device="cpu").loglikelihood(requests("loglikelihood", PAIRS))
    many = MoRLM(model, tokenizer, batch_size=8, device="cpu").loglikelihood(requests("loglikelihood", PAIRS))
    assert [lp for lp, _ in one] == pytest.approx([lp for lp, _ in many], abs=1e-4)


def test_context_longer_than_max_length_is_cut_from_the_left(tokenizer):
    cfg = tiny_config(*FAMILIES["mor_ec"])
    model = tiny_model(cfg)
    context, continuation = PAIRS[4]
    (got, _), = MoRLM(model, tokenizer, max_length=12, device="cpu").loglikelihood(
        requests("loglikelihood", [(context, continuation)]))
    want, _ = reference_loglikelihood(model, tokenizer, context, continuation, "causal", max_length=12)
    assert got == pytest.approx(want, abs=1e-4)


def test_rolling_loglikelihood_and_greedy_generation(tokenizer):
    cfg = tiny_config(*FAMILIES["mor_ec"])
    model = tiny_model(cfg)
    lm = MoRLM(model, tokenizer, batch_size=2, max_length=64, device="cpu")
    text = "Fish live in water. The dog barks."
    (rolling,) = lm.loglikelihood_rolling(requests("loglikelihood_rolling", [(text,)]))
    assert rolling == pytest.approx(reference_loglikelihood(model, tokenizer, "", text, "causal")[0], abs=1e-4)

    prompts = ["Bees make", "Question: Which animal barks?\nAnswer:"]
    out = lm.generate_until(requests("generate_until", [(p, {"until": ["\n"], "max_gen_toks": 5}) for p in prompts]))
    for prompt, text in zip(prompts, out):
        tokens = tokenizer.encode_batch([prompt])[0]
        new: list[int] = []
        with torch.no_grad():
            for _ in range(5):
                nxt = int(model(torch.tensor([tokens + new]), routing="causal").logits[0, -1].argmax())
                if nxt == tokenizer.eos_id:
                    break
                new.append(nxt)
        assert text == tokenizer.decode(new).split("\n")[0]


def test_local_task_end_to_end(tokenizer):
    """The tiny multiple-choice task through lm-eval's own evaluator: accuracy equals the one computed from our
    forward pass (the answer with the highest log-likelihood wins)."""
    cfg = tiny_config(*FAMILIES["mor_ec"])
    model = tiny_model(cfg, seed=3)
    results = run_fewshot(model, tokenizer, "mor_tiny_mc", include_path=str(TASKS_DIR), include_defaults=False,
                          num_fewshot=0, batch_size=4, max_length=64, bootstrap_iters=0, device="cpu")
    docs = [json.loads(line) for line in (TASKS_DIR / "mor_tiny" / "test.jsonl").read_text().splitlines()]
    hits = []
    for doc in docs:
        context = f"Question: {doc['question']}\nAnswer:"
        scores = [reference_loglikelihood(model, tokenizer, context, c, "causal")[0] for c in doc["choices"]]
        hits.append(max(range(len(scores)), key=scores.__getitem__) == doc["answer"])
    assert results["results"]["mor_tiny_mc"]["acc,none"] == pytest.approx(sum(hits) / len(hits))
    assert results["mor_ds"]["routing"] == "causal"


def test_generation_and_perplexity_tasks_run(tokenizer):
    cfg = tiny_config(*FAMILIES["mor_tc"])
    results = run_fewshot(tiny_model(cfg), tokenizer, ["mor_tiny_gen", "mor_tiny_ppl"], include_path=str(TASKS_DIR),
                          include_defaults=False, num_fewshot=1, limit=3, bootstrap_iters=0, device="cpu")
    assert 0.0 <= results["results"]["mor_tiny_gen"]["exact_match,none"] <= 1.0
    assert results["results"]["mor_tiny_ppl"]["bits_per_byte,none"] > 0


def test_unknown_task_is_a_one_line_error(tokenizer):
    model = tiny_model(tiny_config("tiny-vanilla"))
    with pytest.raises(EvalError, match=r"^unknown task 'mor_tiny_mq' \(did you mean mor_tiny_mc"):
        run_fewshot(model, tokenizer, "mor_tiny_mc,mor_tiny_mq", include_path=str(TASKS_DIR), include_defaults=False)


# ------------------------------------------------------------------------------------ `mor-ds eval --tasks …`


def export_file(tmp_path, cfg, model):
    path = tmp_path / "model.safetensors"
    save_model(model, str(path), metadata={CONFIG_KEY: json.dumps(cfg.to_dict())})
    return path


def test_mor_ds_eval_tasks_both_routings(tokenizer, tmp_path, capsys):
    cfg = tiny_config(*FAMILIES["mor_ec"], f"data.tokenizer={tokenizer.path}")
    path = export_file(tmp_path, cfg, tiny_model(cfg))
    out = tmp_path / "eval.json"
    code = cli_main(["eval", "--checkpoint", str(path), "--tasks", "mor_tiny_mc", "--routing", "both",
                     "--include-path", str(TASKS_DIR), "--num-fewshot", "0", "--json", str(out)])
    assert code == 0
    table = capsys.readouterr().out
    assert "causal" in table and "topk" in table and "mor_tiny_mc acc *" in table
    results = json.loads(out.read_text())
    assert set(results) == {"causal", "topk"}
    assert results["topk"]["mor_ds"]["routing"] == "topk"


def test_mor_ds_eval_tasks_bad_input_one_line(tokenizer, tmp_path, capsys):
    cfg = tiny_config("tiny-vanilla", "data.tokenizer=/nonexistent/tok.model", "data.source=/nonexistent/*.jsonl")
    path = export_file(tmp_path, cfg, tiny_model(cfg))
    code = cli_main(["eval", "--checkpoint", str(path), "--tasks", "mor_tiny_mc", "--include-path", str(TASKS_DIR)])
    err = capsys.readouterr().err.strip()
    assert code == 2 and "\n" not in err
    assert err.startswith("mor-ds eval: tokenizer: /nonexistent/tok.model: tokenizer file not found")

    code = cli_main(["eval", "--checkpoint", str(path), "--tasks", "mor_tiny_mc", "--tokenizer", tokenizer.path,
                     "--include-path", str(tmp_path / "nope")])
    err = capsys.readouterr().err.strip()
    assert code == 2 and err == f"mor-ds eval: --include-path {tmp_path / 'nope'}: not a directory"


def test_table_shows_groups_not_their_subtasks_and_marks_the_paper_metric():
    results = {"results": {"mmlu": {"acc,none": 0.25, "acc_stderr,none": 0.01},
                           "mmlu_stem": {"acc,none": 0.2, "acc_stderr,none": 0.02},
                           "mmlu_anatomy": {"acc,none": 0.3, "acc_stderr,none": 0.03},
                           "hellaswag": {"acc,none": 0.3, "acc_stderr,none": 0.004, "acc_norm,none": 0.35,
                                         "acc_norm_stderr,none": 0.005, "sample_len,none": 10}},
               "group_subtasks": {"mmlu": ["mmlu_stem"], "mmlu_stem": ["mmlu_anatomy"], "hellaswag": []}}
    lines = format_table({"causal": results, "topk": results}).splitlines()
    assert lines[0].split() == ["task", "/", "metric", "causal", "topk"]
    assert [line.split()[:3] for line in lines[1:]] == [["mmlu", "acc", "*"], ["hellaswag", "acc", "0.3000"],
                                                        ["hellaswag", "acc_norm", "*"]]


def test_task_data_missing_offline_is_one_line_naming_the_dataset(tokenizer, tmp_path, capsys, monkeypatch):
    """A task whose hub dataset is not in the local cache (as --tasks paper on an offline node): one line naming
    the dataset and how to supply it, no traceback."""
    monkeypatch.setenv("HF_DATASETS_OFFLINE", "1")
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    tasks = tmp_path / "tasks"
    tasks.mkdir()
    (tasks / "hub_task.yaml").write_text("task: mor_hub_task\ndataset_path: mor-ds-test/not-cached\n"
                                         "output_type: multiple_choice\ntest_split: test\ndoc_to_text: '{{q}}'\n"
                                         "doc_to_target: 0\ndoc_to_choice: ['a', 'b']\n"
                                         "metric_list:\n  - metric: acc\n")
    cfg = tiny_config("tiny-vanilla", f"data.tokenizer={tokenizer.path}")
    path = export_file(tmp_path, cfg, tiny_model(cfg))
    code = cli_main(["eval", "--checkpoint", str(path), "--tasks", "mor_hub_task", "--include-path", str(tasks)])
    err = capsys.readouterr().err.strip()
    assert code == 2 and "\n" not in err, err[-2000:]
    assert err.startswith("mor-ds eval: --tasks: the task data 'mor-ds-test/not-cached' is neither reachable on the "
                          "Hugging Face hub nor in the local cache (")
    assert "run the same command once with network access" in err and "--include-path" in err


def test_validation_loss_under_both_routings_and_bounded_by_default(tmp_path, capsys):
    """--routing applies to the validation loss of expert-choice MoR too; the default evaluates a bounded number
    of batches and says how many there were."""
    import numpy as np

    from data_pipeline.shards import INDEX_FILE
    from mor_ds.commands.eval import evaluate_checkpoint

    shards = _prepared_shards(tmp_path)
    cfg = tiny_config(*FAMILIES["mor_ec"], f"data.tokenizer={shards}/tokenizer.model", f"data.prepared_dir={shards}",
                      "train.micro_batch_size=1")
    path = export_file(tmp_path, cfg, tiny_model(cfg))
    both = evaluate_checkpoint(str(path), routing="both", batches=3)
    assert both["routing"] == "causal+topk" and both["val/batches"] == 3 < both["val/batches_available"]
    causal = evaluate_checkpoint(str(path), batches=3)
    topk = evaluate_checkpoint(str(path), routing="topk", batches=3)
    assert both["val/loss"] == causal["val/loss"] and both["val/loss_topk"] == topk["val/loss"]
    assert causal["val/loss"] != topk["val/loss"]  # the router's large init drops tokens under causal routing
    assert np.isclose(both["val/ppl_topk"], np.exp(topk["val/loss"]))
    assert cli_main(["eval", "--checkpoint", str(path), "--routing", "both", "--batches", "3"]) == 0
    out = capsys.readouterr().out
    assert out.startswith(f"val loss {causal['val/loss']:.4f} | ppl {causal['val/ppl']:.2f} (causal routing) | "
                          f"val loss {topk['val/loss']:.4f} | ppl {topk['val/ppl']:.2f} (topk routing) | 3 batches, "
                          f"192 tokens (of {both['val/batches_available']}; --batches 0 for all) | {shards}")
    assert (shards / INDEX_FILE).exists()


def _prepared_shards(tmp_path):
    from data_pipeline.prepare import prepare
    from data_pipeline.testing import write_records
    from fixtures.tiny_lm import sentences

    corpus = write_records(tmp_path / "docs.jsonl", [{"text": " ".join(sentences(8, seed=i))} for i in range(80)])
    tok = tiny_tokenizer(tmp_path)
    out = tmp_path / "shards"
    prepare(corpus, tok.path, str(out), workers=0, shard_tokens=2048, show_progress=False)
    return out


def test_fewshot_outside_a_git_checkout_is_quiet_and_records_the_mor_ds_commit(tokenizer, tmp_path, capfd,
                                                                                monkeypatch):
    from mor_ds.provenance import code_version

    cfg = tiny_config("tiny-vanilla", f"data.tokenizer={tokenizer.path}")
    path = export_file(tmp_path, cfg, tiny_model(cfg))
    monkeypatch.chdir(tmp_path)  # not a git repository
    out = tmp_path / "eval.json"
    assert cli_main(["eval", "--checkpoint", str(path), "--tasks", "mor_tiny_mc", "--include-path", str(TASKS_DIR),
                     "--limit", "2", "--json", str(out)]) == 0
    assert "not a git repository" not in capfd.readouterr().err
    assert json.loads(out.read_text())["causal"]["git_hash"] == code_version().get("git_commit")


def test_held_out_fingerprint_tells_window_splits_of_one_shard_apart(tmp_path):
    """A one-shard set holds out the tail of its shard (5% per val shard): evaluations with val_shards 1 and 2 score
    different windows of the same file, and their fingerprints say so."""
    from data_pipeline.prepare import prepare
    from data_pipeline.testing import write_records
    from fixtures.tiny_lm import sentences
    from mor_ds.commands.eval import evaluate_checkpoint

    corpus = write_records(tmp_path / "docs.jsonl", [{"text": " ".join(sentences(8, seed=i))} for i in range(80)])
    shards, tok = tmp_path / "one", tiny_tokenizer(tmp_path)
    prepare(corpus, tok.path, str(shards), workers=0, show_progress=False)  # the default 2^25-token shard: one
    cfg = tiny_config(*FAMILIES["vanilla"], f"data.tokenizer={tok.path}", f"data.prepared_dir={shards}",
                      "train.micro_batch_size=1")
    path = export_file(tmp_path, cfg, tiny_model(cfg))
    one, two = (evaluate_checkpoint(str(path), val_shards=n) for n in (1, 2))
    assert two["val/tokens"] > one["val/tokens"] and one["held_out"] != two["held_out"]
