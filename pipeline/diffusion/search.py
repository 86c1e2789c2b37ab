"""The official zero-shot protocol of CycleDiffusion, batched: best-of-N candidates per input.

Per input the official code (cycle-diffusion model/gan_wrapper/stable_diffusion_stochastic_text_wrapper.py,
cited as wrapper.py:LINE) DPM-encodes the image once per (trial, encoder scale, skip) (wrapper.py:189-204),
decodes every encoding at every decoder scale (wrapper.py:146-165), scores each decoded image with
directional CLIP against the input (wrapper.py:219-224) and keeps the argmax (wrapper.py:228-235):
15 trials × 6 skips × 6 decoder scales = 540 candidates per image with the published grid.

Here one *walk* carries many candidates at once: for one (encoder scale, skip), the inputs of a batch ×
a chunk of trials are encoded together, and every decoder scale decodes alongside the encoder, so each
step is one network call for the encoder and all decoders (``dpm.encode_walk``). An encoding is never
repeated per decoder scale, nothing waits on the host, and only the best ``top_k`` images per input are
kept on the device between walks. Candidates are numbered trial-major, then encoder scale, skip and
decoder scale, as the official loops nest (and ``pipeline.data.rows.search_choice`` decodes).

A candidate's encoder noise is keyed by (input seed, trial, encoder scale, skip), never by its batch,
so the search finds the same winner however inputs and trials are batched, and any candidate can be
reproduced alone with ``dpm_translate(..., seeds=[candidate_seed(...)])``.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass

import torch

from pipeline.diffusion.dpm import encode_walk, same_condition
from pipeline.diffusion.noise import sample_seed


@dataclass(frozen=True)
class SearchGrid:
    """The candidates tried per input: trials × encoder scales × skips × decoder scales."""

    trials: int
    encoder_scales: tuple[float, ...]
    skips: tuple[int, ...]  # grid steps left out at the noisy end: the walk starts at grid[skip]
    decoder_scales: tuple[float, ...]
    # the full grid: official custom_steps = 99 (translate_text2img256_stable_diffusion_stochastic_1.cfg:7),
    # which on SD's scheduler (leading spacing, steps_offset 1) is 981, 971, …, 1, the vendored LDM
    # make_ddim_timesteps grid (ldm/modules/diffusionmodules/util.py:46-57: range(0, 1000, 10)[:99] + 1)
    steps: int

    def __post_init__(self):
        if any(not 0 <= s < self.steps for s in self.skips):
            raise ValueError(f"skips {list(self.skips)} must lie in 0..{self.steps - 1} (sampler.steps = {self.steps})")

    def __len__(self) -> int:
        return self.trials * len(self.encoder_scales) * len(self.skips) * len(self.decoder_scales)

    def index(self, trial: int, enc: int, skip: int, dec: int) -> int:
        """The candidate number of (trial, encoder-scale index, skip index, decoder-scale index)."""
        return ((trial * len(self.encoder_scales) + enc) * len(self.skips) + skip) * len(self.decoder_scales) + dec

    def skip_of(self, candidate: int) -> int:
        """The skip (grid steps left out) of candidate number ``candidate`` (inverse of ``index``)."""
        rest = candidate // len(self.decoder_scales)
        return self.skips[rest % len(self.skips)]

    def walk(self, full: Sequence[int], skip: int) -> list[int]:
        """The timesteps a candidate of ``skip`` walks: the full grid without its first ``skip`` entries
        (the official ``time_range[-refine_steps:]`` with refine_steps = steps − skip, ldm ddim.py:470-473)."""
        return list(full[skip:])

    def as_dict(self) -> dict:
        return {"trials": self.trials, "encoder_scales": list(self.encoder_scales), "skips": list(self.skips),
                "decoder_scales": list(self.decoder_scales), "steps": self.steps}


def candidate_seed(input_seed: int, trial: int, encoder_scale: float, skip: int) -> int:
    """The encoder noise seed of one (trial, encoder scale, skip) of an input: fresh noise for each, as
    the official loop draws (wrapper.py:189-204), keyed so that no batch changes it."""
    return sample_seed(input_seed, f"search/trial={trial}/encoder_scale={float(encoder_scale)}/skip={skip}")


@dataclass
class SearchResult:
    """Per input: the ``top_k`` best candidates, best first."""

    images: torch.Tensor  # (B, k, 3, H, W) in [-1, 1]
    scores: torch.Tensor  # (B, k) the ranking score (directional CLIP), −inf where fewer were tried
    candidates: torch.Tensor  # (B, k) int64 candidate numbers (SearchGrid.index), −1 where none
    seeds: torch.Tensor  # (B, k) int64 encoder seeds of those candidates
    tried: torch.Tensor  # (B,) candidates scored per input (fewer than len(grid) after an early stop)


def zero_shot_search(den, x0: torch.Tensor, input_seeds: Sequence[int], score: Callable, grid: SearchGrid, *,
                     eta: float, source_condition, target_condition, top_k: int = 1, stop_score: float | None = None,
                     trials_per_walk: int = 0, clamp: bool = True) -> SearchResult:
    """Best-of-N zero-shot translation of images ``x0`` (B, 3, H, W) in [-1, 1] with one model ``den``.

    ``score(images, rows)`` ranks decoded images (N, 3, H, W) whose inputs are ``rows`` (N,) (indices
    into the batch); higher is better (the official ranking: directional CLIP). ``clamp``: the images
    are clamped to [-1, 1] as they will be written, else the decoder's raw output, as the official
    ranking sees them (wrapper.py:216-221); the kept images are then raw too (clamped when written).
    ``stop_score``: after each chunk of ``trials_per_walk`` trials (0: all at once), inputs whose best
    reached it stop.
    """
    dev = den.device
    x0m = den.to_model_space(x0)
    full = den.schedule.grid(grid.steps)
    reconstruct = same_condition(source_condition, target_condition)
    decoders = [(target_condition, w, reconstruct) for w in grid.decoder_scales]
    n_dec = len(grid.decoder_scales)
    best = _TopK(x0.shape[0], top_k, tuple(x0.shape[1:]), dev)
    chunk = trials_per_walk or grid.trials
    for first in range(0, grid.trials, chunk):
        trials = list(range(first, min(first + chunk, grid.trials)))
        rows = best.alive(stop_score)
        if not len(rows):
            break
        n, t = len(rows), len(trials)
        walk_rows = rows.repeat_interleave(t)  # the walk's rows: input-major, then trial
        for e, w_enc in enumerate(grid.encoder_scales):
            for s, skip in enumerate(grid.skips):
                seeds = [candidate_seed(input_seeds[i], tr, w_enc, skip) for i in rows.tolist() for tr in trials]
                _, ys = encode_walk(den, x0m[walk_rows], grid.steps, eta, None, source_condition, w_enc, seeds,
                                    decoders=decoders, keep_noise=False, timesteps=grid.walk(full, skip))
                # (n, T·D) per input: trial-major then decoder scale, as the candidate numbers run
                images = _pixels(den, torch.stack(ys, 1).flatten(0, 1), clamp).view(n, t * n_dec, *x0.shape[1:])
                scores = score(images.flatten(0, 1), rows.repeat_interleave(t * n_dec)).float().view(n, t * n_dec)
                numbers = torch.tensor([grid.index(tr, e, s, d) for tr in trials for d in range(n_dec)], device=dev)
                seed_t = torch.tensor(seeds, dtype=torch.int64, device=dev).view(n, t).repeat_interleave(n_dec, 1)
                best.add(rows, images, scores, numbers.expand(n, -1), seed_t)
    return best.result()


@torch.no_grad()
def _pixels(den, x: torch.Tensor, clamp: bool) -> torch.Tensor:
    """Decoded candidates: clamped to [-1, 1] as written, or the decoder's raw output."""
    return den.to_pixels(x) if clamp else den.to_pixels_with_grad(x)


class _TopK:
    """The best ``k`` candidates per input so far, kept on the device between walks."""

    def __init__(self, b: int, k: int, image_shape: tuple, device):
        self.images = torch.zeros((b, k, *image_shape), device=device)
        self.scores = torch.full((b, k), -torch.inf, device=device)
        self.candidates = torch.full((b, k), -1, dtype=torch.int64, device=device)
        self.seeds = torch.zeros((b, k), dtype=torch.int64, device=device)
        self.tried = torch.zeros(b, dtype=torch.int64, device=device)

    def alive(self, stop_score: float | None) -> torch.Tensor:
        """Inputs still searching: all, or those whose best is below ``stop_score``."""
        if stop_score is None:
            return torch.arange(self.scores.shape[0], device=self.scores.device)
        return torch.nonzero(self.scores[:, 0] < stop_score).flatten()

    def add(self, rows: torch.Tensor, images: torch.Tensor, scores: torch.Tensor, candidates: torch.Tensor,
            seeds: torch.Tensor) -> None:
        """Merge M new candidates of each input in ``rows`` (n,): images (n, M, …), the rest (n, M)."""
        b, k = self.scores.shape
        m = scores.shape[1]
        scores = torch.nan_to_num(scores, nan=-torch.inf)  # an unscorable image (e.g. the input back) ranks last
        self.tried[rows] += m
        pool_scores = torch.cat([self.scores, self.scores.new_full((b, m), -torch.inf)], 1)
        pool_scores[rows, k:] = scores
        pool_cand = torch.cat([self.candidates, self.candidates.new_full((b, m), -1)], 1)
        pool_cand[rows, k:] = candidates
        pool_seeds = torch.cat([self.seeds, self.seeds.new_zeros((b, m))], 1)
        pool_seeds[rows, k:] = seeds
        pool_images = torch.cat([self.images, self.images.new_zeros((b, m, *self.images.shape[2:]))], 1)
        pool_images[rows, k:] = images
        top = _top_k_stable(pool_scores, pool_cand, k)
        self.scores, self.candidates, self.seeds = pool_scores.gather(1, top), pool_cand.gather(1, top), pool_seeds.gather(1, top)
        self.images = pool_images[torch.arange(b, device=top.device)[:, None], top]

    def result(self) -> SearchResult:
        return SearchResult(self.images, self.scores, self.candidates, self.seeds, self.tried)


def _top_k_stable(scores: torch.Tensor, candidates: torch.Tensor, k: int) -> torch.Tensor:
    """Column indices of the k best per row: higher score first, ties to the lower candidate number (the
    first in the official list, which ``torch.argmax`` keeps, wrapper.py:228); empty slots last."""
    order = torch.argsort(candidates.masked_fill(candidates < 0, torch.iinfo(torch.int64).max), dim=1, stable=True)
    by_score = torch.argsort(scores.gather(1, order), dim=1, descending=True, stable=True)
    return order.gather(1, by_score)[:, :k]
