"""The zero-shot search stage (actor pool): images → best-of-N CycleDiffusion translations, ranked by
directional CLIP on the device (pipeline/diffusion/search.py has the protocol).

One output sample per input: the winner at the image member, runners-up (``search.top_k``) as
``top2.<fmt>`` …; its row carries the winner's candidate number and seed and every kept candidate's
score, which the writer turns into provenance (the winning settings) and ``scores/<shard>.parquet``.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

from pipeline.config import (
    ClipConfig,
    ModelConfig,
    OutputConfig,
    SamplerConfig,
    ScoreConfig,
    SearchConfig,
)
from pipeline.data.rows import RowBuffer
from pipeline.diffusion.search import SearchGrid, SearchResult, zero_shot_search
from pipeline.metrics.clip import clip_score, directional_similarity
from pipeline.stages.base import ModelStage, Work, load_model, load_scorer
from pipeline.stages.tensors import to_model_range, to_uint8_tensor

CLIP_CHUNK = 64  # images per CLIP forward: a walk may decode hundreds of candidates at once


def search_grid(search: SearchConfig, sampler: SamplerConfig) -> SearchGrid:
    return SearchGrid(trials=search.trials, encoder_scales=tuple(search.encoder_scales), skips=tuple(search.skips),
                      decoder_scales=tuple(search.decoder_scales), steps=sampler.steps)


@dataclass
class Found:
    """What ``compute`` hands back, on the host."""

    images: np.ndarray  # (n, k, H, W, 3) uint8
    result: SearchResult  # its tensors on the host
    clip_score: np.ndarray  # (n,) the winner's CLIP score against the target text


class SearchStage(ModelStage):
    """Images → the search's best candidates per input (one model, source and target conditions)."""

    concurrent_batches = 2  # prepare → compute → emit: one batch's host work overlaps the next one's walks

    def __init__(self, source: ModelConfig, target: ModelConfig, sampler: SamplerConfig, search: SearchConfig,
                 score: ScoreConfig, clip: ClipConfig, output: OutputConfig,
                 dtype: str = "auto", compile: str = "off"):
        super().__init__(output)
        self.source_cfg, self.target_cfg, self.sampler, self.search = source, target, sampler, search
        # never compiled: walks differ in rows (skips, trial chunks, inputs stopped early), which would recompile
        self.source = load_model(source, dtype, sampler.clip_x0, key="source")
        self.search_grid = search_grid(search, sampler)
        self.full_grid = self.source.schedule.grid(sampler.steps)  # each winner's walk starts at full[skip]
        # CLIP and the texts' features (the official ranking: plain prompts, clean_clip.py:24-27), loaded once
        self.scorer = load_scorer(clip, score, source, target, self.source.device)
        self.ready()

    def prepare(self, batch: dict) -> Work:
        return self.image_work(batch, self.sampler.seed, self.source)

    def features(self, images: torch.Tensor) -> torch.Tensor:
        with torch.no_grad():
            return torch.cat([self.scorer.clip.image_features(c) for c in images.split(CLIP_CHUNK)])

    def compute(self, work: Work) -> Found | None:
        if work.pixels is None:
            return None
        images = to_model_range(work.pixels.to(self.source.device))
        source_features = self.features(images)

        def directional(candidates: torch.Tensor, rows: torch.Tensor) -> torch.Tensor:
            # cycle-diffusion clean_clip.py:33-39: cos of the normalised image and text directions
            return directional_similarity(source_features[rows], self.features(candidates), self.scorer.source,
                                          self.scorer.target)

        s = self.search
        result = zero_shot_search(self.source, images, work.seeds, directional, self.search_grid, eta=self.sampler.eta,
                                  source_condition=self.source_cfg.condition,
                                  target_condition=self.target_cfg.condition, top_k=s.top_k,
                                  stop_score=s.stop_score, trials_per_walk=s.trials_per_walk, clamp=s.clamp)
        # the winner's CLIP score on the image ranked (raw with search.clamp false, as the official
        # evaluation scores before its clamp, evaluation/translate_text.py:65-77)
        winners = clip_score(self.features(result.images[:, 0]), self.scorer.target)
        n, k = result.scores.shape
        out = to_uint8_tensor(result.images.flatten(0, 1)).view(n, k, *work.pixels.shape[1:])
        host = SearchResult(images=torch.empty(0), scores=result.scores.cpu(), candidates=result.candidates.cpu(),
                            seeds=result.seeds.cpu(), tried=result.tried.cpu())
        return Found(images=out.cpu().numpy(), result=host, clip_score=winners.cpu().numpy())

    def emit(self, batch: dict, work: Work, found: Found | None) -> dict:
        rows = RowBuffer()
        self.pass_rejects(rows, batch)
        if found is None:
            return rows.batch()
        idx, r = work.idx, found.result
        kept = [np.flatnonzero(c >= 0) for c in r.candidates.numpy()]  # an early stop may leave fewer than top_k
        scores = r.scores.numpy().astype(np.float32)
        per_row = {"shard": batch["shard"][idx], "key": batch["key"][idx], "index": batch["index"][idx],
                   "member_names": batch["member_names"][idx], "member_data": batch["member_data"][idx],
                   "pixels": list(found.images[:, 0]), "seed": r.seeds[:, 0].numpy(),
                   "extra_names": [[f"top{j + 1}" for j in range(1, len(v))] for v in kept],
                   "extra_pixels": [found.images[i, v[1:]] for i, v in enumerate(kept)],
                   "candidate": r.candidates[:, 0].numpy(), "ranked": [r.candidates[i, v].numpy() for i, v in enumerate(kept)],
                   "ranked_scores": [scores[i, v] for i, v in enumerate(kept)], "directional": scores[:, 0],
                   "clip_score": found.clip_score}
        # each output's timesteps: its winning walk's (provenance ``timesteps``; ``chosen.t0`` is the first)
        walks = [self.search_grid.walk(self.full_grid, self.search_grid.skip_of(int(c))) for c in r.candidates[:, 0]]
        per_row["timesteps"] = [np.asarray(w, dtype=np.int32) for w in walks]
        rows.extend(per_row)
        return rows.batch()
