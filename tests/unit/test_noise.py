"""Per-sample noise on the device: Threefry-2x32-20 against Random123's known answers, batch
independence, and the statistics of a standard normal."""

from __future__ import annotations

import math

import pytest
import torch
from scipy import stats

from pipeline.diffusion.noise import NoiseSource, per_sample_noise, threefry2x32

pytestmark = pytest.mark.unit

# Random123 kat_vectors, threefry2x32 with 20 rounds: (key, counter) → output words (the same
# three vectors JAX's prng tests check).
KAT = [
    ((0x00000000, 0x00000000), (0x00000000, 0x00000000), (0x6B200159, 0x99BA4EFE)),
    ((0xFFFFFFFF, 0xFFFFFFFF), (0xFFFFFFFF, 0xFFFFFFFF), (0x1CB996FC, 0xBB002BE7)),
    ((0x13198A2E, 0x03707344), (0x243F6A88, 0x85A308D3), (0xC4923A9C, 0x483DF7A0)),
]


@pytest.mark.parametrize(("key", "counter", "expected"), KAT)
def test_threefry_matches_random123_known_answers(key, counter, expected):
    words = [torch.tensor([w], dtype=torch.int64) for w in (*key, *counter)]
    out = threefry2x32((words[0], words[1]), (words[2], words[3]))
    assert [int(w) for w in out] == list(expected)


def test_a_samples_noise_is_its_own_alone_in_any_batch_or_order():
    shape = (3, 5, 7)  # odd element count: the last Box–Muller pair is cut
    alone = per_sample_noise([42], shape, index=3)[0]
    batch = per_sample_noise([7, 42, 9], shape, index=3)
    reordered = per_sample_noise([9, 7, 42], shape, index=3)
    assert torch.equal(batch[1], alone) and torch.equal(reordered[2], alone)
    assert torch.equal(batch[0], reordered[1])


def test_maps_streams_and_seeds_are_independent():
    src = NoiseSource([1, 2], stream="")
    maps = [src.draw(i, (4096,)) for i in range(3)]
    refine = NoiseSource([1, 2], stream="refine").draw(0, (4096,))
    pairs = [(maps[0][0], maps[1][0]), (maps[0][0], maps[0][1]), (maps[0][0], refine[0]), (maps[1][1], maps[2][1])]
    for a, b in pairs:
        r = torch.corrcoef(torch.stack([a, b]))[0, 1].item()
        assert abs(r) < 4 / math.sqrt(4096), r  # 4 standard errors of a correlation of independent draws
    # element j of a map depends on j alone, not on the shape asked for: a smaller draw is a prefix
    assert torch.equal(src.draw(0, (10,)), src.draw(0, (4096,))[:, :10])


def test_noise_is_standard_normal():
    z = per_sample_noise(list(range(16)), (8192,)).flatten().double()
    assert abs(z.mean().item()) < 4 / math.sqrt(z.numel())
    assert z.var().item() == pytest.approx(1.0, abs=0.01)
    assert stats.kstest(z.numpy(), "norm").pvalue > 1e-3
    # both halves of the Box–Muller pair (even: r cos θ, odd: r sin θ) are normal on their own
    assert stats.kstest(z[1::2].numpy(), "norm").pvalue > 1e-3
    assert stats.kstest(z[0::2].numpy(), "norm").pvalue > 1e-3


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_cpu_and_cuda_draw_the_same_noise_to_float_rounding():
    cpu = per_sample_noise([3, 4], (4, 32, 32))
    gpu = per_sample_noise([3, 4], (4, 32, 32), device="cuda").cpu()
    assert (cpu - gpu).abs().max().item() < 1e-5
