"""Training throughput: real optimizer steps through the trainer's DeepSpeed engine, against Hugging Face Llama.

Our arms (`--configs`): a preset, optionally `+variant`s and `:micro_batch` (`vanilla-360m+plainloss:8`). Each builds
the model, the DeepSpeed engine and the AdamW optimizer with the trainer's own functions (`build_model`,
`param_groups`, `build_optimizer`, `distributed.build_engine`) and runs `Trainer.fit()` — the loop `mor-ds train`
runs, with its per-step callbacks NonFiniteGuard and SignalHandler (logging, eval, W&B and checkpoints left out) —
on synthetic token batches (uniform ids, CPU int64 windows like the loader's, so the pinned host-to-device copy is
timed). Warm-up steps are excluded (compilation, allocator, optimizer state creation).

Baselines (`--baselines`, for every vanilla config, same shapes): `transformers.LlamaForCausalLM` built from our
config (hidden, layers, heads, KV heads, ffn, vocab, tied embeddings, RoPE θ), SDPA attention, torch fused AdamW
with the same parameter groups and gradient clipping: `hf-eager`, `hf-compile` (torch.compile of the whole model),
`hf-liger` (Liger-Kernel's Llama patch: RMSNorm, RoPE, SwiGLU, fused linear cross-entropy; skipped with a note when
liger-kernel is absent). `--hf-precision bf16` (default) keeps the weights in bf16 — the fastest setup a user would
pick, so the hardest bar; `amp` = fp32 weights under bf16 autocast (Hugging Face Trainer's `bf16=True`).

Reported per arm: tokens/s (all GPUs and per GPU), TFLOP/s per GPU and MFU by the planner's exact FLOPs
(`mor_ds.flops`, forward + backward of every matmul executed; MoR counts only active tokens) against the device's
dense bf16 peak, MFU by one formula for every row (mfu_6n): tokens/s × (6·params + 6·layers·d·seq) / 989 TFLOP/s,
peak memory (after warm-up), and the step time split into forward / backward / optimizer step (CUDA events on
CUDA; "other" is what the step spends outside the three: batch copy, learning rate, callbacks).

Every arm runs in its own subprocess (an OOM or crash loses only that row) unless the benchmark itself runs under
torchrun/srun with several processes: then arms run in-process, in the same order on every rank (HF baselines then
run unsharded on each rank; rank 0 reports). `--budget-s` starts no arm after the budget and caps each arm's time.
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import resource
import subprocess
import sys
import tempfile
import time
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterator

import torch

H100_DENSE_BF16_FLOPS = 989e12  # H100 SXM dense bf16: mfu_6n's denominator for every row, whatever the device
DEFAULT_CONFIGS = ["vanilla-135m", "vanilla-360m", "mor-360m-nr3", "mor-360m-nr2"]
HF_BASELINES = ("hf-eager", "hf-compile", "hf-liger")
# `+name` suffixes of a config arm: config overrides, so the fast paths can be compared with the plain ones
VARIANTS: dict[str, list[str]] = {
    "plainloss": ["model.fused_loss=plain"],  # full logits + F.cross_entropy
    "chunked": ["model.fused_loss=chunked"],
    "liger": ["model.fused_loss=liger"],  # Liger-Kernel's fused linear cross-entropy for the loss
    "compile": ["train.compile=true"],  # torch.compile per unique block (the default on CUDA)
    "eager": ["train.compile=false"],
    "ckpt": ["train.activation_checkpointing=true"],
    "sdpa": ["model.attention_backend=sdpa"],
    "z1": ["train.zero_stage=1"],
    "z2": ["train.zero_stage=2"],
    "dsstep": ["optim.fused_step=false"],  # DeepSpeed's own ZeRO-1/2 optimizer step instead of the fused one
}
SMOKE_OVERRIDES = ["model.vocab_size=512", "model.hidden_size=64", "model.num_heads=4", "model.num_kv_heads=2",
                   "model.intermediate_size=96", "model.num_layers=8"]


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--configs", nargs="+", default=None,
                        help=f"arms PRESET[+VARIANT...][:MICRO_BATCH]; variants: {', '.join(VARIANTS)} "
                             f"(default: {' '.join(DEFAULT_CONFIGS)})")
    parser.add_argument("--baselines", default="hf-eager,hf-compile,hf-liger",
                        help=f"comma list of {', '.join(HF_BASELINES)} run for every vanilla config; '' = none")
    parser.add_argument("--micro-batch", type=int, default=16, help="sequences per GPU (an arm's :N overrides)")
    parser.add_argument("--seq-len", type=int, default=2048)
    parser.add_argument("--steps", type=int, default=10, help="timed optimizer steps per arm")
    parser.add_argument("--warmup", type=int, default=3, help="untimed steps first (compile, allocator, state)")
    parser.add_argument("--zero-stage", type=int, default=1, choices=[0, 1, 2, 3])
    parser.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                        help="config override for every mor-ds arm (repeatable)")
    parser.add_argument("--hf-precision", default="bf16", choices=["bf16", "amp"],
                        help="baselines: bf16 weights, or fp32 weights under bf16 autocast")
    parser.add_argument("--profile-steps", type=int, default=0,
                        help="after the timed steps, profile this many more: top kernels by self device time")
    parser.add_argument("--trace-dir", default="", help="with --profile-steps: write a Chrome trace per arm here")
    parser.add_argument("--budget-s", type=float, default=0, help="start no arm after this many seconds (0 = none)")
    parser.add_argument("--arm-timeout-s", type=float, default=0, help="kill an arm after this (0 = budget left)")
    parser.add_argument("--in-process", action="store_true", help="no subprocess per arm (always under torchrun)")
    parser.add_argument("--smoke", action="store_true",
                        help="CPU check of the harness: tiny shapes, seq 32, micro-batch 2, 2 steps after 1 warm-up")
    parser.add_argument("--json", default="", help="write all results here (rewritten after every arm)")


# --------------------------------------------------------------------------------------------
# arms


@dataclass(frozen=True)
class Arm:
    name: str  # as printed: `vanilla-360m+compile:8`, `hf-eager@vanilla-360m`
    preset: str
    overrides: tuple[str, ...]  # variant overrides
    micro_batch: int
    baseline: str = ""  # hf-eager / hf-compile / hf-liger; "" = mor-ds


def parse_arm(spec: str, default_micro_batch: int) -> Arm:
    head, _, micro = spec.partition(":")
    preset, *variants = head.split("+")
    overrides: list[str] = []
    for variant in variants:
        if variant not in VARIANTS:
            raise ValueError(f"--configs {spec}: unknown variant +{variant} (known: {', '.join(VARIANTS)})")
        overrides += VARIANTS[variant]
    try:
        micro_batch = int(micro) if micro else default_micro_batch
    except ValueError:
        raise ValueError(f"--configs {spec}: micro-batch {micro!r} after ':' is not an integer") from None
    return Arm(spec, preset, tuple(overrides), micro_batch)


def plan_arms(args: argparse.Namespace) -> list[Arm]:
    """Our arms in order, each vanilla one followed by its baselines."""
    from mor_ds.config import load_config

    baselines = [b.strip() for b in args.baselines.split(",") if b.strip()]
    for b in baselines:
        if b not in HF_BASELINES:
            raise ValueError(f"--baselines: unknown {b!r} (known: {', '.join(HF_BASELINES)})")
    arms, shapes_with_baselines = [], set()
    for spec in args.configs:
        arm = parse_arm(spec, args.micro_batch)
        arms.append(arm)
        shape = (arm.preset, arm.micro_batch)  # `vanilla-360m` and `vanilla-360m+compile` share one set of baselines
        if load_config(arm.preset).model.family == "vanilla" and shape not in shapes_with_baselines:
            shapes_with_baselines.add(shape)
            arms += [Arm(f"{b}@{arm.preset}:{arm.micro_batch}", arm.preset, (), arm.micro_batch, b) for b in baselines]
    return arms


def arm_config(arm: Arm, args: argparse.Namespace, world_size: int):
    """The run config of an arm: preset, smoke shapes, bench shapes, variant and --set overrides."""
    from mor_ds.config import load_config

    overrides = list(SMOKE_OVERRIDES) if args.smoke else []
    overrides += [f"train.seq_len={args.seq_len}", f"train.micro_batch_size={arm.micro_batch}",
                  f"train.global_batch_size={arm.micro_batch * world_size}", f"train.zero_stage={args.zero_stage}",
                  f"train.max_steps={args.warmup + args.steps}", "train.log_interval=1000000", "wandb.enabled=false"]
    overrides += list(arm.overrides) + ([] if arm.baseline else list(args.overrides))
    return load_config(arm.preset, overrides)


# --------------------------------------------------------------------------------------------
# timing: forward / backward / optimizer phases, CUDA events or host clocks


class PhaseTimer:
    """Marks phases of the timed steps; CUDA events are read only once, after the final synchronize."""

    def __init__(self, device: torch.device):
        self.cuda = device.type == "cuda"
        self.active = False
        self.spans: list[tuple[str, Any, Any]] = []

    def _mark(self) -> Any:
        if not self.cuda:
            return time.perf_counter()
        event = torch.cuda.Event(enable_timing=True)
        event.record()
        return event

    @contextmanager
    def phase(self, name: str) -> Iterator[None]:
        if not self.active:
            yield
            return
        start = self._mark()
        yield
        self.spans.append((name, start, self._mark()))

    def totals_s(self) -> dict[str, float]:
        """Seconds per phase over the timed steps (call after synchronizing)."""
        out: dict[str, float] = {}
        for name, start, end in self.spans:
            seconds = start.elapsed_time(end) / 1e3 if self.cuda else end - start
            out[name] = out.get(name, 0.0) + seconds
        return out


class CompileCounter:
    """Compilations while counting (the timed steps): Triton JIT builds of a new kernel variant (a disk-cache hit
    counts too: it is still a load on the step's critical path) and graphs torch.compile compiles. Either one
    inside the timed steps means the figures include compile time: more warm-up steps are needed."""

    def __init__(self) -> None:
        self.triton = 0
        self.counting = False
        self._graphs_at_start = 0
        self.graphs = 0
        try:
            from triton import knobs
        except ImportError:
            return
        if knobs.runtime.jit_post_compile_hook is None:
            knobs.runtime.jit_post_compile_hook = self._on_triton_compile

    def _on_triton_compile(self, **_: Any) -> None:
        self.triton += self.counting

    @staticmethod
    def _dynamo_graphs() -> int:
        from torch._dynamo.utils import counters

        return counters["stats"]["unique_graphs"]

    def start(self) -> None:
        self.counting, self.triton, self._graphs_at_start = True, 0, self._dynamo_graphs()

    def stop(self) -> None:
        self.counting, self.graphs = False, self._dynamo_graphs() - self._graphs_at_start

    def report(self) -> dict[str, int]:
        return {"triton_jit_in_timed_steps": self.triton, "compiled_graphs_in_timed_steps": self.graphs}


def synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


class TimedEngine:
    """The trainer's TrainEngine facade with forward / backward / optimizer-step phases timed; all else delegates."""

    def __init__(self, engine: Any, timer: PhaseTimer):
        self._engine, self._timer = engine, timer

    def __getattr__(self, name: str) -> Any:
        return getattr(self._engine, name)

    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        with self._timer.phase("forward"):
            return self._engine(*args, **kwargs)

    def backward(self, loss: torch.Tensor) -> None:
        with self._timer.phase("backward"):
            self._engine.backward(loss)

    def step(self) -> None:
        with self._timer.phase("optimizer"):
            self._engine.step()


class SyntheticBatches:
    """Uniform random (B, S+1) int64 windows on the host, cycled (the loader's interface, minus state)."""

    def __init__(self, vocab: int, batch: int, seq_len: int, seed: int = 0, count: int = 4):
        gen = torch.Generator().manual_seed(seed)
        self.batches = [torch.randint(0, vocab, (batch, seq_len + 1), generator=gen) for _ in range(count)]

    def __iter__(self) -> Iterator[torch.Tensor]:
        while True:
            yield from self.batches


@dataclass
class Clock:
    """Wall time of the timed steps: starts after the last warm-up step, stops after the last step (synced)."""

    device: torch.device
    timer: PhaseTimer
    warmup: int
    compiles: CompileCounter = field(default_factory=CompileCounter)
    start: float = 0.0
    end: float = 0.0
    last_loss: float = float("nan")
    stats: dict[str, float] | None = None

    def warmup_done(self) -> None:
        synchronize(self.device)
        if self.device.type == "cuda":
            torch.cuda.reset_peak_memory_stats(self.device)
        self.timer.active = True
        self.compiles.start()
        self.start = time.perf_counter()

    def finished(self, loss: torch.Tensor, stats: dict[str, torch.Tensor]) -> None:
        synchronize(self.device)
        self.end = time.perf_counter()
        self.timer.active = False
        self.compiles.stop()
        self.last_loss = float(loss)
        self.stats = {k: float(v) for k, v in stats.items()}


class StepProfiler:
    """torch.profiler over the steps after the timed ones: the top ops by self device time (CPU time on CPU)."""

    def __init__(self, device: torch.device, steps: int, trace_path: str = ""):
        self.device, self.steps, self.trace_path = device, steps, trace_path
        self.top: list[dict[str, Any]] = []
        self._prof: Any = None

    def start(self) -> None:
        from torch.profiler import ProfilerActivity, profile

        activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if self.device.type == "cuda" else [])
        self._prof = profile(activities=activities)
        self._prof.__enter__()

    def stop(self) -> None:
        synchronize(self.device)
        self._prof.__exit__(None, None, None)
        if self.trace_path:
            Path(self.trace_path).parent.mkdir(parents=True, exist_ok=True)
            self._prof.export_chrome_trace(self.trace_path)
        cuda = self.device.type == "cuda"

        def self_us(event: Any) -> float:
            if not cuda:
                return event.self_cpu_time_total
            return getattr(event, "self_device_time_total", None) or getattr(event, "self_cuda_time_total", 0.0)

        events = sorted(self._prof.key_averages(), key=self_us, reverse=True)[:15]
        self.top = [{"op": e.key[:90], "ms_per_step": round(self_us(e) / 1e3 / self.steps, 3),
                     "calls_per_step": round(e.count / self.steps, 1)} for e in events if self_us(e) > 0]


def _clock_callback(clock: Clock, timed_end: int, profiler: StepProfiler | None):
    from mor_ds.train.callbacks import Callback

    class ClockCallback(Callback):
        def on_step_end(self, trainer, result) -> None:
            step = trainer.state.step
            if step == clock.warmup:
                clock.warmup_done()
            elif step == timed_end:
                clock.finished(result.loss, result.stats)
                if profiler:
                    profiler.start()
            elif profiler and step == timed_end + profiler.steps:
                profiler.stop()

    return ClockCallback()


def _profiler(arm: Arm, args: argparse.Namespace, device: torch.device) -> StepProfiler | None:
    if not args.profile_steps:
        return None
    trace = ""
    if args.trace_dir:
        safe = "".join(c if c.isalnum() or c in "-_." else "_" for c in arm.name)
        trace = str(Path(args.trace_dir) / f"{safe}.json")
    return StepProfiler(device, args.profile_steps, trace)


def peak_memory(device: torch.device) -> dict[str, float]:
    if device.type == "cuda":
        return {"peak_mem_gib": round(torch.cuda.max_memory_allocated(device) / 2**30, 2),
                "peak_reserved_gib": round(torch.cuda.max_memory_reserved(device) / 2**30, 2)}
    return {"peak_rss_gib": round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20, 2)}


def summarize(clock: Clock, tokens_per_step_per_gpu: int, steps: int, world: int, exact_flops_per_token: float,
              flops_6n_per_token: float, peak_tflops: float | None) -> dict[str, Any]:
    elapsed = clock.end - clock.start
    per_gpu = tokens_per_step_per_gpu * steps / elapsed
    tflops = exact_flops_per_token * per_gpu / 1e12
    phases = clock.timer.totals_s()
    step_ms = elapsed / steps * 1e3
    breakdown = {f"{name}_ms": round(seconds / steps * 1e3, 2) for name, seconds in phases.items()}
    breakdown["other_ms"] = round(step_ms - sum(phases.values()) / steps * 1e3, 2)
    return {
        "tokens_per_s": round(per_gpu * world, 1), "tokens_per_s_per_gpu": round(per_gpu, 1),
        "step_ms": round(step_ms, 2), **breakdown,
        "tflops_per_gpu": round(tflops, 2), "mfu": round(tflops / peak_tflops, 4) if peak_tflops else None,
        "mfu_6n": round(per_gpu * flops_6n_per_token / H100_DENSE_BF16_FLOPS, 4),
        "exact_flops_per_token": exact_flops_per_token, "flops_6n_per_token": flops_6n_per_token,
        "final_loss": round(clock.last_loss, 4), **clock.compiles.report(),
    }


def flops_6n_per_token(params: int, layers: int, hidden: int, seq_len: int) -> float:
    """FLOPs per token by one formula for every row, whatever the family: 6·params (forward + backward of every
    weight once) + 6·layers·d·seq (attention scores and values, causal half). Comparable across our arms and the
    Hugging Face baselines; for recursive / MoR arms it is not the FLOPs they execute (the planner's MFU is)."""
    return 6.0 * params + 6.0 * layers * hidden * seq_len


def _peak_tflops(cfg, device: torch.device) -> float | None:
    from mor_ds.train.callbacks.throughput import device_peak_tflops

    return cfg.train.peak_tflops or device_peak_tflops(device, cfg.train.precision)


# --------------------------------------------------------------------------------------------
# our arm: the trainer's engine and loop


def run_mor_ds(arm: Arm, args: argparse.Namespace) -> dict[str, Any]:
    from mor_ds import distributed
    from mor_ds.flops import flops_per_token
    from mor_ds.models import build_model
    from mor_ds.models.loss import resolve_fused_loss
    from mor_ds.train.callbacks import NonFiniteGuard, SignalHandler
    from mor_ds.train.loop import Trainer
    from mor_ds.train.optim import build_optimizer, param_groups
    from mor_ds.train.state import seed_everything

    env = distributed.discover()
    device = distributed.init_distributed(env)
    cfg = arm_config(arm, args, env.world_size)
    seed_everything(cfg.train.seed)
    model = build_model(cfg.model, cfg.router).to(device)
    num_params = model.num_params()
    engine = distributed.build_engine(model, cfg, env, param_groups(model, cfg.optim),
                                      lambda groups: build_optimizer(groups, cfg.optim, device))
    timer = PhaseTimer(device)
    profiler = _profiler(arm, args, device)
    total_steps = args.warmup + args.steps + args.profile_steps
    clock = Clock(device, timer, args.warmup)
    m, t = cfg.model, cfg.train
    with tempfile.TemporaryDirectory(prefix="mor-ds-bench-") as run_dir:
        trainer = Trainer(cfg=cfg, run_dir=Path(run_dir), env=env, device=device, engine=TimedEngine(engine, timer),
                          train_loader=SyntheticBatches(m.vocab_size, t.micro_batch_size, t.seq_len, seed=env.rank),
                          make_val_batches=None, total_steps=total_steps, flops_per_token=flops_per_token(cfg),
                          callbacks=[NonFiniteGuard(), SignalHandler(),
                                     _clock_callback(clock, args.warmup + args.steps, profiler)],
                          num_params=num_params)
        code = trainer.fit()
    if code != 0:
        raise RuntimeError(f"trainer exited with code {code}: {trainer.exit_message}")
    fractions = None
    if m.family == "mor" and cfg.router.type == "token_choice":  # the depth distribution the router chose
        fractions = [clock.stats[f"depth_frac/{r}"] for r in range(m.num_recursions)]
    exact = flops_per_token(cfg, "exact", active_fractions=fractions)
    result = {
        "family": m.family, "params": num_params, "micro_batch": t.micro_batch_size, "seq_len": t.seq_len,
        "world_size": env.world_size, "zero_stage": t.zero_stage, "precision": t.precision,
        "fused_loss": resolve_fused_loss(m.fused_loss, device),
        "compile": distributed.resolve_compile(t.compile, device),
        "activation_checkpointing": t.activation_checkpointing, "attention_backend": m.attention_backend,
        **summarize(clock, t.micro_batch_size * t.seq_len, args.steps, env.world_size, exact,
                    flops_6n_per_token(num_params, m.num_layers, m.hidden_size, t.seq_len),
                    _peak_tflops(cfg, device)),
        **peak_memory(device),
    }
    if profiler:
        result["profile_top"] = profiler.top
    if clock.stats:
        result["depth_fractions"] = [round(clock.stats[f"depth_frac/{r}"], 4) for r in range(m.num_recursions)]
    return result


# --------------------------------------------------------------------------------------------
# Hugging Face baselines


def hf_llama_config(model_cfg, seq_len: int):
    """A transformers LlamaConfig with our vanilla model's shapes (no biases, SDPA attention)."""
    from transformers import LlamaConfig

    m = model_cfg
    return LlamaConfig(vocab_size=m.vocab_size, hidden_size=m.hidden_size, intermediate_size=m.intermediate_size,
                       num_hidden_layers=m.num_layers, num_attention_heads=m.num_heads,
                       num_key_value_heads=m.num_kv_heads, head_dim=m.head_dim, rms_norm_eps=m.rms_norm_eps,
                       rope_theta=m.rope_theta, tie_word_embeddings=m.tie_embeddings, initializer_range=m.init_std,
                       max_position_embeddings=seq_len, attention_bias=False, mlp_bias=False,
                       attn_implementation="sdpa")


def build_hf_llama(model_cfg, seq_len: int):
    from transformers import LlamaForCausalLM

    return LlamaForCausalLM(hf_llama_config(model_cfg, seq_len))


def run_hf(arm: Arm, args: argparse.Namespace) -> dict[str, Any]:
    from mor_ds.flops import flops_per_token
    from mor_ds.train.optim import param_groups

    device = torch.device("cuda", int(os.environ.get("LOCAL_RANK", 0))) if torch.cuda.is_available() \
        else torch.device("cpu")
    if device.type == "cuda":
        torch.cuda.set_device(device)
    cfg = arm_config(arm, args, 1)
    m, t, o = cfg.model, cfg.train, cfg.optim
    if arm.baseline == "hf-liger":
        try:
            from liger_kernel.transformers import apply_liger_kernel_to_llama
        except ImportError as exc:
            return {"skipped": f"liger-kernel not importable ({exc})"}
        apply_liger_kernel_to_llama()  # patches the Llama classes (this process only)
    torch.manual_seed(t.seed)
    model = build_hf_llama(m, t.seq_len).to(device)
    amp = args.hf_precision == "amp"
    if not amp:
        model = model.to(torch.bfloat16)
    model.train()
    params = sum(p.numel() for p in model.parameters())
    optimizer = torch.optim.AdamW(param_groups(model, o), lr=o.lr, betas=tuple(o.betas), eps=o.eps,
                                  fused=device.type == "cuda")
    forward = torch.compile(model) if arm.baseline == "hf-compile" else model
    timer = PhaseTimer(device)
    clock = Clock(device, timer, args.warmup)
    profiler = _profiler(arm, args, device)
    batches = iter(SyntheticBatches(m.vocab_size, t.micro_batch_size, t.seq_len - 1))
    timed_end = args.warmup + args.steps
    for step in range(1, timed_end + args.profile_steps + 1):
        batch = next(batches)
        if device.type == "cuda":
            batch = batch.pin_memory()
        batch = batch.to(device, non_blocking=True)  # S tokens; the model shifts the labels itself
        with timer.phase("forward"), torch.autocast(device.type, torch.bfloat16, enabled=amp):
            loss = forward(input_ids=batch, labels=batch).loss
        with timer.phase("backward"):
            loss.backward()
        with timer.phase("optimizer"):
            torch.nn.utils.clip_grad_norm_(model.parameters(), o.grad_clip)
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
        if step == args.warmup:
            clock.warmup_done()
        elif step == timed_end:
            clock.finished(loss.detach(), {})
            if profiler:
                profiler.start()
    if profiler:
        profiler.stop()
    return {
        "family": "hf-llama", "params": params, "micro_batch": t.micro_batch_size, "seq_len": t.seq_len,
        "world_size": 1, "precision": args.hf_precision,
        **summarize(clock, t.micro_batch_size * t.seq_len, args.steps, 1, flops_per_token(cfg, "exact"),
                    flops_6n_per_token(params, m.num_layers, m.hidden_size, t.seq_len),
                    _peak_tflops(cfg, device)),
        **peak_memory(device),
        **({"profile_top": profiler.top} if profiler else {}),
    }


def run_arm(arm: Arm, args: argparse.Namespace) -> dict[str, Any]:
    return run_hf(arm, args) if arm.baseline else run_mor_ds(arm, args)


# --------------------------------------------------------------------------------------------
# the table


def _world_size() -> int:
    return int(os.environ.get("WORLD_SIZE") or os.environ.get("SLURM_NTASKS") or 1)


def _arm_subprocess(arm: Arm, args: argparse.Namespace, timeout: float | None) -> dict[str, Any]:
    """Run one arm in a fresh interpreter; an OOM, crash or hang becomes an error row."""
    with tempfile.TemporaryDirectory(prefix="mor-ds-bench-arm-") as tmp:
        out = Path(tmp) / "result.json"
        spec = {"arm": arm.__dict__, "args": {k: v for k, v in vars(args).items() if not callable(v)}}
        cmd = [sys.executable, "-m", "mor_ds.bench.train", "--worker", json.dumps(spec), str(out)]
        env = {k: v for k, v in os.environ.items() if k not in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_PORT")}
        try:
            proc = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, env=env)
        except subprocess.TimeoutExpired:
            return {"error": f"timed out after {timeout:.0f} s"}
        if out.is_file():
            return json.loads(out.read_text())
        tail = (proc.stderr or proc.stdout).strip().splitlines()[-8:]
        return {"error": f"exit code {proc.returncode}", "log_tail": tail}


def _arm_in_process(arm: Arm, args: argparse.Namespace) -> dict[str, Any]:
    try:
        return run_arm(arm, args)
    except Exception as exc:
        from mor_ds.distributed import is_cuda_oom

        return {"error": ("CUDA out of memory: " if is_cuda_oom(exc) else "") + f"{type(exc).__name__}: {exc}"}
    finally:
        gc.collect()
        if torch.cuda.is_available():
            torch.cuda.empty_cache()


def run(args: argparse.Namespace) -> int:
    from mor_ds.bench.timing import environment

    if args.smoke:
        args.seq_len, args.micro_batch, args.steps, args.warmup = 32, 2, 2, 1
        args.configs = args.configs or ["vanilla-135m", "mor-135m-nr2"]
    args.configs = args.configs or list(DEFAULT_CONFIGS)
    try:
        if args.steps < 1 or args.warmup < 1 or args.profile_steps < 0:
            raise ValueError(f"--steps {args.steps} / --warmup {args.warmup}: both must be >= 1 "
                             f"(--profile-steps {args.profile_steps} >= 0)")
        arms = plan_arms(args)
    except Exception as exc:
        print(f"mor-ds bench train: {exc}", file=sys.stderr)
        return 2
    world = _world_size()
    isolate = world == 1 and not args.in_process
    main = int(os.environ.get("RANK") or os.environ.get("SLURM_PROCID") or 0) == 0
    env = environment()
    try:
        import transformers

        env["transformers"] = transformers.__version__
    except ImportError:
        env["transformers"] = "absent"
    try:
        from importlib.metadata import version

        env["liger_kernel"] = version("liger-kernel")
    except Exception:
        env["liger_kernel"] = "absent"
    results: dict[str, Any] = {"environment": env, "args": {k: v for k, v in vars(args).items() if not callable(v)},
                               "arms": []}
    if main:
        print(json.dumps(env), flush=True)
    begin = time.perf_counter()
    for arm in arms:
        left = args.budget_s - (time.perf_counter() - begin) if args.budget_s else None
        if left is not None and left <= 0:
            row: dict[str, Any] = {"skipped": "time budget"}
        elif isolate:
            timeout = min(x for x in (left, args.arm_timeout_s or None) if x) if (left or args.arm_timeout_s) else None
            row = _arm_subprocess(arm, args, timeout)
        else:
            row = _arm_in_process(arm, args)
        row = {"arm": arm.name, **row}
        results["arms"].append(row)
        if main:
            print(json.dumps(row), flush=True)
            if args.json:
                Path(args.json).write_text(json.dumps(results, indent=1))
    if not isolate:
        from mor_ds import distributed

        distributed.shutdown()
    if main:
        print_table(results)
    return 0


def print_table(results: dict[str, Any]) -> None:
    print(f"\n{'arm':34} {'tok/s/GPU':>10} {'TFLOP/s':>8} {'MFU':>6} {'MFU(6N)':>10} {'step ms':>8} "
          f"{'fwd':>7} {'bwd':>7} {'opt':>7} {'other':>7} {'peak GiB':>8}")
    for row in results["arms"]:
        if "tokens_per_s" not in row:
            print(f"{row['arm']:34} {row.get('error') or row.get('skipped')}")
            continue
        mfu = f"{row['mfu']:.1%}" if row.get("mfu") is not None else "-"
        mem = row.get("peak_mem_gib", row.get("peak_rss_gib"))
        print(f"{row['arm']:34} {row['tokens_per_s_per_gpu']:>10.0f} {row['tflops_per_gpu']:>8.1f} {mfu:>6} "
              f"{row['mfu_6n']:>10.1%} {row['step_ms']:>8.1f} {row.get('forward_ms', 0):>7.1f} "
              f"{row.get('backward_ms', 0):>7.1f} {row.get('optimizer_ms', 0):>7.1f} {row['other_ms']:>7.1f} "
              f"{mem:>8}")
        if row.get("triton_jit_in_timed_steps") or row.get("compiled_graphs_in_timed_steps"):
            print(f"{'':34} warning: compiled inside the timed steps ({row['triton_jit_in_timed_steps']} Triton "
                  f"kernels, {row['compiled_graphs_in_timed_steps']} torch.compile graphs): raise --warmup")


def _worker(spec_json: str, out_path: str) -> int:
    """Subprocess entry: run one arm, write its row as JSON."""
    spec = json.loads(spec_json)
    arm = Arm(**{k: tuple(v) if k == "overrides" else v for k, v in spec["arm"].items()})
    args = argparse.Namespace(**spec["args"])
    try:
        row = run_arm(arm, args)
    except Exception as exc:
        from mor_ds.distributed import is_cuda_oom

        row = {"error": ("CUDA out of memory: " if is_cuda_oom(exc) else "") + f"{type(exc).__name__}: {exc}"}
    finally:
        if not spec["arm"]["baseline"]:
            from mor_ds import distributed

            distributed.shutdown()
    Path(out_path).write_text(json.dumps(row))
    return 0


if __name__ == "__main__":
    if len(sys.argv) == 4 and sys.argv[1] == "--worker":
        raise SystemExit(_worker(sys.argv[2], sys.argv[3]))
    _parser = argparse.ArgumentParser(prog="python -m mor_ds.bench.train", description=__doc__.splitlines()[0])
    add_arguments(_parser)
    raise SystemExit(run(_parser.parse_args()))
