"""Exported (Hugging Face) models: generate() and lm-eval scoring of recursive / MoR exports against the vanilla
(Llama) export of the same shape.

    mor-ds bench export --models mor-135m-nr3 mor-135m-nr3-tc --batch 8 --prompt-len 256 --new-tokens 64
    mor-ds bench export --models tiny-mor --set model.num_layers=8 model.num_recursions=3 --device cpu   # CPU

Each model and its vanilla twin (the same config with model.family=vanilla, so the same unrolled depth and widths)
start from random weights (seed 0; --router-std re-draws the routers), are exported with `export_hf` and loaded with
`AutoModelForCausalLM.from_pretrained(dir, trust_remote_code=True)`. Timed, interleaved over --repeats (the best of
each counts: noise only adds time):
  generate  greedy `generate()` of --batch random prompts of --prompt-len tokens, exactly --new-tokens new ones;
  score     lm-eval's log-likelihood requests as its HFLM sends them to the exported model (sorted longest first,
            right-padded batches of --score-batch, no attention mask, log-softmax of the continuation positions),
            and through mor-ds's own adapter (`mor-ds eval`: MoRLM on the mor-ds model).
On CUDA wall time (synchronised), on CPU this process's CPU time (other load on the machine does not count).
"""

from __future__ import annotations

import argparse
import json
import random
import tempfile
import time
from pathlib import Path

import torch
import torch.nn.functional as F

from mor_ds.bench.timing import environment


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--models", nargs="+", default=["mor-135m-nr3", "mor-135m-nr3-tc"],
                        help="recursive / MoR presets; each is compared with its vanilla twin")
    parser.add_argument("--set", nargs="*", default=[], metavar="KEY=VALUE", help="config overrides for every model")
    parser.add_argument("--device", default="auto", help="auto | cpu | cuda[:N]")
    parser.add_argument("--dtype", default="auto", choices=["auto", "float32", "bfloat16"],
                        help="auto: bfloat16 on CUDA, float32 on CPU")
    parser.add_argument("--batch", type=int, default=8, help="prompts per generate() call")
    parser.add_argument("--prompt-len", type=int, default=256)
    parser.add_argument("--new-tokens", type=int, default=64)
    parser.add_argument("--score-requests", type=int, default=256, help="log-likelihood requests, 4 per context")
    parser.add_argument("--context-len", type=int, nargs=2, default=[300, 600], metavar=("MIN", "MAX"))
    parser.add_argument("--score-batch", type=int, default=16)
    parser.add_argument("--router-std", type=float, default=0.0,
                        help="re-draw router weights with this std (0: the preset's init)")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--threads", type=int, default=0, help="CPU: torch threads (0: torch's default)")
    parser.add_argument("--out", default="", help="write all numbers as JSON here")


def build(preset: str, overrides: list[str], router_std: float):
    from mor_ds.config import load_config
    from mor_ds.models import build_model

    cfg = load_config(preset, overrides)
    torch.manual_seed(0)
    model = build_model(cfg.model, cfg.router).eval()
    if router_std:
        with torch.no_grad():
            for name, p in model.named_parameters():
                if name.startswith("recursion."):
                    p.normal_(0.0, router_std)
    return model, cfg


def score_requests(n: int, context_len: tuple[int, int], vocab: int) -> list[tuple[list[int], list[int]]]:
    """(context, continuation) token lists like a multiple-choice task's: 4 continuations of 5–20 tokens each."""
    rng = random.Random(0)
    out = []
    for _ in range(max(1, n // 4)):
        context = [rng.randrange(vocab) for _ in range(rng.randint(*context_len))]
        out += [(context, [rng.randrange(vocab) for _ in range(rng.randint(5, 20))]) for _ in range(4)]
    return out


@torch.inference_mode()
def hflm_score(model, requests, batch: int, device: torch.device) -> None:
    """What lm-eval's HFLM does per log-likelihood request batch: one forward of right-padded inputs, no mask."""
    inputs = sorted(((c + k)[:-1], len(k)) for c, k in requests)[::-1]
    for start in range(0, len(inputs), batch):
        chunk = inputs[start:start + batch]
        width = max(len(x) for x, _ in chunk)
        ids = torch.zeros(len(chunk), width, dtype=torch.long)
        for row, (x, _) in enumerate(chunk):
            ids[row, :len(x)] = torch.tensor(x)
        logits = model(ids.to(device)).logits
        for row, (x, n) in enumerate(chunk):
            F.log_softmax(logits[row, len(x) - n:len(x)].float(), dim=-1)


def timer(device: torch.device):
    """Seconds of fn(): wall on CUDA (synchronised), this process's CPU time on CPU."""
    def run(fn) -> float:
        if device.type == "cuda":
            torch.cuda.synchronize(device)
            start = time.perf_counter()
            fn()
            torch.cuda.synchronize(device)
            return time.perf_counter() - start
        start = time.process_time()
        fn()
        return time.process_time() - start
    return run


def run(args: argparse.Namespace) -> int:
    from transformers import AutoModelForCausalLM

    from data_pipeline.tokenizer import load_tokenizer, train_sentencepiece
    from mor_ds.interop import export_hf

    try:
        from mor_ds.evaluation.adapter import MoRLM
    except ImportError as exc:  # lm-eval not installed: the export's own cases still run
        print(f"score (mor-ds eval) skipped: {exc}")
        MoRLM = None

    device = torch.device(("cuda" if torch.cuda.is_available() else "cpu") if args.device == "auto" else args.device)
    dtype = {"auto": torch.bfloat16 if device.type == "cuda" else torch.float32, "float32": torch.float32,
             "bfloat16": torch.bfloat16}[args.dtype]
    if args.threads:
        torch.set_num_threads(args.threads)
    env = environment()
    print("\n".join(f"{k}: {v}" for k, v in env.items()), flush=True)
    tmp = Path(tempfile.mkdtemp(prefix="mor-ds-bench-export-"))
    rng = random.Random(0)  # the export ships a tokenizer: any small one does
    words = ["".join(rng.choices("abcdefghijklmnopqrstuvwxyz", k=rng.randint(2, 7))) for _ in range(2000)]
    text = [" ".join(rng.choices(words, k=12)) for _ in range(400)]
    tokenizer = load_tokenizer(train_sentencepiece(text, str(tmp / "tok"), 320, threads=1))
    arms: dict[str, tuple] = {}  # name -> (exported model, mor-ds model, config)
    for preset in args.models:
        for name, extra in ((preset, []), (f"vanilla twin of {preset}", ["model.family=vanilla",
                                                                         "model.num_recursions=1"])):
            model, cfg = build(preset, list(args.set) + extra, args.router_std)
            out = export_hf(model, cfg, tmp / f"hf{len(arms)}", tokenizer.path)
            hf = AutoModelForCausalLM.from_pretrained(out, trust_remote_code=True, dtype=dtype).to(device).eval()
            arms[name] = (hf, model.to(device=device, dtype=dtype), cfg)
    vocab = min(cfg.model.vocab_size for _, _, cfg in arms.values())
    gen = torch.Generator().manual_seed(0)
    prompts = torch.randint(vocab, (args.batch, args.prompt_len), generator=gen).to(device)
    requests = score_requests(args.score_requests, tuple(args.context_len), vocab)
    timed = timer(device)

    def generate(hf):
        with torch.inference_mode():
            hf.generate(prompts, attention_mask=torch.ones_like(prompts), max_new_tokens=args.new_tokens,
                        min_new_tokens=args.new_tokens, do_sample=False, eos_token_id=None, pad_token_id=0)

    cases = {}
    for name, (hf, model, cfg) in arms.items():
        cases[name] = {"generate": lambda hf=hf: generate(hf),
                       "score (HFLM on the export)": lambda hf=hf: hflm_score(hf, requests, args.score_batch, device)}
        if MoRLM is not None:
            lm = MoRLM(model, tokenizer, batch_size=args.score_batch, max_length=cfg.train.seq_len, device=device,
                       dtype=dtype)
            cases[name]["score (mor-ds eval)"] = lambda lm=lm: lm._score(requests)
    for fns in cases.values():  # warm-up: kernels, allocator, lazy inits
        for fn in fns.values():
            fn()
    best: dict[str, dict[str, float]] = {name: {} for name in cases}
    for _ in range(args.repeats):
        for name, fns in cases.items():
            for what, fn in fns.items():
                seconds = timed(fn)
                best[name][what] = min(best[name].get(what, seconds), seconds)
    depth = {}
    for name, (_, model, cfg) in arms.items():
        if cfg.model.family == "mor":
            with torch.inference_mode():
                stats = model(prompts, routing="causal").stats
            depth[name] = [round(float(stats[f"depth_frac/{r}"]), 3) for r in range(cfg.model.num_recursions)]

    clock = "wall s" if device.type == "cuda" else "CPU s"
    print(f"\n{'model':34s} {'what':28s} {clock:>8s}  vs vanilla twin")
    for preset in args.models:
        twin = best[f"vanilla twin of {preset}"]
        for name in (preset, f"vanilla twin of {preset}"):
            for what, seconds in best[name].items():
                print(f"{name:34s} {what:28s} {seconds:8.3f}  {seconds / twin[what]:.2f}x")
        if preset in depth:
            print(f"{preset}: fraction of prompt tokens reaching recursion steps 0..Nr-1: {depth[preset]}")
    if args.out:
        settings = {k: v for k, v in vars(args).items() if k != "func"}
        Path(args.out).write_text(json.dumps({"env": env, "args": settings, "seconds": best, "depth": depth},
                                             indent=2) + "\n")
    return 0
