"""The reader's accounting rule: every member of every input tar ends up in exactly one of the
sample's image, a carried metadata member, or a REJECT row naming it (no Ray)."""

from __future__ import annotations

import re

import pytest
from shard_builders import png, raw_tar, rgb_image, truncated

from pipeline.config import InputConfig
from pipeline.data.ledger import ShardLedger
from pipeline.data.outputs import OutputStore
from pipeline.data.rows import RowKind
from pipeline.errors import ConfigError
from pipeline.stages.read import read_shard

PNG = png(rgb_image(0, 8))
JPG_BYTES = b"\xff\xd8jpeg-ish"  # never decoded here


def read(tmp_path, data: bytes, name: str = "s", **kw) -> list[dict]:
    path = tmp_path / f"{name}.tar"
    path.write_bytes(data)
    ledger = ShardLedger(OutputStore(str(tmp_path / "out"), {}), "r")
    rows = read_shard({"name": name, "uri": str(path)}, {}, ledger, **kw)
    assert [int(r["index"]) for r in rows] == list(range(len(rows)))  # every row counted once
    return rows


def table(rows) -> list[tuple[str, str, str]]:
    """(kind, key, reason) per row; SAMPLE rows show their carried extensions as the reason."""
    out = []
    for r in rows:
        if int(r["kind"]) == RowKind.SAMPLE:
            out.append(("SAMPLE", str(r["key"]), ",".join(r["member_names"])))
        else:
            out.append(("REJECT", str(r["key"]), str(r["error"])))
    return out


def test_a_member_without_an_extension_is_recorded(tmp_path):
    rows = read(tmp_path, raw_tar([("k.png", PNG), ("k", b"x"), ("abc", b"y")]))
    assert table(rows) == [
        ("REJECT", "k", "dropped member 'k': no extension"),
        ("SAMPLE", "k", ""),
        ("REJECT", "abc", "dropped member 'abc': no extension"),  # belongs to no sample: its own key
    ]
    assert [str(r["member"]) for r in rows] == ["k", "", "abc"]


def test_a_symlink_or_directory_member_is_recorded_with_its_type(tmp_path):
    rows = read(tmp_path, raw_tar([("k.png", PNG), ("k.json", "/etc/passwd"), ("k2.png", "k.png"), ("sub", None)]))
    assert table(rows) == [
        ("REJECT", "k", "dropped member 'k.json': symbolic link to '/etc/passwd', not a regular file"),
        ("SAMPLE", "k", ""),
        ("REJECT", "k2", "dropped member 'k2.png': symbolic link to 'k.png', not a regular file"),
        ("REJECT", "sub", "dropped member 'sub': directory, not a regular file"),
    ]
    assert [str(r["member"]) for r in rows] == ["k.json", "", "k2.png", "sub"]


def test_a_repeated_member_name_keeps_the_first(tmp_path):
    rows = read(tmp_path, raw_tar([("k.png", PNG), ("k.json", b"first"), ("k.json", b"second"), ("k.PNG", b"z")]))
    assert table(rows) == [
        ("REJECT", "k", "dropped member 'k.json': duplicate member: extension 'json' was already read from "
                        "'k.json', which is kept"),
        ("REJECT", "k", "dropped member 'k.PNG': duplicate member: extension 'png' was already read from "
                        "'k.png', which is kept"),
        ("SAMPLE", "k", "json"),
    ]
    assert bytes(rows[2]["member_data"][0]) == b"first" and bytes(rows[2]["image"]) == PNG


def test_two_image_members_use_the_first_in_order_and_record_the_other(tmp_path):
    rows = read(tmp_path, raw_tar([("k.png", PNG), ("k.jpg", JPG_BYTES), ("k.txt", b"t")]))
    assert table(rows) == [
        ("REJECT", "k", "dropped member 'k.png': second image member; the sample uses 'k.jpg'"),
        ("SAMPLE", "k", "txt"),
    ]
    assert bytes(rows[1]["image"]) == JPG_BYTES


def test_a_truncated_tar_names_the_key_being_read(tmp_path):
    from shard_builders import good_samples, tar_bytes

    data = truncated(tar_bytes(good_samples(1, 4)), keep_samples=2)
    rows = read(tmp_path, data)
    assert [r[:2] for r in table(rows)] == [("SAMPLE", "s01-000"), ("SAMPLE", "s01-001"), ("REJECT", "s01-002")]
    assert table(rows)[2][2] == ("corrupt or truncated tar after key 's01-001', while reading member "
                                 "'s01-002.cls' of key 's01-002': ReadError: unexpected end of data")


def test_a_tar_cut_inside_a_later_member_rejects_that_sample_naming_what_it_had(tmp_path):
    full = raw_tar([("a.png", PNG), ("b.png", PNG), ("b.json", b"x" * 3000)])
    import io
    import tarfile

    with tarfile.open(fileobj=io.BytesIO(full)) as t:
        cut = t.getmembers()[2].offset_data + 100
    rows = read(tmp_path, full[:cut])
    assert table(rows) == [
        ("SAMPLE", "a", ""),
        ("REJECT", "b", "corrupt or truncated tar after key 'a', while reading member 'b.json' of key 'b' "
                        "(has 'b.png'): ReadError: unexpected end of data"),
    ]
    assert str(rows[1]["member"]) == "b.json"  # the member being read when the tar broke


def test_a_tar_cut_inside_a_header_is_damage_not_a_quiet_end(tmp_path):
    full = raw_tar([("a.png", PNG), ("b.png", PNG)])
    import io
    import tarfile

    with tarfile.open(fileobj=io.BytesIO(full)) as t:
        cut = t.getmembers()[1].offset + 100  # inside b.png's header (after its pax header)
    rows = read(tmp_path, full[:cut])
    assert [r[:2] for r in table(rows)] == [("SAMPLE", "a"), ("REJECT", "")]
    assert table(rows)[1][2].startswith("corrupt or truncated tar after key 'a': ReadError: ")


@pytest.mark.parametrize("name,why", [
    ("../../evil.png", "unsafe key '../../evil': path traversal"),
    ("/etc/x.png", "unsafe key '/etc/x': absolute path"),
    ("a/../b.png", "unsafe key 'a/../b': path traversal"),
    ("./../k.png", "unsafe key './../k': path traversal"),  # ./k.png itself is safe (tar -cf x.tar .)
    ("a/./b.png", "unsafe key 'a/./b': empty or '.' path part"),
    ("k/.png", "unsafe key 'k/': empty or '.' path part"),
    (".png", "unsafe key '': empty"),
    ("a\\b.png", "unsafe key 'a\\\\b': backslash"),
    ("k\x01.png", "unsafe key 'k\\x01': control character"),
    ("k\n.png", "unsafe key 'k\\n': control character"),
    ("x" * 256 + ".png", f"unsafe key '{'x' * 256}': path part longer than 255 bytes"),
    ("__meta__.png", "reserved key '__meta__': keys starting with '__' are reserved"),
])
def test_unsafe_keys_reject_the_sample(tmp_path, name, why):
    rows = read(tmp_path, raw_tar([(name, PNG), ("ok.png", PNG)]))
    key = name[: -len(".png")]  # the raw key: the line joins to its input by it, and is never a path
    assert table(rows) == [("REJECT", key, f"{why} (has {name!r})"), ("SAMPLE", "ok", "")]
    assert str(rows[0]["member"]) == ""  # the whole sample is at fault, not one member


def test_safe_nested_keys_are_kept(tmp_path):
    rows = read(tmp_path, raw_tar([("dir/sub/k.png", PNG), ("dir/sub/k.json", b"{}"), ("é" * 127 + ".png", PNG)]))
    assert table(rows) == [("SAMPLE", "dir/sub/k", "json"), ("SAMPLE", "é" * 127, "")]


def test_members_outside_carry_are_dropped_and_recorded(tmp_path):
    rows = read(tmp_path, raw_tar([("k.png", PNG), ("k.json", b"{}"), ("k.pkl", b"evil"), ("k.pyd", b"x"),
                                   ("k.seg.json", b"{}")]))
    assert table(rows) == [
        ("REJECT", "k", "dropped member 'k.pkl': extension 'pkl' not in input.carry (json, txt, cls)"),
        ("REJECT", "k", "dropped member 'k.pyd': extension 'pyd' not in input.carry (json, txt, cls)"),
        ("REJECT", "k", "dropped member 'k.seg.json': extension 'seg.json' not in input.carry (json, txt, cls)"),
        ("SAMPLE", "k", "json"),
    ]


def test_carry_config_changes_what_is_carried(tmp_path):
    data = raw_tar([("k.png", PNG), ("k.json", b"{}"), ("k.txt", b"t"), ("k.npy", b"n")])
    carry = InputConfig(carry=["json", "npy"]).carry
    rows = read(tmp_path, data, carry=carry)
    assert table(rows) == [("REJECT", "k", "dropped member 'k.txt': extension 'txt' not in input.carry (json, npy)"),
                           ("SAMPLE", "k", "json,npy")]
    assert InputConfig().carry == ["json", "txt", "cls"]


@pytest.mark.parametrize("carry,message", [
    (["JSON"], "must be lowercase ('json')"),
    ([".json"], "is not an extension"),
    (["png"], "cannot be carried"),
    (["latentshift.json"], "cannot be carried"),
    (["json", "json"], "listed twice"),
    ("json", "valid list"),
])
def test_carry_config_errors_are_clear(carry, message):
    from pipeline.config import validate

    with pytest.raises(ConfigError, match=re.escape(message)) as exc:
        validate({"input": {"carry": carry}})
    assert str(exc.value).startswith("config error: input.carry")


def test_an_empty_image_member_says_so(tmp_path):
    rows = read(tmp_path, raw_tar([("k.png", b""), ("k.json", b"{}")]))
    assert table(rows) == [("REJECT", "k", "empty image member 'k.png' (has 'k.png', 'k.json')")]
    assert str(rows[0]["member"]) == "k.png"


def test_whole_sample_rejects_name_their_members(tmp_path):
    rows = read(tmp_path, raw_tar([("a.txt", b"t"), ("a.json", b"{}"), ("b.png", PNG), ("b.png", PNG),
                                   ("c.png", PNG), ("b.png", PNG)]))
    assert table(rows) == [
        ("REJECT", "a", "no image member (has 'a.txt', 'a.json')"),
        ("REJECT", "b", "dropped member 'b.png': duplicate member: extension 'png' was already read from 'b.png', "
                        "which is kept"),
        ("SAMPLE", "b", ""),
        ("SAMPLE", "c", ""),
        ("REJECT", "b", "duplicate key in shard, first occurrence kept (has 'b.png')"),
    ]


# ---- the rule, over a mixed corpus ---------------------------------------------------------

def mixed_corpus() -> list[tuple[str, bytes | str | None]]:
    return [
        ("good.png", PNG), ("good.json", b"{}"), ("good.txt", b"t"), ("good.cls", b"1"),
        ("noext", b"x"), ("good2.png", PNG), ("good2", b"x"),
        ("link.png", "good.png"), ("link.json", b"{}"),
        ("dup.png", PNG), ("dup.png", PNG), ("dup.txt", b"a"), ("dup.txt", b"b"),
        ("two.png", PNG), ("two.jpg", JPG_BYTES), ("two.webp", b"w"),
        ("../../evil.png", PNG), ("../../evil.json", b"{}"), ("/abs/x.png", PNG),
        ("pick.png", PNG), ("pick.pkl", b"p"), ("pick.pyd", b"d"),
        ("empty.png", b""), ("empty.txt", b"t"),
        ("meta.json", b"{}"),
        ("dir", None), ("dir/in.png", PNG),
        ("good.png", PNG),  # the key again, later: a duplicate sample
        ("last.png", PNG), ("last.json", b"x" * 3000),  # cut inside last.json below
    ]


def corpus_tar() -> tuple[bytes, list[str]]:
    import io
    import tarfile

    members = mixed_corpus()
    full = raw_tar(members)
    with tarfile.open(fileobj=io.BytesIO(full)) as t:
        cut = t.getmembers()[-1].offset_data + 100
    return full[:cut], [name for name, _ in members]


def accounted_names(rows, names: list[str]) -> list[str]:
    """Every member name the rows account for: the image and carried members of SAMPLE rows, and
    the names REJECT reasons give (the dropped member, or a rejected sample's members)."""
    out = []
    for r in rows:
        key, reason = str(r["key"]), str(r["error"])
        if int(r["kind"]) == RowKind.SAMPLE:  # the image: the first image extension the input has
            image = next(f"{key}.{e}" for e in ("jpg", "jpeg", "png", "webp") if f"{key}.{e}" in names)
            out += [image] + [f"{key}.{e}" for e in r["member_names"]]
        elif m := re.match(r"dropped member '([^']*)': ", reason):
            out.append(m.group(1))
        else:
            if m := re.search(r"while reading member '([^']*)'", reason):
                out.append(m.group(1))
            if m := re.search(r"\(has ([^)]*)\)", reason):
                out += re.findall(r"'([^']*)'", m.group(1))
    return out


def test_every_member_is_accounted_for_exactly_once(tmp_path):
    data, names = corpus_tar()
    rows = read(tmp_path, data)
    assert sorted(accounted_names(rows, names)) == sorted(names)
    assert [str(r["key"]) for r in rows if int(r["kind"]) == RowKind.SAMPLE] == [
        "good", "good2", "dup", "two", "pick", "dir/in"]


def test_two_reads_of_a_corrupt_input_give_identical_rows(tmp_path):
    data, _ = corpus_tar()
    (tmp_path / "a").mkdir()
    (tmp_path / "b").mkdir()
    first, second = read(tmp_path / "a", data), read(tmp_path / "b", data)

    def plain(rows):
        return [{c: (list(map(bytes, v)) if c == "member_data" else list(v) if c == "member_names"
                     else bytes(v) if c == "image" else v.item() if hasattr(v, "item") else v)
                 for c, v in r.items()} for r in rows]

    assert plain(first) == plain(second)
    assert not any(re.search(r"0x[0-9a-f]{6,}", str(r["error"])) for r in first)


def test_a_leading_dot_slash_is_a_safe_key_and_dot_dot_after_it_is_not():
    from pipeline.data.shards import key_problem

    assert key_problem("./k") == "" and key_problem("./dir/k") == ""
    assert "path traversal" in key_problem("./../k") and "unsafe" in key_problem("./")
    assert "absolute path" in key_problem(".//k")


def test_gif_tiff_and_bmp_members_are_images_and_give_their_first_frame(tmp_path):
    """Issue 11 (policy): these were "no image member"; now they are read, first frame only."""
    import io

    import numpy as np
    from PIL import Image

    from pipeline.data.images import decode_image

    red, blue = Image.new("RGB", (8, 8), (255, 0, 0)), Image.new("RGB", (8, 8), (0, 0, 255))

    def encoded(fmt: str, **kw) -> bytes:
        buf = io.BytesIO()
        red.save(buf, format=fmt, **kw)
        return buf.getvalue()

    rows = read(tmp_path, raw_tar([("a.gif", encoded("GIF", save_all=True, append_images=[blue])),
                                   ("b.tiff", encoded("TIFF", save_all=True, append_images=[blue])),
                                   ("c.tif", encoded("TIFF")), ("d.bmp", encoded("BMP"))]))
    assert table(rows) == [("SAMPLE", k, "") for k in "abcd"]
    assert [str(r["image_name"]) for r in rows] == ["a.gif", "b.tiff", "c.tif", "d.bmp"]
    for r in rows:
        assert np.all(decode_image(bytes(r["image"]), 8) == [255, 0, 0])  # the first frame: red
