"""The engine: the model's runners (one per device, each with its page pool and scheduler), the tokenizer,
and the entry that turns a request into sequences on the least-loaded device."""

from __future__ import annotations

import asyncio
import logging
import time
import uuid
from dataclasses import dataclass, field
from pathlib import Path

from models.abi import ModelABI
from models.tokenizer import load_tokenizer

from .detokenizer import IncrementalDetokenizer, StopMatcher
from .guide import ConstraintError, Guides
from .kv_pages import PagePool
from .runner import Runner, set_cpu_threads
from .sampling import ParamError, Sampler, SamplingParams
from .scheduler import PREFILL_CHUNK, Scheduler, Sequence
from .speculative import SpecConfig

log = logging.getLogger("aotllm.engine")


class QueueFull(RuntimeError):
    """Too many requests queued or running: the client should retry shortly (a 503)."""


class BadRequest(ValueError):
    """The request cannot be served as asked (a 400). `field` names the SamplingParams field at fault, if
    one is; each front-end maps it to its protocol's name."""

    def __init__(self, message: str, field: str | None = None) -> None:
        super().__init__(message)
        self.field = field


class ContextOverflow(BadRequest):
    """A prompt that does not fit the context (llama.cpp's exceed_context_size_error): `n_prompt_tokens` (at
    least that many, when it was refused by its length) and the context's `n_ctx`."""

    def __init__(self, message: str, n_prompt_tokens: int, n_ctx: int) -> None:
        super().__init__(message)
        self.n_prompt_tokens, self.n_ctx = n_prompt_tokens, n_ctx


@dataclass
class EngineConfig:
    vmfb: Path
    parameters: list[Path]
    model_config: Path
    tokenizer: Path
    device: str = "local-task"
    device_ids: list[int] = field(default_factory=lambda: [0])
    kv_pages: int | None = None
    max_running: int = 16
    max_queue: int = 256
    max_tokens_per_step: int = PREFILL_CHUNK
    prefix_caching: bool = True
    max_tokens_per_request: int | None = None
    model_name: str = "default"
    pooling: str = "mean"  # embeddings: mean or last hidden state, then L2-normalised
    max_context: int | None = None  # tokens a sequence may reach, at most the program's (llama-server's -c)
    threads: int | None = None  # CPU worker threads of IREE's local-task devices (llama-server's -t)
    mixed_step: bool = True  # a step's decode and prefill in one program call (False: separate calls)
    speculative: SpecConfig | None = field(default_factory=SpecConfig)  # prompt-lookup drafts; None: off


class Engine:
    def __init__(self, cfg: EngineConfig):
        t0 = time.perf_counter()
        self.cfg = cfg
        self.abi = ModelABI.load(cfg.model_config)
        if cfg.max_context is not None:
            if cfg.max_context > self.abi.max_seq_len:
                raise ValueError(
                    f"a context of {cfg.max_context} tokens asked for; the program holds at most "
                    f"{self.abi.max_seq_len}: ask for less, or re-export with a larger --max-seq-len"
                )
            self.abi.max_seq_len = cfg.max_context  # (the paged program takes any length up to its own)
        self.tokenizer, self.tok_info = load_tokenizer(cfg.tokenizer)
        eos = set(self.abi.eos_token_ids) | set(self.tok_info.eot_ids)
        if self.tok_info.eos_id is not None:
            eos.add(self.tok_info.eos_id)
        self.eos_ids = sorted(eos)
        self.guides = Guides(self.tokenizer, self.abi.vocab_size, self.eos_ids)
        if cfg.threads is not None:
            set_cpu_threads(cfg.threads)
        tp = self.abi.tensor_parallelism_size
        if len(cfg.device_ids) % tp:
            raise ValueError(
                f"the model is sharded over {tp} devices (tensor parallelism): give --device-ids in "
                f"groups of {tp} (one replica each), not {cfg.device_ids}"
            )
        self.schedulers = []  # one per replica: a device, or a group of tp devices
        for k in range(0, len(cfg.device_ids), tp):
            ids = cfg.device_ids[k : k + tp]
            runner = Runner(cfg.vmfb, cfg.parameters, self.abi, cfg.kv_pages, cfg.device, ids)
            pool = PagePool(runner.page_count, self.abi.block_seq_stride, cfg.prefix_caching)
            self.schedulers.append(
                Scheduler(
                    runner,
                    pool,
                    self.abi,
                    self.eos_ids,
                    cfg.max_running,
                    cfg.max_tokens_per_step,
                    ids[0],
                    cfg.mixed_step,
                    cfg.speculative,
                )
            )
        self._tasks: list[asyncio.Task] = []
        self.load_seconds = time.perf_counter() - t0
        log.info(
            "engine ready in %.1f s: %d replica(s) on %d device(s) each, %d KV pages of %d tokens each",
            self.load_seconds,
            len(self.schedulers),
            tp,
            self.schedulers[0].pool.total + 1,
            self.abi.block_seq_stride,
        )

    async def start(self) -> None:
        self._tasks = [asyncio.create_task(s.run_forever()) for s in self.schedulers]

    # -- requests
    def check_ids(self, ids: list[int]) -> list[int]:
        """Token ids a client sent, refused when outside the vocabulary. (Text is tokenized by the front-ends,
        off the event loop: serve/frontends/tokenizing.py.)"""
        bad = [t for t in ids if not 0 <= t < self.abi.vocab_size]
        if bad:
            raise BadRequest(f"input_ids {bad[:5]} are outside the vocabulary [0, {self.abi.vocab_size})")
        return ids

    def submit(self, prompt_ids: list[int], params: SamplingParams, rid: str | None = None) -> list[Sequence]:
        """Queue `params.n` sequences for one prompt; returns them (their `events` queues stream results)."""
        try:
            params.validate(self.abi.vocab_size)  # the one place sampling parameters are checked
        except ParamError as e:
            raise BadRequest(str(e), e.field) from e
        cap = self.cfg.max_tokens_per_request
        if cap and params.max_tokens > cap:
            raise BadRequest(
                f"max tokens {params.max_tokens} is above this server's limit of {cap} per request", "max_tokens"
            )
        self._check_prompt(prompt_ids, params.n)
        if params.prompt_logprobs is not None and not self.abi.has_score:
            raise BadRequest(
                "this model's export has no score entry point, which prompt logprobs need; re-export it with "
                "this version of export.paged_llm",
                "prompt_logprobs",
            )
        constraint = params.constraint
        if constraint is not None:
            if self.abi.top_k:
                raise BadRequest(
                    f"this server's program returns only the top {self.abi.top_k} logits (exported with --top-k), "
                    "and a constrained output needs all of them; hint: re-export the model without --top-k",
                    "constraint",
                )
            try:
                self.guides.compile(constraint)  # (cached: front-ends compile it off the loop first, `prepare`)
            except ConstraintError as e:
                raise BadRequest(str(e), "constraint") from e
        rid = rid or uuid.uuid4().hex
        seqs = []
        for i in range(params.n):
            seed = None if params.seed is None else params.seed + i
            guide = self.guides.guide(constraint) if constraint is not None else None
            seq = Sequence(
                rid=rid if params.n == 1 else f"{rid}-{i}",
                prompt_ids=list(prompt_ids),
                params=params,
                sampler=Sampler(params, prompt_ids, seed, guide),
                detok=IncrementalDetokenizer(self.tokenizer, prompt_ids, params.skip_special_tokens),
                stops=StopMatcher(params.stop),
            )
            self._least_loaded().add(seq)
            seqs.append(seq)
        return seqs

    def embed(self, prompt_ids: list[int], rid: str | None = None) -> Sequence:
        """Queue an embedding of the prompt (pooled per --pooling); its `events` get one Event(embedding)."""
        if not self.abi.has_embed:
            raise BadRequest(
                "this model's export has no embed_bs{N} entry points; re-export it with this "
                "version of export.paged_llm to serve /v1/embeddings"
            )
        self._check_prompt(prompt_ids, 1)
        params = SamplingParams(max_tokens=0)
        seq = Sequence(
            rid=rid or uuid.uuid4().hex,
            prompt_ids=list(prompt_ids),
            params=params,
            sampler=Sampler(params, prompt_ids, None),
            detok=IncrementalDetokenizer(self.tokenizer, prompt_ids),
            stops=StopMatcher([]),
            pooling=self.cfg.pooling,
        )
        self._least_loaded().add(seq)
        return seq

    async def prepare(self, params: SamplingParams) -> None:
        """Compile the request's constraint, if any, off the event loop and within a deadline (BadRequest)."""
        if params.constraint is not None and not self.abi.top_k:
            try:
                await self.guides.prepare(params.constraint)
            except ConstraintError as e:
                raise BadRequest(str(e), "constraint") from e

    def _least_loaded(self) -> Scheduler:
        return min(self.schedulers, key=lambda s: s.load)

    def _check_prompt(self, prompt_ids: list[int], n: int) -> None:
        if not prompt_ids:
            raise BadRequest("the prompt is empty; give some text or input_ids")
        limit = self.abi.max_seq_len
        if len(prompt_ids) >= limit:
            raise ContextOverflow(
                f"the prompt has {len(prompt_ids)} tokens; the context holds {limit}: shorten it",
                len(prompt_ids),
                limit,
            )
        pool_tokens = (self.schedulers[0].pool.total) * self.abi.block_seq_stride
        if len(prompt_ids) + 1 > pool_tokens:
            raise BadRequest(
                f"the prompt has {len(prompt_ids)} tokens; the KV pool holds {pool_tokens}: "
                "shorten it or start the server with more --kv-pages"
            )
        if sum(s.load for s in self.schedulers) + n > self.cfg.max_queue:
            raise QueueFull(f"{self.cfg.max_queue} requests are queued or running; retry shortly")

    # -- observability
    def pool_stats(self):
        return [s.pool.stats() for s in self.schedulers]
