"""The zero-shot search (best-of-N, official CycleDiffusion protocol) against the official loop written
out candidate by candidate with the public API: same winner, same image, fewer network calls."""

from __future__ import annotations

import itertools

import pytest
import torch

from pipeline.data.rows import search_choice
from pipeline.diffusion import dpm_decode, dpm_encode, load_denoiser
from pipeline.diffusion.search import SearchGrid, candidate_seed, zero_shot_search

pytestmark = pytest.mark.unit

GRID = SearchGrid(trials=2, encoder_scales=(1.0, 1.5), skips=(2, 5), decoder_scales=(1.0, 3.0), steps=8)
CONDS = dict(source_condition="a cat", target_condition="a dog")
ETA = 0.1


def images(n: int, size: int = 16, seed: int = 0) -> torch.Tensor:
    return torch.rand(n, 3, size, size, generator=torch.Generator().manual_seed(seed)) * 2 - 1


def redness(images: torch.Tensor, rows: torch.Tensor) -> torch.Tensor:
    """An offline ranking score: how much redder than the input each candidate is."""
    red = images[:, 0] - images[:, 1:].mean(1)
    return (red - REF[rows, 0] + REF[rows, 1:].mean(1)).mean((1, 2))


REF = images(3, seed=7)


class CountCalls:
    def __init__(self, unet):
        self.calls, self.rows = 0, 0
        unet.register_forward_pre_hook(self.hook)

    def hook(self, module, args):
        self.calls += 1
        self.rows += args[0].shape[0]


def official_loop(den, x0, seeds):
    """cycle-diffusion stable_diffusion_stochastic_text_wrapper.py:186-235, one image and candidate at a
    time: encode per (trial, encoder scale, skip), decode per decoder scale, score, argmax."""
    best = []
    for i in range(x0.shape[0]):
        found = []
        for trial, (e, w_enc), (s, skip) in itertools.product(range(GRID.trials), enumerate(GRID.encoder_scales),
                                                              enumerate(GRID.skips)):
            z = dpm_encode(den, x0[i : i + 1], steps=GRID.steps, eta=ETA, strength=(GRID.steps - skip) / GRID.steps,
                           condition=CONDS["source_condition"], guidance_scale=w_enc,
                           seeds=[candidate_seed(seeds[i], trial, w_enc, skip)])
            assert len(z.timesteps) == GRID.steps - skip
            for d, w_dec in enumerate(GRID.decoder_scales):
                x = dpm_decode(den, z, condition=CONDS["target_condition"], guidance_scale=w_dec)
                found.append((redness(x, torch.tensor([i])).item(), GRID.index(trial, e, s, d), x[0]))
        assert [n for _, n, _ in found] == list(range(len(GRID)))  # the official nesting is our numbering
        scores = torch.tensor([v for v, _, _ in found])
        order = sorted(range(len(found)), key=lambda j: (-scores[j].item(), j))
        best.append([found[j] for j in order])
    return best


def test_search_finds_the_official_loops_winners_with_one_call_per_step(sd_model):
    den = load_denoiser(str(sd_model))
    x0, seeds = REF, [101, 202, 303]
    counter = CountCalls(den.unet)
    result = zero_shot_search(den, x0, seeds, redness, GRID, eta=ETA, top_k=3, **CONDS)
    calls, rows = counter.calls, counter.rows
    expected = official_loop(den, x0, seeds)
    for i in range(3):
        for rank in range(3):
            score, number, image = expected[i][rank]
            assert int(result.candidates[i, rank]) == number
            assert result.scores[i, rank].item() == pytest.approx(score, abs=1e-5)
            assert (result.images[i, rank] - image).abs().max().item() < 1e-4
    assert result.tried.tolist() == [len(GRID)] * 3

    # one call per grid step per (encoder scale, skip): the encoder and both decoders ride together
    steps = sum(GRID.steps - s for s in GRID.skips)
    assert calls == len(GRID.encoder_scales) * steps
    # rows: 3 inputs × 2 trials; encoder 1 branch at scale 1, 2 at 1.5; decoders 1 + 2 branches
    per_walk_row = {1.0: 1 + 1 + 2, 1.5: 2 + 1 + 2}
    assert rows == sum(6 * per_walk_row[w] * steps for w in GRID.encoder_scales)
    # the official loop encodes once per (trial, scale, skip) too, but one image and one walk at a time
    counter.calls = counter.rows = 0
    official_loop(den, x0[:1], seeds[:1])
    assert counter.calls == GRID.trials * len(GRID.encoder_scales) * steps * (1 + len(GRID.decoder_scales))


def test_the_winner_does_not_depend_on_the_batch_or_the_trial_chunks(sd_model):
    den = load_denoiser(str(sd_model))
    together = zero_shot_search(den, REF, [1, 2, 3], redness, GRID, eta=ETA, top_k=2, **CONDS)
    alone = zero_shot_search(den, REF[1:2], [2], lambda x, r: redness(x, r + 1), GRID, eta=ETA, top_k=2,
                             trials_per_walk=1, **CONDS)
    assert together.candidates[1].tolist() == alone.candidates[0].tolist()
    assert (together.images[1] - alone.images[0]).abs().max().item() < 1e-4
    assert together.seeds[1].tolist() == alone.seeds[0].tolist()


def test_early_stop_ends_an_inputs_search_after_its_chunk(sd_model):
    den = load_denoiser(str(sd_model))
    per_trial = len(GRID) // GRID.trials
    stopped = zero_shot_search(den, REF[:2], [1, 2], redness, GRID, eta=ETA, trials_per_walk=1, stop_score=-1e9,
                               **CONDS)
    assert stopped.tried.tolist() == [per_trial, per_trial]
    assert (stopped.candidates[:, 0] < per_trial).all()  # the winner comes from the first trial
    full = zero_shot_search(den, REF[:2], [1, 2], redness, GRID, eta=ETA, trials_per_walk=1, stop_score=1e9, **CONDS)
    assert full.tried.tolist() == [len(GRID)] * 2


def test_candidate_numbers_decode_to_the_settings_the_provenance_records():
    grid = GRID.as_dict()
    for trial, (e, we), (s, skip), (d, wd) in itertools.product(range(GRID.trials), enumerate(GRID.encoder_scales),
                                                                enumerate(GRID.skips), enumerate(GRID.decoder_scales)):
        choice = search_choice(grid, GRID.index(trial, e, s, d))
        assert choice == {"trial": trial, "encoder_scale": we, "skip": skip, "strength": (8 - skip) / 8,
                          "decoder_scale": wd}


def test_a_recorded_strength_reproduces_its_walk_on_the_official_99_step_grid():
    """On custom_steps 99 (translate_text2img256_stable_diffusion_stochastic_1.cfg:7) skip 40 keeps 59 steps;
    59/99 in float times 99 floors to 58. The recorded strength must give the walk's own length back,
    and the skip of a candidate number is the one its walk starts after."""
    from diffusers import DDIMScheduler

    from pipeline.diffusion.schedule import schedule_from_scheduler

    sd = schedule_from_scheduler(DDIMScheduler(beta_schedule="scaled_linear", beta_start=0.00085, beta_end=0.012,
                                               steps_offset=1, set_alpha_to_one=False))
    grid = SearchGrid(trials=1, encoder_scales=(1.0,), skips=(15, 20, 25, 30, 40, 50), decoder_scales=(1.0, 2.0),
                      steps=99)
    assert int(99 * (59 / 99)) == 58  # the float trap a plain (steps − skip)/steps falls into
    full = sd.grid(99)
    for s, skip in enumerate(grid.skips):
        number = grid.index(0, 0, s, 1)
        choice = search_choice(grid.as_dict(), number)
        assert grid.skip_of(number) == skip == choice["skip"]
        assert sd.grid(99, choice["strength"]) == grid.walk(full, skip) == full[skip:]
        assert choice["strength"] == pytest.approx((99 - skip) / 99, abs=1e-12)


def test_candidates_are_ranked_raw_or_clamped_as_search_clamp_says(sd_model):
    """search.clamp false scores the decoder's raw output, as the official ranking (wrapper.py:216-221:
    post_process to [0, 1], no clamp); true scores the image as written. The tiny VAE decodes out of range."""
    den = load_denoiser(str(sd_model))
    seen = {}

    def record(clamp):
        def score(images, rows):
            seen[clamp] = images.clone()
            return redness(images, rows)
        return score

    grid = SearchGrid(trials=1, encoder_scales=(1.0,), skips=(2,), decoder_scales=(1.0,), steps=8)
    raw = zero_shot_search(den, REF[:2], [1, 2], record(False), grid, eta=ETA, clamp=False, **CONDS)
    clamped = zero_shot_search(den, REF[:2], [1, 2], record(True), grid, eta=ETA, clamp=True, **CONDS)
    assert seen[False].abs().max() > 1 and seen[True].abs().max() <= 1
    assert torch.allclose(seen[False].clamp(-1, 1), seen[True], atol=1e-5)  # the same candidates, clamped or not
    assert torch.allclose(raw.images.clamp(-1, 1), clamped.images, atol=1e-5)


def test_a_skip_outside_the_grid_is_refused():
    with pytest.raises(ValueError, match="skips"):
        SearchGrid(trials=1, encoder_scales=(1.0,), skips=(8,), decoder_scales=(1.0,), steps=8)
