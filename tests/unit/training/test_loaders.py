"""The workers' loaders: whole-batch fetches, sharded as DistributedSampler shards."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from torch.utils.data import DistributedSampler

from pipeline.data.prepared import SplitArrays
from pipeline.training.worker import ShardBatches, make_loaders


def _split(size: int) -> SplitArrays:
    images = np.arange(size, dtype=np.uint8).repeat(28 * 28).reshape(size, 28, 28)
    # Image i is filled with i mod 256, its label is that mod 10: a batch shows its pairing.
    return SplitArrays(images=images, labels=(np.arange(size) % 256 % 10).astype(np.uint8))


@pytest.mark.parametrize(("size", "world"), [(1000, 1), (1000, 2), (1001, 2), (999, 4)])
def test_shards_partition_the_split_as_distributed_sampler_does(size: int, world: int) -> None:
    samplers = [ShardBatches(size, 64, rank, world, shuffle=True, seed=7) for rank in range(world)]
    for sampler in samplers:
        sampler.set_epoch(3)
    shards = [torch.cat(list(sampler)).tolist() for sampler in samplers]
    reference = [
        list(DistributedSampler(range(size), world, rank, shuffle=False)) for rank in range(world)
    ]
    assert [len(s) for s in shards] == [len(r) for r in reference]  # same padding
    assert sorted(set().union(*shards)) == list(range(size))  # every sample, each rank once
    for sampler, shard in zip(samplers, shards, strict=True):
        assert len(sampler) == -(-len(shard) // 64)


def test_order_changes_with_the_epoch_and_repeats_with_it() -> None:
    sampler = ShardBatches(500, 50, 0, 1, shuffle=True, seed=42)
    first = torch.cat(list(sampler))
    assert torch.equal(first, torch.cat(list(sampler)))
    sampler.set_epoch(1)
    assert not torch.equal(first, torch.cat(list(sampler)))
    assert torch.equal(torch.cat(list(ShardBatches(10, 4, 0, 1, False, 0))), torch.arange(10))


def test_loaders_yield_whole_batches_of_the_right_samples() -> None:
    train, val = _split(300), _split(120)
    train_loader, val_loader = make_loaders(train, val, 32, rank=1, world_size=2, seed=0)
    batches = list(train_loader)
    assert [len(labels) for _, labels in batches] == [32, 32, 32, 32, 22]
    for images, labels in batches:
        assert images.dtype == torch.uint8
        assert images.shape[1:] == (28, 28)
        assert labels.dtype == torch.int64
        assert torch.equal(images[:, 0, 0].long() % 10, labels)
    (images, labels), *rest = list(val_loader)
    assert not rest  # half of the validation split, one batch
    assert len(labels) == 60
