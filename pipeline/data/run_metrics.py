"""The run's quality and score sums: one type from a model row to the run record.

The writer adds each output sample (``RunMetrics.add``) and sends the part's sums as manifest
columns (``as_columns``, the ``MANIFEST_COLUMNS`` of ``pipeline/data/rows.py``); the driver
merges the manifests' sums (``from_columns``, ``merge``); the envelope turns the run's sums into
the means of its summary and run record (``summary``). Sums travel, not means, so that parts
and shards add up in any order.

A new metric is one field here (with its ``add`` and ``summary`` lines); every stop on the way
takes it from ``fields``.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, fields

PSNR_OF_IDENTICAL = 100.0  # dB counted for identical images in the run's mean PSNR


@dataclass
class RunMetrics:
    psnr_sum: float = 0.0  # translate: output vs input
    ssim_sum: float = 0.0
    metric_count: int = 0  # samples with PSNR and SSIM
    clip_score_sum: float = 0.0
    directional_sum: float = 0.0
    score_count: int = 0  # samples with a CLIP score
    directional_count: int = 0  # … with a directional CLIP (it needs the input)

    def add(self, batch: dict, i: int) -> None:
        """Output row ``i`` of a model batch (a SAMPLE row): what it measured; NaN is not measured."""
        psnr, ssim = float(batch["psnr"][i]), float(batch["ssim"][i])
        if not math.isnan(ssim):  # translate: psnr is inf where output == input
            self.psnr_sum += psnr if math.isfinite(psnr) else PSNR_OF_IDENTICAL
            self.ssim_sum += ssim
            self.metric_count += 1
        clip, directional = float(batch["clip_score"][i]), float(batch["directional"][i])
        if not math.isnan(clip):
            self.clip_score_sum += clip
            self.score_count += 1
        if not math.isnan(directional):
            self.directional_sum += directional
            self.directional_count += 1

    def merge(self, other: RunMetrics) -> None:
        for f in fields(self):
            setattr(self, f.name, getattr(self, f.name) + getattr(other, f.name))

    def as_columns(self) -> dict:
        """The sums as manifest columns, by field name."""
        return asdict(self)

    @classmethod
    def from_columns(cls, batch: dict, i: int) -> RunMetrics:
        """Manifest row ``i``'s sums."""
        return cls(**{f.name: batch[f.name][i].item() for f in fields(cls)})

    def summary(self) -> dict:
        """The run summary's means (and ``scored``), each present only when something was measured."""
        s = {}
        if self.metric_count:
            s["mean_psnr"] = round(self.psnr_sum / self.metric_count, 3)
            s["mean_ssim"] = round(self.ssim_sum / self.metric_count, 4)
        if self.score_count:
            s["scored"] = self.score_count
            s["mean_clip_score"] = round(self.clip_score_sum / self.score_count, 4)
        if self.directional_count:
            s["mean_directional"] = round(self.directional_sum / self.directional_count, 4)
        return s


# manifest column → (numpy dtype, default), in the form of ``rows.COLUMNS``
METRIC_COLUMNS: dict[str, tuple[str, object]] = {
    f.name: ("float64", 0.0) if f.type == "float" else ("int64", 0) for f in fields(RunMetrics)
}
