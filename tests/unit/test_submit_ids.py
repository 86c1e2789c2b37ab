"""Submission ids: equal submissions in one window collide on purpose; failed ones can be retried."""

from __future__ import annotations

import calendar

import pytest

from pipeline.cluster.submit import SubmissionRefused, next_free_id, submission_id

T = calendar.timegm((2026, 11, 22, 10, 17, 0))  # 10:17 UTC


def test_same_job_and_config_in_one_window_share_an_id():
    a = submission_id("translate", "0123456789abcdef", T, 60)
    assert a == "latentshift-translate-0123456789ab-20261122-1000"
    assert submission_id("translate", "0123456789abcdef", T + 40 * 60, 60) == a  # 10:57, same hour
    assert submission_id("translate", "0123456789abcdef", T + 45 * 60, 60) != a  # 11:02, next window
    assert submission_id("encode", "0123456789abcdef", T, 60) != a
    assert submission_id("translate", "fedcba9876543210", T, 60) != a
    assert submission_id("translate", "0123456789abcdef", T, 15) == "latentshift-translate-0123456789ab-20261122-1015"


@pytest.mark.parametrize("status", ["PENDING", "RUNNING", "SUCCEEDED"])
def test_a_live_or_finished_twin_refuses(status):
    with pytest.raises(SubmissionRefused, match=f"already submitted as base \\({status}\\).*--rerun"):
        next_free_id("base", {"base": status})


def test_failed_or_stopped_twins_are_retried_under_the_next_suffix():
    assert next_free_id("base", {}) == "base"
    assert next_free_id("base", {"base": "FAILED"}) == "base-retry1"
    assert next_free_id("base", {"base": "FAILED", "base-retry1": "STOPPED"}) == "base-retry2"
    with pytest.raises(SubmissionRefused, match="base-retry1 \\(RUNNING\\)"):
        next_free_id("base", {"base": "FAILED", "base-retry1": "RUNNING"})
