"""Shards (listing, tolerant reading, packing) and latent Parquet files."""

from __future__ import annotations

import io

import numpy as np
import pyarrow.parquet as pq
import pytest
import torch
from PIL import Image

from pipeline.data.latents import latent_records, read_latents, write_latents
from pipeline.data.shards import (
    iter_tar_samples,
    list_shards,
    pack_folder,
    split_member_name,
    write_samples,
)
from pipeline.errors import StorageError


def make_tar(path, keys):
    with open(path, "wb") as f:
        write_samples(f, [(k, {"txt": k.encode()}) for k in keys])


def test_list_shards_prefix_brace_and_list(tmp_path):
    for i in range(3):
        make_tar(tmp_path / f"part-{i:03d}.tar", [f"k{i}"])
    (tmp_path / "notes.md").write_text("ignored")
    assert [s.name for s in list_shards(str(tmp_path))] == ["part-000", "part-001", "part-002"]
    assert [s.name for s in list_shards(str(tmp_path / "part-{000..001}.tar"))] == ["part-000", "part-001"]
    assert [s.name for s in list_shards([str(tmp_path / "part-002.tar"), f"file://{tmp_path}/part-000.tar"])] == [
        "part-000", "part-002"]
    with pytest.raises(StorageError, match="not found"):
        list_shards(str(tmp_path / "missing-{1..2}.tar"))


def test_same_basename_in_two_folders_is_an_error(tmp_path):
    (tmp_path / "a").mkdir()
    (tmp_path / "b").mkdir()
    make_tar(tmp_path / "a" / "x.tar", ["1"])
    make_tar(tmp_path / "b" / "x.tar", ["2"])
    with pytest.raises(StorageError, match="share the basename 'x'"):
        list_shards(str(tmp_path))


def test_member_names_split_at_the_first_dot_of_the_basename():
    assert split_member_name("dir/abc.def.png") == ("dir/abc", "def.png")
    assert split_member_name("abc.PNG") == ("abc", "png")


def test_reading_a_damaged_tar_keeps_what_precedes_the_damage(tmp_path):
    buf = io.BytesIO()
    write_samples(buf, [(f"k{i}", {"txt": b"x" * 600}) for i in range(3)])
    import tarfile

    with tarfile.open(fileobj=io.BytesIO(buf.getvalue())) as t:
        third = t.getmembers()[2]
    data = buf.getvalue()[: third.offset_data + 100]  # inside the third sample's data
    items = list(iter_tar_samples(io.BytesIO(data)))
    assert [i.key for i in items if not isinstance(i, Exception)] == ["k0", "k1"]
    assert isinstance(items[-1], Exception)


def test_pack_folder_stable_keys_and_sidecars(tmp_path):
    src = tmp_path / "src"
    (src / "sub").mkdir(parents=True)
    for name in ("b", "a", "sub/c"):
        Image.new("RGB", (4, 4)).save(src / f"{name}.png")
    (src / "a.json").write_text('{"x": 1}')
    (src / "readme.md").write_text("no")
    first = pack_folder(str(src), str(tmp_path / "out"), per_shard=2)
    again = pack_folder(str(src), str(tmp_path / "out2"), per_shard=2)
    assert len(first) == 2
    samples = [s for p in first for s in iter_tar_samples(open(p, "rb"))]
    assert [s.key for s in samples] == ["a", "b", "sub_c"]
    assert samples[0].members["json"] == b'{"x": 1}'
    assert [open(p, "rb").read() for p in first] == [open(p, "rb").read() for p in again]  # deterministic


def test_latent_parquet_round_trip(tmp_path):
    import fsspec

    from pipeline.diffusion import Latent

    g = torch.Generator().manual_seed(0)
    z = Latent(torch.randn(2, 3, 4, 4, generator=g), torch.randn(2, 3, 3, 4, 4, generator=g), [30, 20, 10],
               eta=0.5, seeds=[7, 8])
    rows, shape = z.to_rows(np.float16)
    records = []
    for b, key in enumerate(["x", "y"]):
        records += latent_records(key, "s0", rows[b].reshape(shape), model="m", method="dpm",
                                  timesteps=z.timesteps, eta=0.5, cond="a cat", seed=z.seeds[b])
    fs = fsspec.filesystem("file")
    write_latents(records, fs, str(tmp_path / "s0.parquet"))
    table = pq.read_table(tmp_path / "s0.parquet")
    assert table.num_rows == 8 and table.schema.field("latent").type == "binary"
    r = table.slice(5, 1).to_pylist()[0]  # key y, step 1 = the first noise
    assert r["key"] == "y" and r["step"] == 1 and r["cond"] == '"a cat"'
    x = np.frombuffer(r["latent"], r["dtype"]).reshape(r["shape"])
    assert np.allclose(x, z.noise[1, 0].numpy(), atol=1e-2)
    back = dict(read_latents(str(tmp_path)))  # numpy, no torch: data/ never builds diffusion objects
    assert back["y"].seed == 8 and back["y"].timesteps == [30, 20, 10] and back["y"].cond == "a cat"
    assert isinstance(back["x"].maps, np.ndarray) and back["x"].maps.dtype == np.float16
    assert back["x"].noise.shape == (3, 3, 4, 4) and back["x"].x_start.shape == (3, 4, 4)
    assert np.allclose(back["x"].noise, z.noise[0].numpy(), atol=1e-2)
    again = Latent.from_rows(back["x"].maps.reshape(1, -1), back["x"].maps.shape, back["x"].timesteps, eta=0.5)
    assert torch.allclose(again.x_start, z.x_start[:1], atol=1e-2)
