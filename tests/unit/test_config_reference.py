"""docs/config.md is what pipeline/tools/config_reference.py generates from pipeline/config.py: it cannot drift."""

from __future__ import annotations

from pathlib import Path

import pytest

from pipeline.config import JobConfig
from pipeline.tools.config_reference import field_comments, reference

pytestmark = pytest.mark.unit
ROOT = Path(__file__).resolve().parents[2]


def test_the_page_is_the_generated_reference():
    assert (ROOT / "docs" / "config.md").read_text() == reference(), (
        "docs/config.md is stale: run `python -m pipeline.tools.config_reference > docs/config.md`")


def test_every_key_is_listed_with_its_default_and_a_note():
    text = reference()
    for section, info in JobConfig.model_fields.items():
        for key in info.annotation.model_fields:
            if hasattr(info.annotation.model_fields[key].annotation, "model_fields"):
                continue  # a nested section (hspace.train): its keys are listed one by one
            row = next((line for line in text.splitlines() if line.startswith(f"| `{section}.{key}` |")), None)
            assert row is not None, f"{section}.{key}"
            assert not row.rstrip().endswith("|  |"), f"{section}.{key} has no note: comment it in pipeline/config.py"
    assert "| `sampler.method` | `dpm` \\| `ddim` | `dpm` |" in text
    assert "| `hspace.train.lr` |" in text


def test_comments_are_read_from_above_and_beside_a_field():
    from pipeline.config import EvalConfig

    notes = field_comments(EvalConfig)
    assert notes["reference_size"].startswith("the reference images resized") and "null: as stored" in notes["reference_size"]
    assert notes["kid_subsets"] == "cleanfid/fid.py kernel_distance(num_subsets=100)"
