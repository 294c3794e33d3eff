"""Parameter, FLOPs and memory accounting for vanilla / recursive / MoR models: pure functions of the config.

Nothing here builds a model, so the trainer, sweeps and `mor-ds plan` can size runs instantly.

Two FLOPs conventions:

exact  (MFU, throughput): forward FLOPs of every matmul the model runs, per token, then ×3 for training
       (backward = 2× forward: input and weight gradients). GQA-aware projections, LM head, routers,
       attention scores and values with causal halving (a query sees half the keys on average). MoR counts
       only the active tokens of each recursion step: expert-choice k_r = max(1, ⌊capacity_r·S⌋) per
       sequence; token-choice a uniform depth distribution (fraction (Nr−r)/Nr at step r) unless measured
       fractions are given. kv_mode "share": K/V projections skipped at steps r ≥ 1, whose active queries
       attend over the keys of step 0. Embedding lookup, norms, RoPE, softmax, activations and the loss
       are not matmuls and are not counted (a few % of the total at the paper's sizes).
paper  the accounting Bae et al. 2025 used to match compute (their Sec. 3 and released configs): forward only (no ×3),
       embeddings / LM head / norms / routers excluded, K and V projections counted as d×d (GQA ignored),
       per unrolled layer cap·2·(4d² + 3·d·ffn) + cap²·2·d·S, and under KV sharing at steps r ≥ 1
       cap·2·(2d² + 3·d·ffn) + cap·2·d·S; cap = capacity_r as a real number (unique prelude/coda layers and
       all recursive-model layers have cap 1; token-choice uses the uniform depth fractions). Steps =
       round(budget / (FLOPs per token × global batch tokens)): this reproduces the step counts of the
       authors' released 360M configs (vanilla 9438, MoR-2 12619, MoR-4 14216, …), except MoR-3 where they
       have 14161 and the formula 14160.01 (tests/test_flops.py).

Memory follows the ZeRO paper's mixed-precision model (Rajbhandari et al. 2020): bf16 weights and grads
(2 + 2 bytes/param), fp32 master weights + Adam moments (12 bytes/param), each partitioned over the GPUs
from the ZeRO stage that shards it; activations are the tensors autograd saves in one micro-batch plus the
logits transient (within 2% of the measured H100 peak for vanilla-360m, 4–10% low for MoR).
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Literal, Sequence

from mor_ds.config import Config, ConfigError, ModelConfig, RouterConfig
from mor_ds.distributed import fp32_grad_accumulation
from mor_ds.models.mor_math import capacity_schedule, hierarchical_counts
from mor_ds.models.sharing import LayerPlan, layer_plan

Convention = Literal["exact", "paper"]
CONVENTIONS: tuple[str, ...] = ("exact", "paper")


# --------------------------------------------------------------------------------------------
# Parameters


def _router_params(model: ModelConfig, router: RouterConfig, out_features: int) -> int:
    """One router network: Linear(d, out) or Linear(d, inner) → GELU → Linear(inner, out), no biases."""
    d = model.hidden_size
    if router.arch == "linear":
        return d * out_features
    inner = router.mlp_hidden_size or d
    return d * inner + inner * out_features


def block_params(model: ModelConfig) -> int:
    """One decoder block: two RMSNorms, q/k/v/o projections (GQA), SwiGLU (gate, up, down)."""
    d, hd = model.hidden_size, model.head_dim
    attention = d * model.num_heads * hd * 2 + d * model.num_kv_heads * hd * 2
    return 2 * d + attention + 3 * d * model.intermediate_size


def router_params(model: ModelConfig, router: RouterConfig | None) -> int:
    """All router parameters of a MoR model (0 for vanilla / recursive). Loss-free balancing biases are
    buffers, not parameters."""
    if model.family != "mor":
        return 0
    router = router or RouterConfig()
    if router.type == "token_choice":
        return _router_params(model, router, model.num_recursions)
    per_step = _router_params(model, router, 1) * (2 if router.causal_mode == "aux_router" else 1)
    return per_step * model.num_recursions


def _plan(model: ModelConfig) -> LayerPlan:
    if model.family == "vanilla":
        return layer_plan(model.num_layers, 1, "cycle")
    return layer_plan(model.num_layers, model.num_recursions, model.sharing)


def count_params(model: ModelConfig, router: RouterConfig | None = None, *, unique: bool = True,
                 embedding: bool = True) -> int:
    """Parameters of the model (unique=True: every shared block once) or of the vanilla model it unrolls to
    (unique=False: each shared block once per use). embedding=False drops the token embedding (and the LM
    head when untied): the paper's "non-embedding parameters". Equals `build_model(...).num_params(...)`."""
    plan = _plan(model)
    layers = plan.num_unique_layers if unique else model.num_layers
    total = layers * block_params(model) + model.hidden_size + router_params(model, router)  # + final norm
    if embedding:
        total += model.vocab_size * model.hidden_size * (1 if model.tie_embeddings else 2)
    return total


@dataclass(frozen=True)
class ParamCounts:
    total: int  # unrolled (vanilla-equivalent) parameters, embeddings included
    unique: int  # parameters the model actually holds
    total_non_embedding: int
    unique_non_embedding: int


def param_counts(cfg: Config) -> ParamCounts:
    m, r = cfg.model, cfg.router
    return ParamCounts(
        total=count_params(m, r, unique=False, embedding=True),
        unique=count_params(m, r, unique=True, embedding=True),
        total_non_embedding=count_params(m, r, unique=False, embedding=False),
        unique_non_embedding=count_params(m, r, unique=True, embedding=False),
    )


# --------------------------------------------------------------------------------------------
# Which tokens each unrolled layer runs on


@dataclass(frozen=True)
class LayerCall:
    """One application of a decoder block to one sequence of S tokens (token counts per sequence)."""

    queries: float  # tokens the block runs on: q/o projections, MLP, attention queries
    kv_tokens: float  # tokens whose K/V it projects (0 when the K/V of step 0 are reused)
    keys: float  # keys the queries attend over before causal masking
    step: int  # recursion step r (0 for prelude / coda / vanilla layers)
    masked: bool = False  # runs on a compacted token subset (MoR): attention needs an explicit position mask


def step_fractions(cfg: Config, convention: Convention = "exact",
                   active_fractions: Sequence[float] | None = None) -> list[float]:
    """Fraction of a sequence's tokens processed at each recursion step r = 0…Nr−1.

    vanilla / recursive: all ones. MoR expert-choice: exact k_r/S with k_r = max(1, ⌊capacity_r·S⌋)
    (hierarchical, so never more than step r−1), paper capacity_r itself. Token-choice: the uniform depth
    distribution (Nr−r)/Nr. `active_fractions` (e.g. the model's `depth_frac/r` stats) overrides both.
    """
    m = cfg.model
    nr = m.num_recursions if m.family != "vanilla" else 1
    if active_fractions is not None:
        fractions = [float(f) for f in active_fractions]
        if len(fractions) != nr or not all(0.0 <= f <= 1.0 for f in fractions):
            raise ValueError(f"active_fractions {fractions}: need {nr} fractions in [0, 1] (one per recursion step)")
        return fractions
    if m.family != "mor":
        return [1.0] * nr
    if cfg.router.type == "token_choice":
        return capacity_schedule(nr)
    capacities = cfg.router.capacities(nr)
    if convention == "paper":
        return capacities
    seq = cfg.train.seq_len
    return [k / seq for k in hierarchical_counts(capacities, seq)]


def layer_calls(cfg: Config, fractions: Sequence[float]) -> list[LayerCall]:
    """Every unrolled block application of one sequence, in execution order."""
    m, seq = cfg.model, cfg.train.seq_len
    plan = _plan(m)
    share = m.family != "vanilla" and m.kv_mode == "share"
    full = LayerCall(queries=seq, kv_tokens=seq, keys=seq, step=0)
    calls = [full] * len(plan.prelude)
    routed = m.family == "mor"
    for _, step in plan.recursive_part:
        n = fractions[step] * seq
        if share and step > 0:  # active queries over the K/V that the same layer computed at step 0
            calls.append(LayerCall(queries=n, kv_tokens=0.0, keys=fractions[0] * seq, step=step, masked=routed))
        else:
            calls.append(LayerCall(queries=n, kv_tokens=n, keys=n, step=step, masked=routed))
    return calls + [full] * len(plan.coda)


# --------------------------------------------------------------------------------------------
# FLOPs


@dataclass(frozen=True)
class FlopsBreakdown:
    """FLOPs per token by component (a multiply-add = 2 FLOPs): forward parts, and the backward pass."""

    convention: str
    linear: float  # q/k/v/o projections and SwiGLU of every unrolled layer
    attention: float  # QKᵀ and PV
    lm_head: float
    router: float  # MoR routers (expert-choice: main routers; token-choice: the one router)
    aux_router: float  # expert-choice auxiliary routers (causal_mode=aux_router)
    backward: float  # exact: 2× forward, less the input gradient the detached aux routers never need; paper: 0

    @property
    def forward(self) -> float:
        return self.linear + self.attention + self.lm_head + self.router + self.aux_router

    @property
    def training(self) -> float:
        """exact: forward + backward; paper: the paper's forward-only count."""
        return self.forward + self.backward


def _check_convention(convention: str) -> None:
    if convention not in CONVENTIONS:
        raise ConfigError(f"flops convention {convention!r}: not one of {', '.join(CONVENTIONS)}")


def flops_breakdown(cfg: Config, convention: Convention | None = None, *,
                    active_fractions: Sequence[float] | None = None, causal_halving: bool = True) -> FlopsBreakdown:
    """Forward FLOPs per token of `cfg` under a convention (default: cfg.train.flops_convention).

    causal_halving=False counts every (query, key) pair, as a dense masked kernel (the reference attention
    backend, or `torch.utils.flop_counter`) does; the paper convention always halves.
    """
    convention = convention or cfg.train.flops_convention
    _check_convention(convention)
    m, seq = cfg.model, cfg.train.seq_len
    d, hd, ffn = m.hidden_size, m.head_dim, m.intermediate_size
    fractions = step_fractions(cfg, convention, active_fractions)
    paper = convention == "paper"
    q_width = d if paper else m.num_heads * hd
    kv_width = d if paper else m.num_kv_heads * hd  # the paper counts K and V as d×d
    pair_factor = 0.5 if (causal_halving or paper) else 1.0

    linear = attention = 0.0
    for call in layer_calls(cfg, fractions):
        linear += 2 * call.queries * (2 * d * q_width + 3 * d * ffn) + 2 * call.kv_tokens * 2 * d * kv_width
        # QKᵀ and PV: 2 matmuls × 2 FLOPs × head_dim per (query, key) pair per query head
        attention += 4 * q_width * call.queries * call.keys * pair_factor
    if paper:
        return FlopsBreakdown(convention, linear / seq, attention / seq, 0.0, 0.0, 0.0, backward=0.0)

    router = aux_router = aux_input_grad = 0.0
    if m.family == "mor":
        r = cfg.router
        if r.type == "token_choice":  # once, on every token after the prelude
            router = 2 * seq * _router_params(m, r, m.num_recursions)
        else:  # step r scores the tokens still active after step r−1
            scored = sum([1.0, *fractions[:-1]]) * seq
            router = 2 * scored * _router_params(m, r, 1)
            if r.causal_mode == "aux_router":
                aux_router = router
                # its input is detached: the first layer computes no input gradient
                aux_input_grad = 2 * scored * d * (1 if r.arch == "linear" else (r.mlp_hidden_size or d))
    lm_head = 2 * seq * d * m.vocab_size
    backward = 2 * (linear + attention + lm_head + router + aux_router) - aux_input_grad
    return FlopsBreakdown(convention, linear / seq, attention / seq, lm_head / seq, router / seq, aux_router / seq,
                          backward=backward / seq)


def flops_per_token(cfg: Config, convention: Convention | None = None, *,
                    active_fractions: Sequence[float] | None = None, causal_halving: bool = True) -> float:
    """Training FLOPs per token (exact: forward + backward; paper: the paper's forward-only count).

    For MFU pass convention="exact" (and, for token-choice, the measured `depth_frac/r` as active_fractions).
    """
    return flops_breakdown(cfg, convention, active_fractions=active_fractions, causal_halving=causal_halving).training


# --------------------------------------------------------------------------------------------
# Budgets


@dataclass(frozen=True)
class Plan:
    """How long a run trains under a budget: steps of global_batch_size × seq_len tokens."""

    name: str
    convention: str
    budget: str  # what decided the steps, e.g. "flops=1.65e+19"
    flops_per_token: float  # under `convention`
    tokens_per_step: int
    steps: int
    tokens: int  # steps × tokens_per_step
    flops: float  # tokens × flops_per_token

    def to_dict(self) -> dict:
        return asdict(self)


def _steps(amount: float, per_step: float, what: str) -> int:
    steps = round(amount / per_step)  # round to nearest, as the paper's configs do
    if steps < 1:
        raise ConfigError(f"{what}: less than one optimizer step ({per_step:.4g} per step)")
    return steps


def plan_budget(cfg: Config, *, tokens: float | None = None, flops: float | None = None,
                convention: Convention | None = None, active_fractions: Sequence[float] | None = None) -> Plan:
    """Optimizer steps, tokens and FLOPs for a budget of `tokens` or `flops` (at most one); with neither,
    the config's own budget: train.max_steps, else train.max_tokens, else train.max_flops."""
    convention = convention or cfg.train.flops_convention
    if tokens is not None and flops is not None:
        raise ConfigError("plan: give a token budget or a FLOPs budget, not both")
    t = cfg.train
    per_token = flops_per_token(cfg, convention, active_fractions=active_fractions)
    per_step = t.global_batch_size * t.seq_len
    if tokens is not None:
        budget, steps = f"tokens={tokens:.4g}", _steps(tokens, per_step, f"token budget {tokens:.4g}")
    elif flops is not None:
        budget, steps = f"flops={flops:.4g}", _steps(flops, per_token * per_step, f"FLOPs budget {flops:.4g}")
    elif t.max_steps:
        budget, steps = f"train.max_steps={t.max_steps}", t.max_steps
    elif t.max_tokens:
        budget, steps = f"train.max_tokens={t.max_tokens}", _steps(t.max_tokens, per_step, "train.max_tokens")
    elif t.max_flops:
        budget = f"train.max_flops={t.max_flops:.4g}"
        steps = _steps(t.max_flops, per_token * per_step, "train.max_flops")
    else:
        raise ConfigError("train: no budget (set train.max_steps, train.max_tokens or train.max_flops)")
    return Plan(name=cfg.name, convention=convention, budget=budget, flops_per_token=per_token,
                tokens_per_step=per_step, steps=steps, tokens=steps * per_step, flops=steps * per_step * per_token)


# --------------------------------------------------------------------------------------------
# Memory (bytes per GPU)


def _call_activation_elements(m: ModelConfig, call: LayerCall) -> float:
    """Elements autograd keeps for one block call with a fused attention kernel (no S×S matrix).

    Per query token: attn-norm input and output, mlp-norm input and output (4d); q after RoPE, the attention
    output and its contiguous copy that o_proj reads (3·Hq·hd); SwiGLU gate, SiLU(gate), up and their product
    (4·ffn). Per projected K/V token: k after RoPE and v (2·Hkv·hd). (RoPE keeps only cos/sin.)
    """
    q_width, kv_width = m.num_heads * m.head_dim, m.num_kv_heads * m.head_dim
    return (call.queries * (4 * m.hidden_size + 3 * q_width + 4 * m.intermediate_size)
            + call.kv_tokens * 2 * kv_width)


def activation_bytes(cfg: Config, checkpointing: bool = False) -> float:
    """Peak activation memory of one sequence (bytes): what autograd keeps for backward plus the largest
    transient on top of it (the logits). With checkpointing, each block call keeps only its input and one
    call's activations are rebuilt at a time. Checked against torch.cuda.max_memory_allocated on an H100
    (see tests/test_flops.py)."""
    m, seq = cfg.model, cfg.train.seq_len
    elem = 2 if cfg.train.precision == "bf16" else 4
    d, kv_width = m.hidden_size, m.num_kv_heads * m.head_dim
    fractions = step_fractions(cfg, "exact")
    calls = layer_calls(cfg, fractions)
    per_call = [_call_activation_elements(m, c) * elem for c in calls]
    if m.attention_backend == "reference":  # fp32 scores and probabilities materialised per call
        per_call = [b + 8 * m.num_heads * c.queries * c.keys for b, c in zip(per_call, calls)]
    elif m.attention_backend in ("auto", "sdpa"):
        # SDPA takes an explicit visibility mask (kept as an additive bias) when tokens are compacted or
        # documents masked; only dense causal calls run the mask-free flash kernel
        per_call = [b + elem * c.queries * c.keys * (c.masked or m.document_mask) for b, c in zip(per_call, calls)]
    # outside the blocks: MoR keeps each step's router input and the block-output difference y − x that the
    # router weight multiplies; the head keeps the final norm's input/output and the fp32 log-softmax
    kept = 2 * seq * d * elem + 4 * seq * m.vocab_size
    if m.family == "mor":
        scored = 1.0 if cfg.router.type == "token_choice" else sum([1.0, *fractions[:-1]])
        kept += (scored + sum(fractions)) * seq * d * elem
    # transient: the logits in the compute dtype and their fp32 copy (forward) or gradient (backward)
    logits = (elem + 4) * seq * m.vocab_size
    if not checkpointing:
        return kept + sum(per_call) + logits
    kept += sum(c.queries * d * elem for c in calls)  # block inputs
    if m.family != "vanilla" and m.kv_mode == "share":  # step-0 K/V handed to later steps
        kept += sum(c.kv_tokens * 2 * kv_width * elem for c in calls if c.step == 0)
    return kept + max(logits, max(per_call))


def estimate_memory(cfg: Config, zero_stage: int | None = None, micro_batch: int | None = None,
                    gpus: int = 1) -> dict[str, float]:
    """Per-GPU memory in bytes: weights, gradients, optimizer states (sharded by the ZeRO stage over `gpus`;
    optimizer states on the CPU with train.offload_optimizer) and activations of one micro-batch with and
    without activation checkpointing of every block call. Not modelled: CUDA context, communication buckets,
    allocator fragmentation, ZeRO-3's gathered-parameter buffers, transient forward/backward workspace."""
    t = cfg.train
    zero_stage = t.zero_stage if zero_stage is None else zero_stage
    micro_batch = t.micro_batch_size if micro_batch is None else micro_batch
    if zero_stage not in (0, 1, 2, 3):
        raise ConfigError(f"zero stage {zero_stage}: must be 0, 1, 2 or 3")
    if micro_batch < 1 or gpus < 1:
        raise ConfigError(f"micro batch {micro_batch} / gpus {gpus}: must be >= 1")
    n = count_params(cfg.model, cfg.router, unique=True, embedding=True)
    if t.precision == "bf16":  # bf16 weights and grads; fp32 master weights + Adam m, v
        weight_b, grad_b, optim_b = 2, 2, 12
        accumulation_steps = max(t.global_batch_size // (micro_batch * gpus), 1)
        if fp32_grad_accumulation(t.precision, zero_stage, t.offload_optimizer, accumulation_steps):
            grad_b = 4  # the gradient partition sums micro-batches in fp32
    else:  # fp32 weights and grads; Adam m, v
        weight_b, grad_b, optim_b = 4, 4, 8
    weights = n * weight_b / (gpus if zero_stage >= 3 else 1)
    grads = n * grad_b / (gpus if zero_stage >= 2 else 1)
    optimizer = 0.0 if t.offload_optimizer else n * optim_b / (gpus if zero_stage >= 1 else 1)
    states = weights + grads + optimizer
    activations = micro_batch * activation_bytes(cfg, checkpointing=False)
    checkpointed = micro_batch * activation_bytes(cfg, checkpointing=True)
    return {
        "weights": weights, "gradients": grads, "optimizer": optimizer,
        "activations": activations, "activations_checkpointed": checkpointed,
        "total": states + activations, "total_checkpointed": states + checkpointed,
    }
