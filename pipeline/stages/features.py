"""The eval job's model stage (actor pool): image pixels, as stored → rows carrying their feature vectors.

Per batch: the sample rows' uint8 images grouped by shape (a run's outputs share one; a reference set of
photographs may not), each group stacked on the host, pinned, copied to the device as uint8, resized there
to 299² exactly as clean-fid's clean mode resizes (pipeline/metrics/fid.py ``DeviceResize``) and run
through the feature network (pipeline/metrics/feature_net.py) in float32. The host does no per-image work
beyond the stack; the features come back as float32 numpy.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

from pipeline.config import EvalConfig
from pipeline.data.rows import RowBuffer, RowKind
from pipeline.metrics.fid import DeviceResize
from pipeline.stages.base import ModelStage, loading

FEATURE_FIX = "write it again with `latentshift fid-export PATH` (or name another file in eval.inception)"


@dataclass
class Groups:
    """The batch's sample rows by image shape: (row indices into the batch, their stacked uint8 images)."""

    groups: list[tuple[np.ndarray, torch.Tensor]]


def load_feature_network(eval: EvalConfig, device) -> torch.nn.Module:
    """``eval.inception``, fetched once into the model cache when remote, on ``device``."""
    from pipeline.data.model_cache import materialize_file
    from pipeline.metrics import feature_net

    with loading("eval.inception", eval.inception, FEATURE_FIX):
        path = materialize_file(eval.inception, eval.inception_storage_options)
        return feature_net.load(path, device=device, shown=eval.inception)


class FeatureStage(ModelStage):
    """uint8 pixels → SAMPLE rows with ``features`` and no pixels (the writer stages them as
    ``_eval/features/<shard>.parquet``)."""

    concurrent_batches = 2

    def __init__(self, eval: EvalConfig, dtype: str = "auto", compile: str = "off"):
        super().__init__()  # dtype, compile: features are measurements, float32 and eager on every device
        self.device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
        self.net = load_feature_network(eval, self.device)
        self.resize = DeviceResize()
        self.ready()

    def prepare(self, batch: dict) -> Groups:
        idx = self.samples(batch)
        by_shape: dict[tuple, list[int]] = {}
        for i in idx:
            by_shape.setdefault(batch["pixels"][i].shape, []).append(int(i))
        groups = []
        for rows in by_shape.values():
            stacked = torch.from_numpy(np.stack(batch["pixels"][rows]))
            groups.append((np.asarray(rows), stacked.pin_memory() if self.device.type == "cuda" else stacked))
        return Groups(groups)

    @torch.no_grad()
    def compute(self, work: Groups) -> list[np.ndarray]:
        out = []
        for _, images in work.groups:
            pieces = self.fitting(lambda lo, hi, images=images: self._features(images[lo:hi]), len(images))
            out.append(np.concatenate(pieces))
        return out

    def _features(self, images: torch.Tensor) -> np.ndarray:
        x = self.resize(images.to(self.device, non_blocking=True))
        return self.net(x).float().cpu().numpy()

    def emit(self, batch: dict, work: Groups, result: list[np.ndarray]) -> dict:
        rows = RowBuffer()
        self.pass_rejects(rows, batch)
        for (idx, _), feats in zip(work.groups, result, strict=True):
            rows.extend({"shard": batch["shard"][idx], "key": batch["key"][idx], "index": batch["index"][idx],
                         "features": list(feats), "psnr": batch["psnr"][idx], "ssim": batch["ssim"][idx]},
                        kind=RowKind.SAMPLE)
        return rows.batch()
