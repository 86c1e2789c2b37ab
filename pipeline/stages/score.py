"""The score job's model stage (actor pool): output (and input) pixels → rows of CLIP scores.

The rows come from ``read_pairs`` (pipeline/stages/read.py) and ``decode_pairs``
(pipeline/stages/images.py); the scores are the ``Scorer``'s (pipeline/metrics/scorer.py, which has
the formulas), the numbers translate's ``score.inline`` gives.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

from pipeline.config import ClipConfig, ModelConfig, ScoreConfig
from pipeline.data.rows import RowBuffer, RowKind
from pipeline.stages.base import ModelStage, load_scorer


@dataclass
class Pairs:
    """What ``prepare`` hands the device: the sample rows and their stacked uint8 images."""

    idx: np.ndarray
    outputs: torch.Tensor | None  # (n, H, W, 3) uint8, pinned when a GPU waits for it
    inputs: torch.Tensor | None


class ScoreStage(ModelStage):
    """Output (and input) pixels → SAMPLE rows carrying ``clip_score`` and ``directional`` and no
    pixels: the writer stages them as ``scores/<shard>.parquet`` rows and writes no image."""

    concurrent_batches = 2

    def __init__(self, clip: ClipConfig, score: ScoreConfig, source: ModelConfig, target: ModelConfig,
                 directional: bool = True, dtype: str = "auto", compile: str = "off"):
        super().__init__()  # dtype, compile: model_stage gives them to every stage; CLIP runs float32, eager
        self.directional = directional
        self.scorer = load_scorer(clip, score, source, target, directional=directional)
        self.ready()

    def _host(self, arrays) -> torch.Tensor:
        t = torch.from_numpy(np.stack(arrays))
        return t.pin_memory() if self.scorer.device.type == "cuda" else t  # the copy in compute is asynchronous

    def prepare(self, batch: dict) -> Pairs:
        idx = self.samples(batch)
        if not len(idx):
            return Pairs(idx, None, None)
        inputs = self._host(batch["input_pixels"][idx]) if self.directional else None
        return Pairs(idx, self._host(batch["pixels"][idx]), inputs)

    def compute(self, work: Pairs) -> tuple[np.ndarray, np.ndarray] | None:
        if work.outputs is None:
            return None
        return self.scorer.score(work.outputs, work.inputs)

    def emit(self, batch: dict, work: Pairs, result) -> dict:
        rows = RowBuffer()
        self.pass_rejects(rows, batch)
        if result is None:
            return rows.batch()
        idx = work.idx
        rows.extend({"shard": batch["shard"][idx], "key": batch["key"][idx], "index": batch["index"][idx],
                     "clip_score": result[0], "directional": result[1]}, kind=RowKind.SAMPLE)
        return rows.batch()
