"""docs/new-job.md's example job is real: its code blocks are the modules, run end to end.

Every block of the page opened as ```python title="<path>"``` is the whole file at <path>. The test
imports them under the names the page gives them, registers the job for this test only, and runs it
through ``run_job`` on a local Ray and a tiny random model, so the page fails here when the contract
it teaches (ModelStage's prepare → compute → emit, rows, Job, the registry) moves.
"""

from __future__ import annotations

import io
import json
import re
import sys
import types
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
import pytest
from PIL import Image
from shard_builders import good_samples, odd_samples

from pipeline.config import validate
from pipeline.data.shards import iter_tar_samples, write_samples
from pipeline.errors import ConfigError

ROOT = Path(__file__).resolve().parents[2]
DOC = ROOT / "docs" / "new-job.md"
FILE_BLOCK = re.compile(r'```python title="([^"]+)"\n(.*?)\n```', re.S)
STAGE, JOB = "pipeline/stages/reconstruct.py", "pipeline/jobs/reconstruct.py"


def doc_files() -> dict[str, str]:
    """path → source of every file the page shows whole."""
    return dict(FILE_BLOCK.findall(DOC.read_text()))


@pytest.fixture
def reconstruct(monkeypatch):
    """The page's modules imported as pipeline.stages.reconstruct and pipeline.jobs.reconstruct, and its
    job in the registry, for this test only."""
    import ray.cloudpickle

    from pipeline import jobs

    files = doc_files()
    modules = {}
    for path in (STAGE, JOB):
        name = path.removesuffix(".py").replace("/", ".")
        module = types.ModuleType(name)
        module.__file__ = str(ROOT / path)
        monkeypatch.setitem(sys.modules, name, module)  # before exec: dataclasses look their module up
        exec(compile(files[path], path, "exec"), module.__dict__)  # noqa: S102 - the page's own code
        modules[path] = module
    # the stage module exists in this process only: Ray's workers get its classes by value
    ray.cloudpickle.register_pickle_by_value(modules[STAGE])
    monkeypatch.setitem(jobs.JOBS, "reconstruct", modules[JOB].JOB)
    yield modules[JOB].JOB
    ray.cloudpickle.unregister_pickle_by_value(modules[STAGE])


def tar_members(data: bytes) -> dict[str, dict[str, bytes]]:
    return {s.key: s.members for s in iter_tar_samples(io.BytesIO(data))}


def pixels(png: bytes) -> np.ndarray:
    return np.asarray(Image.open(io.BytesIO(png)).convert("RGB")).astype(np.float64)


def test_the_page_shows_every_file_of_the_example_whole():
    files = doc_files()
    assert set(files) == {STAGE, JOB, "jobs/reconstruct.py"}
    entry = files["jobs/reconstruct.py"]
    compile(entry, "jobs/reconstruct.py", "exec")
    assert 'run_registered("reconstruct", sys.argv[1:])' in entry
    sibling = (ROOT / "jobs" / "encode.py").read_text()  # the same lines as its siblings, but for the name
    assert entry == sibling.replace("encode", "reconstruct").rstrip("\n")


def test_the_example_job_runs_end_to_end(ray_cluster, tmp_path, pixel_model, reconstruct):
    from pipeline.jobs import run_job

    (tmp_path / "in").mkdir()
    samples = good_samples(7, 5)
    corrupt = [s for s in odd_samples() if s[0] == "bad-corrupt"]
    with open(tmp_path / "in" / "shard-000.tar", "wb") as f:
        write_samples(f, samples + corrupt)
    out = tmp_path / "out"
    cfg = validate({"input": {"uri": str(tmp_path / "in")}, "output": {"uri": str(out)},
                    "source": {"model": str(pixel_model)}, "sampler": {"steps": 10, "strength": 0.5},
                    "image": {"size": 16}, "runtime": {"batch_size": 4}})

    s = run_job(cfg, "reconstruct")
    assert (s["job"], s["shards_done"], s["images"], s["rejected"], s["latent_samples"]) == ("reconstruct", 1, 5, 1, 5)
    assert np.isfinite(s["mean_psnr"]) and s["outputs"] == ["images", "latents", "rejects"]

    written = tar_members((out / "images" / "shard-000.tar").read_bytes())
    assert list(written) == [key for key, _ in samples]  # input order, rejects left out
    for key, members in samples:
        got = written[key]
        assert {ext: got[ext] for ext in ("json", "txt", "cls")} == {ext: members[ext] for ext in ("json", "txt", "cls")}
        prov = json.loads(got["latentshift.json"])
        assert prov["job"] == "reconstruct" and prov["method"] == "ddim" and prov["source_model"] == str(pixel_model)
        assert prov["timesteps"][0] == 400 and prov["source_shard"] == "shard-000"  # last 5 of 900, 800 … 0
        mse = ((pixels(members["png"]) - pixels(got["png"])) ** 2).mean()  # the PSNR recorded is of the bytes written
        assert prov["psnr"] == pytest.approx(10 * np.log10(255**2 / mse), rel=1e-4)

    latents = pq.read_table(out / "latents" / "shard-000.parquet")
    assert latents.num_rows == 5 and set(latents["method"].to_pylist()) == {"ddim"}  # x_start only: DDIM has no noise
    rejects = [json.loads(line) for line in (out / "_rejects" / "shard-000.jsonl").read_text().splitlines()]
    assert [r["key"] for r in rejects] == ["bad-corrupt"]
    record = json.loads((out / "_ledger" / "shard-000.json").read_text())
    assert record["run_id"] == s["run_id"]

    assert run_job(cfg, "reconstruct")["shards_done"] == 0  # committed: a re-run is a no-op


def test_the_example_check_refuses_before_ray(tmp_path, pixel_model, reconstruct):
    from pipeline.jobs import run_job

    cfg = validate({"input": {"uri": str(tmp_path / "in")}, "output": {"uri": str(tmp_path / "out")},
                    "source": {"model": str(pixel_model), "condition": "a cat"}})
    with pytest.raises(ConfigError, match="unconditional"):
        run_job(cfg, "reconstruct")  # check runs before the (missing) input is listed
