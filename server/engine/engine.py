"""`Engine`: owns the model, the KV cache and the adapter slots; runs one batched step at a time.

The engine knows nothing about tokenization, transports or files: it takes token ids and adapter
tensors, and returns token ids. Which sequences run in a step, and how many of their pending
tokens (chunked prefill), is the caller's choice (the scheduler, or `generate` for simple use).
"""

from __future__ import annotations

import itertools
import random
from collections.abc import Callable, Iterable, Iterator, Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from typing import TYPE_CHECKING, Literal

import torch
from pydantic import BaseModel, ConfigDict, Field

from loraplex.server.engine import cpu_memory, kernel_choice
from loraplex.server.engine.attention import AttentionBatch
from loraplex.server.engine.cpu_threads import single_threaded
from loraplex.server.engine.kv_cache import OutOfBlocks, PagedKVCache
from loraplex.server.engine.lora import NO_ADAPTER, LoraBatch
from loraplex.server.engine.model import DecoderModel, LoraWeights, StepMetadata
from loraplex.server.engine.prefix_cache import BlockChain, chain_root
from loraplex.server.engine.sampling import sample
from loraplex.server.engine.sequence import (
    FinishReason,
    PromptLogprob,
    SamplingParams,
    SequenceState,
    TokenConstraint,
    TokenEvent,
)
from loraplex.server.engine.spec import PROJECTIONS, ModelSpec

if TYPE_CHECKING:
    from loraplex.server.engine.cuda_graphs import DecodeGraphs


class EngineConfig(BaseModel):
    """Sizes and numerics of one engine, fixed at start-up."""

    model_config = ConfigDict(extra="forbid", frozen=True, arbitrary_types_allowed=True, use_attribute_docstrings=True)

    device: str = "cpu"
    """Torch device the model, slots and cache live on ("cpu", "cuda", "cuda:1")."""
    compute_dtype: Literal["float32", "bfloat16", "float16"] | None = None
    """Activation/compute dtype; None picks bfloat16 on CUDA and float32 on CPU."""
    quantize: bool = True
    """Store base projections in NF4 (False serves dense weights, for debugging)."""
    num_slots: int = Field(default=32, ge=1, le=4096)
    """Adapter slots in device memory: the most distinct adapters one step can serve (fewer when
    slot_memory_bytes cannot hold this many)."""
    max_rank: int = Field(default=64, ge=1, le=1024)
    """Largest LoRA rank a slot holds."""
    slot_memory_bytes: int | None = Field(default=None, ge=1)
    """Device memory budget of all adapter slots together (each slot holds max_rank for every
    projection); the engine keeps min(num_slots, budget // bytes per slot) slots and refuses to start
    if not even one fits. None: num_slots slots."""
    kv_cache_bytes: int = Field(default=512 * 2**20, ge=1)
    """Memory budget of the paged KV cache (keys and values of all layers)."""
    block_size: int = Field(default=16, ge=1, le=1024)
    """Token positions per KV block."""
    max_model_len: int | None = Field(default=None, ge=2)
    """Longest sequence (prompt + output); None uses the model's max_position_embeddings."""
    lora_impl: Literal["auto", "cpu_kernel", "triton", "grouped", "reference"] = "auto"
    """LoRA op: "cpu_kernel" (compiled per-token kernel + BLAS, float32 on CPU), "triton" (SGMV/BGMV
    kernels reading the slots in place, CUDA), "grouped" (batched matmuls over gathered slots, any
    device), "reference" (the plain test oracle); "auto" picks by kernel_choice's table."""
    nf4_kernel: Literal["auto", "fused", "triton", "bitsandbytes"] = "auto"
    """NF4 base matmul: "fused" (the compiled CPU kernel that dequantizes tiles of the packed weight
    in registers and L1; float32 or bfloat16 compute on the CPU, in_features a multiple of 32),
    "triton" (the CUDA kernel decoding in registers, up to kernel_choice.NF4_TRITON_MAX_TOKENS tokens,
    bitsandbytes above), "bitsandbytes" (bitsandbytes' matmul_4bit: the whole weight dequantized per
    call, then a matmul); "auto" picks by kernel_choice's table. Same dequantized values either way."""
    cuda_graphs: bool = False
    """Replay plain decode steps (one new token per sequence, up to 32 sequences) as CUDA graphs captured per
    bucket of batch sizes (cuda_graphs.py): CUDA with the Triton kernels only. Off by default: not yet
    measured on a GPU."""
    prefix_cache: bool = True
    """Keep finished sequences' full KV blocks, keyed by their prefix under the adapter version's content
    digest, and start new sequences from the longest cached chain (see prefix_cache.py); False prefills
    every prompt in full."""

    def torch_dtype(self) -> torch.dtype:
        if self.compute_dtype is not None:
            return getattr(torch, self.compute_dtype)
        return torch.bfloat16 if torch.device(self.device).type == "cuda" else torch.float32


def slot_bytes(spec: ModelSpec, max_rank: int, dtype: torch.dtype) -> int:
    """Device bytes of one adapter slot: A [max_rank, in], B [max_rank, out] and a scale per projection."""
    per_layer = sum(max_rank * sum(spec.projection_shape(proj)) + 1 for proj in PROJECTIONS)
    return spec.num_layers * per_layer * dtype.itemsize


def slots_within_budget(spec: ModelSpec, config: EngineConfig, dtype: torch.dtype) -> int:
    """config.num_slots, lowered to what config.slot_memory_bytes holds; ValueError if not even one slot fits."""
    if config.slot_memory_bytes is None:
        return config.num_slots
    per_slot = slot_bytes(spec, config.max_rank, dtype)
    if config.slot_memory_bytes < per_slot:
        raise ValueError(f"engine.slot_memory_bytes={config.slot_memory_bytes} holds no adapter slot: one slot of "
                         f"rank {config.max_rank} takes {per_slot} bytes; raise it or lower engine.max_rank")
    return min(config.num_slots, config.slot_memory_bytes // per_slot)


class Engine:
    """One NF4 base model, `num_slots` adapter slots, one paged KV cache."""

    def __init__(self, spec: ModelSpec, weights: Iterable[tuple[str, torch.Tensor]], config: EngineConfig,
                 base_digest: str = "") -> None:
        """`base_digest` names the weights (model_files.base_digest); it joins every prefix-cache key."""
        self.spec = spec
        self.config = config
        self.base_digest = base_digest
        self.device = torch.device(config.device)
        if self.device.type == "cpu":
            cpu_memory.keep_freed_memory()  # a prefill's activations come back without page faults
        self.dtype = config.torch_dtype()
        self.num_slots = slots_within_budget(spec, config, self.dtype)
        tools = kernel_choice.Toolchain.detect(self.device)
        self.nf4_plan = kernel_choice.BITSANDBYTES
        """Which NF4 kernel the base projections run at each token count (kernel_choice's table)."""
        if config.quantize:
            in_features = sorted({spec.projection_shape(proj)[0] for proj in PROJECTIONS})
            self.nf4_plan = kernel_choice.nf4_plan(self.device, self.dtype, in_features, tools, config.nf4_kernel)
        self.lora_impl = kernel_choice.lora_impl(self.device, self.dtype, tools, config.lora_impl)
        self.model = DecoderModel.from_weights(
            spec, iter(weights), dtype=self.dtype, device=self.device, quantize=config.quantize,
            num_slots=self.num_slots, max_rank=config.max_rank, nf4_plan=self.nf4_plan,
        )
        self.model.lora_op = kernel_choice.lora_group_op(self.lora_impl)
        self.decode_attention = kernel_choice.decode_attention(self.device, spec.num_heads, spec.num_kv_heads,
                                                               spec.head_dim, tools)
        """Who attends decode sequences: "triton" or "torch" (kernel_choice's table)."""
        num_blocks = PagedKVCache.blocks_for_budget(
            config.kv_cache_bytes, spec.num_layers, config.block_size, spec.num_kv_heads, spec.head_dim, self.dtype,
        )
        self.cache = PagedKVCache(spec.num_layers, num_blocks, config.block_size, spec.num_kv_heads,
                                  spec.head_dim, self.dtype, self.device)
        self.max_model_len = min(config.max_model_len or spec.max_position_embeddings, spec.max_position_embeddings)
        self.slot_ranks = [0] * self.num_slots
        self._windows = set(spec.sliding_windows)
        self._seq_ids: Iterator[int] = itertools.count()
        self._in_flight: set[int] = set()
        """Sequence ids of a step paused in `between_layers` (other steps refuse them)."""
        self._masks = ThreadPoolExecutor(1, thread_name_prefix="loraplex-masks", initializer=single_threaded)
        """Fills constrained rows' bitmasks while the forward pass runs."""
        self.decode_graphs: DecodeGraphs | None = None
        """The captured decode steps, with config.cuda_graphs (kernel_choice.decode_graphs)."""
        if kernel_choice.decode_graphs(self.device, self.lora_impl, self.decode_attention, config.cuda_graphs):
            from loraplex.server.engine.cuda_graphs import DecodeGraphs

            self.decode_graphs = DecodeGraphs(self.model, self.cache, self.max_model_len, self.num_slots,
                                              config.max_rank, self.device)

    # -- adapter slots ---------------------------------------------------------------------------

    def set_slot(self, slot: int, weights: LoraWeights) -> None:
        """Copy an adapter into device slot `slot` (no reallocation); untargeted projections add zero."""
        self._check_slot(slot)
        self.model.set_slot(slot, weights)
        self.slot_ranks[slot] = max((a.shape[0] for a, _, _ in weights.values()), default=0)

    def reset_slot(self, slot: int) -> None:
        self._check_slot(slot)
        self.model.reset_slot(slot)
        self.slot_ranks[slot] = 0

    def _check_slot(self, slot: int) -> None:
        if not 0 <= slot < self.num_slots:
            raise ValueError(f"slot {slot} outside [0, {self.num_slots})")

    # -- sequences -------------------------------------------------------------------------------

    def add_sequence(self, prompt_ids: Sequence[int], sampling: SamplingParams, slot: int = NO_ADAPTER,
                     version: str | None = None, cache_salt: str = "",
                     constraint: TokenConstraint | None = None) -> SequenceState:
        """A new sequence (nothing is computed or allocated until it is stepped or `reuse_prefix`), its next
        tokens limited by `constraint` when given.

        `version` is the content digest of the adapter it runs with ("" for the base model): with it (and
        config.prefix_cache), the sequence's full blocks are cached under (base digest, version,
        `cache_salt`) and it may start from blocks cached under the same. None (the caller does not say
        which weights its slot will hold) keeps it out of the prefix cache.
        """
        if not prompt_ids:
            raise ValueError("prompt must hold at least one token")
        if len(prompt_ids) >= self.max_model_len:
            raise ValueError(f"prompt of {len(prompt_ids)} tokens leaves no room in max_model_len={self.max_model_len}")
        if any(not 0 <= t < self.spec.vocab_size for t in prompt_ids):
            raise ValueError(f"prompt token ids must lie in [0, {self.spec.vocab_size})")
        if slot != NO_ADAPTER:
            self._check_slot(slot)
        generator = None
        if not sampling.greedy:
            generator = torch.Generator(device=self.device)
            generator.manual_seed(sampling.seed if sampling.seed is not None else random.getrandbits(63))
        chain = None
        if version is not None and self.config.prefix_cache:
            chain = BlockChain(chain_root(self.base_digest, version, cache_salt), self.cache.block_size)
        return SequenceState(next(self._seq_ids), list(prompt_ids), sampling, slot, generator=generator, chain=chain,
                             constraint=constraint)

    def reuse_prefix(self, seq: SequenceState) -> int:
        """Start a sequence that holds no blocks from the longest chain of cached blocks matching its leading
        full blocks (never its last token, whose logits the next step needs): it holds them as its own
        computed tokens until released. Returns the tokens reused (0 outside the prefix cache, and for a
        sequence that asks for prompt logprobs: cached blocks come without logits)."""
        if seq.block_table or seq.num_computed:
            raise ValueError(f"sequence {seq.seq_id} has started: only a sequence without blocks reuses a prefix")
        if seq.chain is None or seq.sampling.prompt_logprobs:
            return 0
        token_ids, blocks = seq.token_ids, []
        for index in range((seq.num_tokens - 1) // self.cache.block_size):
            block = self.cache.cached(seq.chain.key(index, token_ids))
            if block is None:
                break
            blocks.append(block)
        self.cache.share(seq.block_table, blocks)
        seq.num_computed = len(blocks) * self.cache.block_size
        return seq.num_computed

    def release(self, seq: SequenceState) -> None:
        """Let go of a sequence's KV blocks (finished, cancelled, or preempted: it then starts over, from its
        cached prefix if it has one); its cached full blocks stay reusable until the pool needs them."""
        self.cache.release(seq.block_table)
        seq.num_computed = 0

    # -- the step --------------------------------------------------------------------------------

    @torch.inference_mode()
    def step(self, batch: Sequence[tuple[SequenceState, int]],
             between_layers: Callable[[], None] | None = None) -> list[TokenEvent]:
        """Run `count` pending tokens of each (sequence, count) through the model in one forward pass.

        A sequence whose pending tokens are all computed by this step gets its next token sampled and
        reported; a partial prefill chunk reports nothing. Constrained sequences' bitmasks are filled on the
        mask thread during the forward pass. Prompt positions of sequences that ask for prompt logprobs get
        their logits computed too (only theirs). Blocks this step fills are offered to the prefix cache;
        finished sequences release their KV blocks.

        `between_layers`, when given, is called after each decoder layer but the last, and may run other steps
        in the meantime, over other sequences (a light tenant's prompt need not wait for a long prefill): what
        this step has computed so far lives in its own sequences' blocks and its hidden states, so its results
        are bit-identical to an uninterrupted step's. Its sequences must not be released until it returns, and
        a step over any of them is refused (ValueError) meanwhile.
        Raises OutOfBlocks (changing nothing) when the cache cannot hold the step. With CUDA graphs, a plain
        decode step replays its bucket's graph instead (cuda_graphs.py), without pausing.
        """
        if any(seq.seq_id in self._in_flight for seq, _ in batch):
            raise ValueError("a sequence of this batch is in a step that has not returned")
        self._reserve_blocks(batch)
        if self.decode_graphs is not None and self.decode_graphs.serves(batch):
            sampled = [seq for seq, _ in batch]
            masks = self._fill_masks(sampled)
            logits = self.decode_graphs.run(batch, self.slot_ranks)  # [sequences, vocab]
            self._advance(batch)
            return self._sample_events(sampled, logits, masks)
        token_ids: list[int] = []
        positions: list[int] = []
        slot_ids: list[int] = []
        attention_seqs: list[tuple[int, int, list[int]]] = []
        logits_index: list[int] = []
        sampled: list[SequenceState] = []
        prompt_index: list[int] = []
        prompt_rows: list[tuple[SequenceState, int, int]] = []  # (seq, first position, positions)
        for seq, count in batch:
            start = seq.num_computed
            first = len(token_ids)
            token_ids.extend(seq.token_ids[start:start + count])
            positions.extend(range(start, start + count))
            slot_ids.extend([seq.slot] * count)
            attention_seqs.append((start, count, self.cache.rows(seq.block_table, 0, start + count)))
            if start + count == seq.num_tokens:
                logits_index.append(len(token_ids) - 1)
                sampled.append(seq)
            if seq.sampling.prompt_logprobs:  # position p predicts prompt token p + 1
                begin = max(start, len(seq.prompt_logprobs))
                end = min(start + count, len(seq.prompt_ids) - 1)
                if begin < end:
                    prompt_index.extend(range(first + begin - start, first + end - start))
                    prompt_rows.append((seq, begin, end - begin))
        masks = self._fill_masks(sampled)
        device = self.device
        position_tensor = torch.tensor(positions, device=device)
        cos, sin = self.model.rotary(position_tensor)
        meta = StepMetadata(
            cos=cos, sin=sin,
            attention=AttentionBatch.build(attention_seqs, self._windows, device, self.decode_attention),
            lora=LoraBatch.build(slot_ids, self.slot_ranks, device),
            logits_index=torch.tensor(logits_index + prompt_index, dtype=torch.long, device=device),
        )
        if between_layers is None:
            logits = self.model(torch.tensor(token_ids, device=device), meta, self.cache)  # [outputs, vocab]
        else:
            logits = self._pausable_forward(torch.tensor(token_ids, device=device), meta, between_layers,
                                            {seq.seq_id for seq, _ in batch})
        self._record_prompt_logprobs(prompt_rows, logits[len(sampled):])
        self._advance(batch)
        return self._sample_events(sampled, logits, masks)

    def _pausable_forward(self, token_ids: torch.Tensor, meta: StepMetadata, between_layers: Callable[[], None],
                          seq_ids: set[int]) -> torch.Tensor:
        """The model's forward pass (token_ids [num_tokens] -> logits [outputs, vocab]) one layer at a time, calling
        `between_layers` after each but the last while `seq_ids` are refused by other steps (`step`)."""
        model, last = self.model, self.spec.num_layers - 1
        self._in_flight |= seq_ids
        try:
            hidden = torch.nn.functional.embedding(token_ids, model.embed)  # [num_tokens, hidden]
            for layer in range(last):
                hidden = model.run_layers(hidden, meta, self.cache, layer, layer + 1)
                between_layers()
            hidden = model.run_layers(hidden, meta, self.cache, last, last + 1)
        finally:
            self._in_flight -= seq_ids
        return model.logits(hidden, meta)

    def _advance(self, batch: Sequence[tuple[SequenceState, int]]) -> None:
        """Mark the step's tokens computed, offering the blocks they fill to the prefix cache."""
        for seq, count in batch:
            self._register_full_blocks(seq, seq.num_computed + count)
            seq.num_computed += count

    def _sample_events(self, sampled: list[SequenceState], logits: torch.Tensor,
                       masks: Future[tuple[list[int], torch.Tensor]] | None) -> list[TokenEvent]:
        """Sample each of `sampled` from its row of logits [>= len(sampled), vocab], finish and report it."""
        if not sampled:
            return []
        chosen = sample(logits[:len(sampled)], sampled, masks.result() if masks is not None else None)
        events = []
        for row, (seq, token, logprob, top) in enumerate(zip(sampled, chosen.tokens, chosen.logprobs,
                                                             chosen.top_logprobs, strict=True)):
            if row in chosen.dead_ends:
                seq.finish_reason = FinishReason.DEAD_END
                self.release(seq)
                events.append(TokenEvent(seq.seq_id, -1, float("nan"), FinishReason.DEAD_END))
                continue
            prompt_logprobs = None
            if seq.sampling.prompt_logprobs and not seq.output_ids:
                prompt_logprobs = tuple(seq.prompt_logprobs)
            seq.output_ids.append(token)
            if seq.constraint is not None:
                seq.constraint.advance(token)
            seq.finish_reason = self._finish_reason(seq, token)
            if seq.finished:
                self.release(seq)
            events.append(TokenEvent(seq.seq_id, token, logprob, seq.finish_reason, top, prompt_logprobs))
        return events

    def _fill_masks(self, sampled: list[SequenceState]) -> Future[tuple[list[int], torch.Tensor]] | None:
        """The bitmasks of the constrained rows of `sampled` (rows, [rows, ceil(vocab / 32)] int32), being
        filled on the mask thread; None when no row is constrained."""
        rows = [row for row, seq in enumerate(sampled) if seq.constraint is not None]
        if not rows:
            return None

        def fill() -> tuple[list[int], torch.Tensor]:
            bitmask = torch.zeros(len(rows), (self.spec.vocab_size + 31) // 32, dtype=torch.int32)
            for index, row in enumerate(rows):
                sampled[row].constraint.fill_bitmask(bitmask, index)
            return rows, bitmask

        return self._masks.submit(fill)

    @staticmethod
    def _record_prompt_logprobs(prompt_rows: list[tuple[SequenceState, int, int]], logits: torch.Tensor) -> None:
        """logits: [sum of counts, vocab], the rows' prompt positions in order: each position p's logprob of
        prompt token p + 1 (and its top_logprobs alternatives), appended to the sequence's prompt_logprobs."""
        offset = 0
        for seq, begin, count in prompt_rows:
            logprobs = torch.log_softmax(logits[offset:offset + count], dim=-1)  # [count, vocab]
            offset += count
            targets = torch.tensor(seq.prompt_ids[begin + 1:begin + 1 + count], device=logits.device)
            chosen = logprobs.gather(1, targets[:, None]).squeeze(1).tolist()  # [count]
            k = seq.sampling.top_logprobs
            tops: list[tuple[tuple[int, float], ...]] = [()] * count
            if k:
                values, ids = torch.topk(logprobs, k, dim=-1)  # [count, k]
                tops = [tuple(zip(i, v, strict=True)) for i, v in zip(ids.tolist(), values.tolist(), strict=True)]
            seq.prompt_logprobs.extend(PromptLogprob(lp, top) for lp, top in zip(chosen, tops, strict=True))

    def _reserve_blocks(self, batch: Sequence[tuple[SequenceState, int]]) -> None:
        needed = 0
        for seq, count in batch:
            if seq.finished or not 1 <= count <= seq.num_pending:
                raise ValueError(f"sequence {seq.seq_id}: cannot run {count} of {seq.num_pending} pending tokens")
            needed += max(0, self.cache.blocks_needed(seq.num_computed + count) - len(seq.block_table))
        if needed > self.cache.free_blocks:
            raise OutOfBlocks(f"step needs {needed} KV blocks, {self.cache.free_blocks} free")
        for seq, count in batch:
            self.cache.grow(seq.block_table, seq.num_computed + count)

    def _register_full_blocks(self, seq: SequenceState, computed: int) -> None:
        """Cache the blocks of `seq` that are full once `computed` of its tokens are (those filled before
        were registered, or shared, then)."""
        size = self.cache.block_size
        first, end = seq.num_computed // size, computed // size
        if seq.chain is None or first == end:
            return
        token_ids = seq.token_ids
        for index in range(first, end):
            self.cache.register(seq.block_table[index], seq.chain.key(index, token_ids))

    def _finish_reason(self, seq: SequenceState, token: int) -> FinishReason | None:
        params = seq.sampling
        if seq.constraint is not None and seq.constraint.terminated:
            return FinishReason.STOP
        if token in params.stop_token_ids or (not params.ignore_eos and token in self.spec.eos_token_ids):
            return FinishReason.STOP
        if len(seq.output_ids) >= params.max_new_tokens or seq.num_tokens >= self.max_model_len:
            return FinishReason.LENGTH
        return None

    # -- convenience -----------------------------------------------------------------------------

    def generate(self, prompts: Sequence[Sequence[int]], sampling: SamplingParams | Sequence[SamplingParams],
                 slots: Sequence[int] | None = None, max_step_tokens: int = 2048,
                 versions: Sequence[str | None] | None = None) -> list[list[int]]:
        """Run prompts to completion together (prefill chunked to `max_step_tokens` per step), each from its
        cached prefix when `versions` names the adapter version of its slot (see add_sequence).

        For tests, benchmarks and offline use; serving goes through the scheduler.
        """
        params = [sampling] * len(prompts) if isinstance(sampling, SamplingParams) else list(sampling)
        slots = [NO_ADAPTER] * len(prompts) if slots is None else slots
        versions = [None] * len(prompts) if versions is None else versions
        seqs = [self.add_sequence(p, s, slot, version)
                for p, s, slot, version in zip(prompts, params, slots, versions, strict=True)]
        for seq in seqs:
            self.reuse_prefix(seq)
        running = list(seqs)
        while running:
            budget, batch = max_step_tokens, []
            for seq in running:
                count = min(seq.num_pending, budget)
                if count == 0:
                    break
                batch.append((seq, count))
                budget -= count
            self.step(batch)
            running = [s for s in running if not s.finished]
        return [s.output_ids for s in seqs]
