"""Multi-LoRA slot buffers and the batched LoRA op.

Every base projection carries fixed-shape slot buffers sized at start-up:

    A:     [num_slots, max_rank, in_features]    (PEFT's lora_A, rows [:r])
    B:     [num_slots, max_rank, out_features]   (PEFT's lora_B transposed, rows [:r])
    scale: [num_slots]

B is kept transposed so that both halves of a rank-r adapter are contiguous row blocks: the
expand step is then r contiguous axpys per token (or one plain matmul per group) with no strided
reads. An adapter of rank r occupies rows [:r] of one slot; the rest stays zero, so a hot-swap is a
copy into preallocated memory, never a reallocation. The op every implementation computes is

    y[i] += (x[i] @ A[s_i].T) @ B[s_i] * scale[s_i]      for every token i with slot s_i >= 0

and tokens with slot -1 (the base model alone) are left untouched. `lora_reference` states that
semantics in plain torch and is the test oracle; `lora_grouped` is the fast path for batches with
many distinct adapters and must match it.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch

NO_ADAPTER = -1
#: Groups with at least this many tokens are computed with matmuls rather than per-token kernels.
LARGE_GROUP = 64


class LoraSlots(torch.nn.Module):
    """The slot buffers of one projection (see the module docstring for the layout)."""

    def __init__(self, num_slots: int, max_rank: int, in_features: int, out_features: int,
                 dtype: torch.dtype, device: torch.device) -> None:
        super().__init__()
        self.max_rank = max_rank
        self.register_buffer("A", torch.zeros(num_slots, max_rank, in_features, dtype=dtype, device=device))
        self.register_buffer("B", torch.zeros(num_slots, max_rank, out_features, dtype=dtype, device=device))
        self.register_buffer("scale", torch.zeros(num_slots, dtype=dtype, device=device))
        self.scales: list[float] = [0.0] * num_slots  # host copy of `scale`, read without a device sync
        self.filled: list[int] = [0] * num_slots
        """Rows of each slot that may be non-zero: a swap clears only those, not all max_rank rows."""

    def check_fits(self, lora_a: torch.Tensor, lora_b: torch.Tensor) -> None:
        """Raise ValueError unless lora_a [r, in] and lora_b [out, r] fit a slot (r <= max_rank)."""
        rank = lora_a.shape[0]
        if rank > self.max_rank:
            raise ValueError(f"adapter rank {rank} exceeds the configured max_rank {self.max_rank}")
        if lora_a.shape[1] != self.A.shape[2] or tuple(lora_b.shape) != (self.B.shape[2], rank):
            raise ValueError(
                f"LoRA shapes A{tuple(lora_a.shape)} B{tuple(lora_b.shape)} do not fit a projection "
                f"with in_features={self.A.shape[2]}, out_features={self.B.shape[2]}"
            )

    def set_slot(self, slot: int, lora_a: torch.Tensor, lora_b: torch.Tensor, scale: float) -> None:
        """Copy one adapter's weights into `slot`: lora_a [r, in], lora_b [out, r] (PEFT layout)."""
        self.check_fits(lora_a, lora_b)
        rank, filled = lora_a.shape[0], self.filled[slot]
        self.A[slot, :rank].copy_(lora_a)
        self.B[slot, :rank].copy_(lora_b.T)
        if filled > rank:
            self.A[slot, rank:filled].zero_()
            self.B[slot, rank:filled].zero_()
        self.filled[slot] = rank
        self.scale[slot] = scale
        self.scales[slot] = scale

    def reset_slot(self, slot: int) -> None:
        """Clear `slot`: it then adds exactly zero."""
        if self.filled[slot]:
            self.A[slot, :self.filled[slot]].zero_()
            self.B[slot, :self.filled[slot]].zero_()
            self.filled[slot] = 0
        if self.scales[slot] != 0.0:
            self.scale[slot] = 0.0
            self.scales[slot] = 0.0

    def resident_bytes(self) -> int:
        return sum(t.numel() * t.element_size() for t in (self.A, self.B, self.scale))


class SlotSet:
    """The slot buffers of projections that read the same x (a layer's q, k and v; gate and up), in the order of
    their outputs, with each kind of buffer listed once: a kernel call takes them as lists, and building the lists
    from the modules on every call costs more than a one-token call's work (~10 us on a CPU core). The buffers are
    written in place (`LoraSlots.set_slot`), never replaced, so the lists stay valid."""

    def __init__(self, slots: list[LoraSlots]) -> None:
        self.slots = slots
        self.As = [projection.A for projection in slots]
        self.Bs = [projection.B for projection in slots]
        self.scales = [projection.scale for projection in slots]


def _index(values: list[int], device: torch.device) -> torch.Tensor:
    return torch.tensor(values, dtype=torch.long, device=device)


@dataclass(frozen=True)
class GroupLayout:
    """Tokens grouped by slot: group g holds the tokens of slot `slots[g]`, padded to the longest
    group, so that all groups together are two batched matmuls per projection."""

    slots: torch.Tensor
    """[num_groups] the groups' slots."""
    gather_index: torch.Tensor
    """[num_groups * group_len] token index per padded group position (padding repeats a valid token)."""
    valid_positions: torch.Tensor | None
    """[num_grouped_tokens] padded positions that hold real tokens; None when nothing is padded."""
    token_index: torch.Tensor
    """[num_grouped_tokens] token each valid padded position writes back to: the groups' tokens, group by group."""
    starts: torch.Tensor
    """[num_groups + 1] where each group's tokens begin in `token_index` (then its end): segments for SGMV."""
    group_len: int
    rank: int
    """Largest rank among the groups' adapters: slot buffers are read only up to this rank."""

    @property
    def empty(self) -> bool:
        return self.slots.numel() == 0

    @staticmethod
    def build(tokens_by_slot: dict[int, list[int]], slot_ranks: list[int], device: torch.device) -> GroupLayout:
        group_len = max((len(tokens) for tokens in tokens_by_slot.values()), default=0)
        gather, valid, writes, starts = [], [], [], [0]
        for tokens in tokens_by_slot.values():
            starts.append(starts[-1] + len(tokens))
            valid.extend(range(len(gather), len(gather) + len(tokens)))
            writes.extend(tokens)
            gather.extend(tokens + [tokens[0]] * (group_len - len(tokens)))
        return GroupLayout(
            slots=_index(list(tokens_by_slot), device),
            gather_index=_index(gather, device),
            valid_positions=_index(valid, device) if len(gather) != len(writes) else None,
            token_index=_index(writes, device),
            starts=_index(starts, device),
            group_len=group_len,
            rank=max((slot_ranks[s] for s in tokens_by_slot), default=0),
        )


@dataclass(frozen=True)
class LoraBatch:
    """Per-step LoRA metadata, built once on the host and shared by every projection of every layer."""

    slot_ids: torch.Tensor
    """[num_tokens] slot of each token, NO_ADAPTER for base-only tokens (the reference op's input)."""
    groups: GroupLayout
    """All adapter tokens grouped by slot (the grouped op's input)."""
    large_groups: GroupLayout
    """Only the groups of >= LARGE_GROUP tokens (prefill-sized: batched matmuls pay off)."""
    small_tokens: torch.Tensor
    """[n] tokens of the other groups, adjacent by slot (per-token kernels' input)."""
    small_slots: torch.Tensor
    """[n] slot of each of `small_tokens`."""
    grouped_slots: torch.Tensor
    """[num_grouped_tokens] slot of each of `groups.token_index` (every adapter token, adjacent by slot)."""
    slot_ranks: torch.Tensor
    """[num_slots] rank of each slot's adapter."""
    has_adapters: bool
    """Whether any token has a slot: without one the op adds nothing and is skipped."""

    @staticmethod
    def build(slot_ids: list[int], slot_ranks: list[int], device: torch.device) -> LoraBatch:
        """Group `slot_ids` (one per token, host list) by slot; `slot_ranks[s]` is slot s's rank."""
        tokens_by_slot: dict[int, list[int]] = {}
        for token, slot in enumerate(slot_ids):
            if slot != NO_ADAPTER:
                tokens_by_slot.setdefault(slot, []).append(token)
        large = {slot: tokens for slot, tokens in tokens_by_slot.items() if len(tokens) >= LARGE_GROUP}
        small = [(slot, tokens) for slot, tokens in tokens_by_slot.items() if len(tokens) < LARGE_GROUP]
        return LoraBatch(
            slot_ids=_index(slot_ids, device),
            groups=GroupLayout.build(tokens_by_slot, slot_ranks, device),
            large_groups=GroupLayout.build(large, slot_ranks, device),
            small_tokens=_index([t for _, tokens in small for t in tokens], device),
            small_slots=_index([slot for slot, tokens in small for _ in tokens], device),
            grouped_slots=_index([slot for slot, tokens in tokens_by_slot.items() for _ in tokens], device),
            slot_ranks=_index(slot_ranks, device),
            has_adapters=bool(tokens_by_slot),
        )


def lora_reference(y: torch.Tensor, x: torch.Tensor, slots: LoraSlots, batch: LoraBatch) -> torch.Tensor:
    """Plain-torch statement of the op: y[i] += (x[i] @ A[s_i].T) @ B[s_i] * scale[s_i].

    x: [num_tokens, in], y: [num_tokens, out]; returns y (updated in place). Uses the full max_rank
    (zero padding adds nothing) and one gathered weight matrix per token: slow, obviously right.
    """
    rows = (batch.slot_ids != NO_ADAPTER).nonzero().squeeze(1)  # [n]
    if rows.numel() == 0:
        return y
    row_slots = batch.slot_ids[rows]  # [n]
    hidden = torch.einsum("ni,nri->nr", x[rows], slots.A[row_slots])  # [n, max_rank]
    delta = torch.einsum("nr,nro->no", hidden, slots.B[row_slots])  # [n, out]
    y[rows] += delta * slots.scale[row_slots].unsqueeze(1)
    return y


def grouped_matmul(y: torch.Tensor, x: torch.Tensor, slots: LoraSlots, layout: GroupLayout) -> torch.Tensor:
    """The LoRA op for the tokens of `layout`, as two batched matmuls over its groups.

    Gathers each group's adapter (up to the layout's rank) once; returns y (updated in place).
    """
    if layout.empty:
        return y
    num_groups, rank = layout.slots.numel(), layout.rank
    x_groups = x.index_select(0, layout.gather_index).view(num_groups, layout.group_len, -1)  # [G, L, in]
    a_groups = slots.A[:, :rank].index_select(0, layout.slots)  # [G, r, in]
    hidden = torch.bmm(x_groups, a_groups.transpose(1, 2))  # [G, L, r]
    hidden *= slots.scale.index_select(0, layout.slots).view(num_groups, 1, 1)
    b_groups = slots.B[:, :rank].index_select(0, layout.slots)  # [G, r, out]
    delta = torch.bmm(hidden, b_groups).view(num_groups * layout.group_len, -1)  # [G*L, out]
    if layout.valid_positions is not None:
        delta = delta.index_select(0, layout.valid_positions)  # [num_grouped_tokens, out]
    return y.index_add_(0, layout.token_index, delta)


def lora_grouped(y: torch.Tensor, x: torch.Tensor, slots: LoraSlots, batch: LoraBatch) -> torch.Tensor:
    """Same result as `lora_reference`, as two batched matmuls over the batch's distinct slots (any device)."""
    return grouped_matmul(y, x, slots, batch.groups)


LoraOp = Callable[[torch.Tensor, torch.Tensor, "LoraSlots", "LoraBatch"], torch.Tensor]
"""One projection's LoRA op: (y, x, slots, batch) -> y plus the adapters' deltas (in place where it can)."""
LoraGroupOp = Callable[[list[torch.Tensor], torch.Tensor, SlotSet, "LoraBatch"], list[torch.Tensor]]
"""The op for projections that read the same x: (ys, x, their slot set, batch) -> ys, each as the LoraOp gives it."""


def each_projection(op: LoraOp, ys: list[torch.Tensor], x: torch.Tensor, slot_set: SlotSet, batch: LoraBatch
                    ) -> list[torch.Tensor]:
    """`op` on each projection of a group in turn: the group form of any LoraOp (bind `op` with functools.partial)."""
    return [op(y, x, projection_slots, batch) for y, projection_slots in zip(ys, slot_set.slots, strict=True)]


class MultiLoraLinear(torch.nn.Module):
    """One projection of the served model: `y = base_nf4(x) + lora(x, slot_ids)`, its base weight and its slot
    buffers. The layer computes the base part and the adapters' of the projections that read the same x together
    (`model.DecoderLayer`)."""

    def __init__(self, base: torch.nn.Module, slots: LoraSlots) -> None:
        super().__init__()
        self.base = base
        self.slots = slots
