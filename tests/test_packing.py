"""Packing: pack_sequences / unpack round trips, positions and boundaries, first-fit-decreasing bins."""

import random

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from sphinx_kernels import PackedBatch, pack_bins, pack_sequences, unpack


@pytest.mark.parametrize("trailing", [(), (3,), (2, 5)])
@pytest.mark.parametrize("dtype", [torch.int64, torch.float16, torch.float32])
def test_pack_then_unpack_is_bit_exact(seed, dtype, trailing):
    rng = random.Random(seed)
    gen = torch.Generator().manual_seed(seed)
    lengths = [1, 0, *(rng.randint(0, 50) for _ in range(rng.randint(1, 8)))]
    rng.shuffle(lengths)
    seqs = [(torch.randn((n, *trailing), generator=gen) * 100).to(dtype) for n in lengths]
    packed = pack_sequences(seqs)
    assert isinstance(packed, PackedBatch)
    assert packed.tokens.shape == (sum(lengths), *trailing) and packed.tokens.dtype == dtype
    assert packed.cu_seqlens.dtype == torch.int32 and packed.position_ids.dtype == torch.int64
    bounds = [0]
    for n in lengths:
        bounds.append(bounds[-1] + n)
    assert packed.cu_seqlens.tolist() == bounds
    assert packed.position_ids.tolist() == [i for n in lengths for i in range(n)]
    assert packed.max_seqlen == max(lengths)
    assert packed.lengths == lengths and packed.num_sequences == len(lengths)
    for back in (unpack(packed), unpack(packed.tokens, packed.cu_seqlens)):
        assert len(back) == len(seqs)
        for a, b in zip(back, seqs, strict=True):
            assert a.dtype == b.dtype and torch.equal(a, b)


def test_pack_errors():
    with pytest.raises(ValueError, match="empty"):
        pack_sequences([])
    with pytest.raises(TypeError, match="list of tensors"):
        pack_sequences(torch.zeros(3))
    with pytest.raises(TypeError, match=r"sequences\[1\] has dtype"):
        pack_sequences([torch.zeros(2), torch.zeros(2, dtype=torch.int64)])
    with pytest.raises(ValueError, match=r"sequences\[1\] has trailing shape"):
        pack_sequences([torch.zeros(2, 3), torch.zeros(2, 4)])
    with pytest.raises(TypeError, match=r"sequences\[0\] must be a torch.Tensor"):
        pack_sequences([[1, 2]])
    with pytest.raises(ValueError, match="scalar"):
        pack_sequences([torch.tensor(1.0)])


def test_unpack_errors():
    x = torch.zeros(6)
    with pytest.raises(ValueError, match="ends at 5"):
        unpack(x, torch.tensor([0, 2, 5]))
    with pytest.raises(ValueError, match="non-decreasing"):
        unpack(x, torch.tensor([0, 4, 2, 6]))
    with pytest.raises(ValueError, match="start at 0"):
        unpack(x, torch.tensor([1, 6]))
    with pytest.raises(TypeError, match="cu_seqlens is required"):
        unpack(x)


# ------------------------------------------------------------------------------------------------
# First-fit decreasing
# ------------------------------------------------------------------------------------------------


def test_pack_bins_hand_example():
    # Decreasing: 7 (i=1), 5 (i=3), 4 (i=0), 3 (i=4), 2 (i=2), 2 (i=5), 1 (i=6); budget 10.
    # 7 -> bin0 (3 left); 5 -> bin1 (5 left); 4 -> bin1 (1 left); 3 -> bin0 (full);
    # 2 -> bin2; 2 -> bin2; 1 -> bin1.
    assert pack_bins([4, 7, 2, 5, 3, 2, 1], 10) == [[1, 4], [3, 0, 6], [2, 5]]
    assert pack_bins([], 10) == []
    assert pack_bins(torch.tensor([10, 10]), 10) == [[0], [1]]


def test_pack_bins_errors():
    with pytest.raises(ValueError, match="sequence 2 has 11 tokens, more than the budget of 10"):
        pack_bins([3, 4, 11, 2], 10)
    with pytest.raises(ValueError, match="budget"):
        pack_bins([1], 0)
    with pytest.raises(ValueError, match=r"lengths\[0\] = -1"):
        pack_bins([-1], 5)
    with pytest.raises(TypeError, match=r"lengths\[1\] must be an int"):
        pack_bins([1, 2.5], 5)


@settings(max_examples=60, deadline=None)
@given(
    lengths=st.lists(st.integers(0, 300), max_size=60),
    budget=st.integers(300, 1000),
)
def test_pack_bins_properties(lengths, budget):
    bins = pack_bins(lengths, budget)
    placed = sorted(i for b in bins for i in b)
    assert placed == list(range(len(lengths)))  # every sequence exactly once
    loads = [sum(lengths[i] for i in b) for b in bins]
    assert all(load <= budget for load in loads)
    # First fit: no item could have gone into an earlier bin at the time it was placed. Replaying the
    # placement order, each item's bin is the first with room.
    free, where = [], {i: b for b, items in enumerate(bins) for i in items}
    order = sorted(range(len(lengths)), key=lambda i: (-lengths[i], i))
    for i in order:
        first = next((b for b, room in enumerate(free) if lengths[i] <= room), len(free))
        assert where[i] == first
        if first == len(free):
            free.append(budget)
        free[first] -= lengths[i]
    # First fit leaves at most one bin half full or less (a second one's items would have fit in the first).
    assert sum(load <= budget / 2 for load in loads) <= 1


def test_pack_bins_fills_multimodal_mix(seed):
    """On a multimodal length mix (300..3000 tokens) into 16k bins FFD fills every bin but the last >= 90%."""
    rng = random.Random(seed)
    lengths = [rng.randint(300, 3000) for _ in range(400)]
    bins = pack_bins(lengths, 16384)
    loads = sorted((sum(lengths[i] for i in b) for b in bins), reverse=True)
    assert min(loads[:-1]) >= 0.9 * 16384
