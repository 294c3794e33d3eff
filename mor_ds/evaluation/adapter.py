"""lm-eval model adapter: our CausalLM (vanilla / recursive / MoR) behind `lm_eval.api.model.LM`.

Scoring follows lm-eval's Hugging Face model (`HFLM`): context and continuation are tokenized together and split
at the context's length (trailing context spaces move to the continuation), an empty context is replaced by the
EOS token (what separates documents in our packed training data), inputs longer than the model's `max_length` are
cut from the left, and a request's log-likelihood is the sum of log p(continuation token | prefix).

Routing (`routing`, MoR expert-choice only): "causal" (default) decides per token from its own router score, so a
sequence's logits never depend on later tokens or on padding, and requests of different lengths are batched with
right padding. "topk" is the training-time selection over the whole sequence (what the released MoR code used at
evaluation: it sees the future); its result depends on every token in the row, so under topk each row holds exactly
one request and rows are batched only with requests of the same length.
"""

from __future__ import annotations

import itertools
from collections.abc import Iterator, Sequence

import torch
import torch.nn.functional as F
from lm_eval.api.model import TemplateLM
from lm_eval.utils import get_rolling_token_windows, make_disjoint_window
from torch import Tensor

from mor_ds.choices import RoutingMode
from mor_ds.models import CausalLM

ROUTINGS = tuple(RoutingMode)


class MoRLM(TemplateLM):
    """`model`: our CausalLM; `tokenizer`: a data_pipeline.tokenizer.Tokenizer (encode_batch / decode / eos_id)."""

    def __init__(self, model: CausalLM, tokenizer, *, routing: str = "causal", batch_size: int = 16,
                 max_length: int = 2048, max_gen_toks: int = 256, device: str | torch.device | None = None,
                 dtype: torch.dtype | None = None):
        super().__init__()
        if routing not in ROUTINGS:
            raise ValueError(f"routing {routing!r} is not one of {', '.join(ROUTINGS)}")
        device = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
        dtype = dtype or (torch.bfloat16 if device.type == "cuda" else torch.float32)
        self.model = model.to(device=device, dtype=dtype).eval()
        self.tok = tokenizer
        self.routing = routing
        self.batch_size = batch_size
        self.max_length = max_length
        self.max_gen_toks = max_gen_toks
        self._device = device

    # -------------------------------------------------------------------------------- TemplateLM hooks

    @property
    def eot_token_id(self) -> int:
        return self.tok.eos_id

    @property
    def device(self) -> torch.device:
        return self._device

    def tok_encode(self, string: str, add_special_tokens: bool | None = None, **kwargs) -> list[int]:
        return self.tok.encode_batch([string])[0]

    def tok_decode(self, tokens: Sequence[int]) -> str:
        return self.tok.decode(list(tokens))

    def get_model_info(self) -> dict:
        cfg = self.model.cfg
        return {"family": cfg.family, "num_layers": cfg.num_layers, "num_recursions": cfg.num_recursions,
                "routing": self.routing, "num_params": self.model.num_params(),
                "dtype": str(self.model.embed.weight.dtype)}

    # -------------------------------------------------------------------------------- forward in batches

    def _batches(self, lengths: list[int]) -> Iterator[list[int]]:
        """Indices of requests, longest first, in batches: any lengths under causal routing, equal under topk."""
        order = sorted(range(len(lengths)), key=lambda i: -lengths[i])
        groups = [order] if self.routing == RoutingMode.CAUSAL else [list(g) for _, g in
                                                           itertools.groupby(order, key=lambda i: lengths[i])]
        for group in groups:
            for start in range(0, len(group), self.batch_size):
                yield group[start:start + self.batch_size]

    @torch.inference_mode()
    def _logits(self, inputs: list[list[int]]) -> Iterator[tuple[list[int], Tensor]]:
        """(request indices, their logits (b, width, V) on the device, row r's first len(inputs[batch[r]]) real)
        for every batch of input sequences."""
        lengths = [len(x) for x in inputs]
        for batch in self._batches(lengths):
            width = max(lengths[i] for i in batch)
            ids = torch.full((len(batch), width), self.tok.pad_id, dtype=torch.long)
            for row, i in enumerate(batch):
                ids[row, :lengths[i]] = torch.tensor(inputs[i])
            yield batch, self.model(ids.to(self.device), routing=self.routing).logits

    @torch.inference_mode()
    def _score(self, windows: list[tuple[list[int], list[int]]]) -> list[tuple[float, bool]]:
        """Σ log p(continuation | context) and whether the continuation is the greedy one, per (context, cont).
        Worked out per batch on the device, with one device-to-host copy per batch."""
        inputs = []
        for context, continuation in windows:
            # the model sees context + continuation minus its last token, cut from the left to max_length
            inputs.append((context + continuation)[-(self.max_length + 1):][:-1])
        results: list[tuple[float, bool]] = [(0.0, False)] * len(windows)
        for batch, logits in self._logits(inputs):
            conts = [windows[i][1] for i in batch]
            width = max(len(c) for c in conts)
            target = torch.zeros(len(batch), width, dtype=torch.long)
            where = torch.zeros(len(batch), width, dtype=torch.long)  # the positions predicting the continuation
            for row, (i, cont) in enumerate(zip(batch, conts)):
                target[row, :len(cont)] = torch.tensor(cont)
                where[row, :len(cont)] = torch.arange(len(inputs[i]) - len(cont), len(inputs[i]))
            valid = torch.arange(width)[None, :] < torch.tensor([len(c) for c in conts])[:, None]
            target, where, valid = (t.to(self.device) for t in (target, where, valid))
            # only those positions, in fp32
            logp = F.log_softmax(logits.gather(1, where[..., None].expand(-1, -1, logits.shape[-1])).float(), dim=-1)
            total = logp.gather(2, target[..., None]).squeeze(-1).masked_fill(~valid, 0.0).sum(1)
            greedy = ((logp.argmax(dim=-1) == target) | ~valid).all(1)
            for i, (logprob, hit) in zip(batch, torch.stack([total, greedy.to(total.dtype)], 1).tolist()):
                results[i] = (logprob, bool(hit))
        return results

    # -------------------------------------------------------------------------------- lm-eval API

    def _loglikelihood_tokens(self, requests, disable_tqdm: bool = False, **kwargs) -> list[tuple[float, bool]]:
        results = self._score([(context, continuation) for _, context, continuation in requests])
        for (key, _, _), result in zip(requests, results):
            self.cache_hook.add_partial("loglikelihood", key, result)
        return results

    def loglikelihood_rolling(self, requests, disable_tqdm: bool = False) -> list[float]:
        """Log-likelihood of whole texts, in windows of max_length tokens (each predicted token once)."""
        windows, owner = [], []
        for n, (text,) in enumerate(req.args for req in requests):
            rolling = get_rolling_token_windows(token_list=self.tok_encode(text), prefix_token=self.prefix_token_id,
                                                max_seq_len=self.max_length, context_len=1)
            for window in map(make_disjoint_window, rolling):
                windows.append(window)
                owner.append(n)
        totals = [0.0] * len(requests)
        for n, (logprob, _) in zip(owner, self._score(windows)):
            totals[n] += logprob
        for req, total in zip(requests, totals):
            self.cache_hook.add_partial("loglikelihood_rolling", (req.args[0],), total)
        return totals

    def generate_until(self, requests, disable_tqdm: bool = False) -> list[str]:
        """Greedy decoding (no KV cache: the prefix is re-run at each step) until a stop string, EOS or
        max_gen_toks; batched like scoring."""
        outputs = [""] * len(requests)
        prompts, settings = [], []
        for req in requests:
            context, gen_kwargs = req.args
            gen_kwargs = dict(gen_kwargs or {})
            if gen_kwargs.get("do_sample"):
                raise ValueError("generate_until: only greedy decoding is supported (do_sample=True was asked)")
            until = gen_kwargs.get("until") or []
            until = [until] if isinstance(until, str) else list(until)
            max_new = int(gen_kwargs.get("max_gen_toks", self.max_gen_toks))
            prompts.append(self.tok_encode(context)[-(self.max_length - 1):] or [self.prefix_token_id])
            settings.append((until, max_new))
        # under topk every decoding step changes the whole row's routing: decode one request at a time
        batches = (self._batches([len(p) for p in prompts]) if self.routing == RoutingMode.CAUSAL
                   else ([i] for i in range(len(prompts))))
        for batch in batches:
            for i, text in zip(batch, self._greedy([prompts[i] for i in batch], [settings[i] for i in batch])):
                outputs[i] = text
                self.cache_hook.add_partial("generate_until", requests[i].args, text)
        return outputs

    @torch.inference_mode()
    def _greedy(self, prompts: list[list[int]], settings: list[tuple[list[str], int]]) -> list[str]:
        seqs = [list(p) for p in prompts]
        new = [[] for _ in prompts]
        done = [max_new <= 0 for _, max_new in settings]
        while not all(done):
            width = max(len(s) for s in seqs)
            ids = torch.full((len(seqs), width), self.tok.pad_id, dtype=torch.long)
            for row, s in enumerate(seqs):
                ids[row, :len(s)] = torch.tensor(s)
            logits = self.model(ids.to(self.device), routing=self.routing).logits
            for row, s in enumerate(seqs):
                if done[row]:
                    continue
                token = int(logits[row, len(s) - 1].argmax())
                until, max_new = settings[row]
                if token == self.eot_token_id:
                    done[row] = True
                    continue
                new[row].append(token)
                s.append(token)
                if len(s) > self.max_length:
                    del s[0]
                text = self.tok_decode(new[row])
                done[row] = len(new[row]) >= max_new or any(stop in text for stop in until)
        texts = []
        for row, tokens in enumerate(new):
            text = self.tok_decode(tokens)
            for stop in settings[row][0]:
                text = text.split(stop)[0]
            texts.append(text)
        return texts
