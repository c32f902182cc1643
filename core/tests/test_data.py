"""Tests for core.data: the three formats read back the same reference records, and every kind of bad record
is skipped and counted under its reason."""

from __future__ import annotations

import csv
import dataclasses
import io
import json
import logging
import random
import tarfile
from collections import Counter
from pathlib import Path

import pytest
from PIL import Image

from core.data import (
    BadRecords,
    DataQualityError,
    Record,
    RejectedRecord,
    fingerprint,
    iter_samples,
    label_sets,
    load_samples,
    parse_csv_row,
    parse_jsonl_line,
    parse_shard_sample,
    shard_records,
    splits_present,
)

RED, BLUE, CLEAR = (255, 0, 0, 255), (0, 0, 255, 255), (0, 255, 0, 0)

# The reference records every format encodes: (name, texts, labels, split, group or None for "= key", pixel).
EXPECTED = [
    ("red", ["a red square"], {"colour": "red"}, "train", "warm", (255, 0, 0)),
    ("blue", ["a blue square", "blue"], {"colour": "blue"}, "val", None, (0, 0, 255)),
    ("clear", ["transparent"], {}, None, None, (255, 255, 255)),  # alpha 0 is composited onto white
]


def png_bytes(rgba: tuple, size: tuple[int, int] = (4, 3)) -> bytes:
    """A solid RGBA PNG."""
    buffer = io.BytesIO()
    Image.new("RGBA", size, rgba).save(buffer, "PNG")
    return buffer.getvalue()


def jpeg_bytes(rgb: tuple) -> bytes:
    """A solid RGB JPEG."""
    buffer = io.BytesIO()
    Image.new("RGB", (8, 8), rgb).save(buffer, "JPEG", quality=95)
    return buffer.getvalue()


def noisy_png() -> bytes:
    """A PNG big enough that cutting it in half loses pixel data."""
    buffer = io.BytesIO()
    Image.frombytes("RGB", (64, 64), random.Random(0).randbytes(64 * 64 * 3)).save(buffer, "PNG")
    return buffer.getvalue()


def write_files(root: Path, files: dict[str, bytes]) -> None:
    for name, data in files.items():
        (root / name).parent.mkdir(parents=True, exist_ok=True)
        (root / name).write_bytes(data)


def write_folder(root: Path, extra_lines: list = (), extra_files: dict | None = None) -> Path:
    """The reference records as captions.jsonl (with messy whitespace to clean), plus extra raw lines."""
    lines = [
        {
            "image": "img/red.png",
            "text": "  a red square ",
            "labels": {"colour": "red"},
            "split": "train",
            "group": "warm",
        },
        {
            "image": "img/blue.png",
            "text": ["a blue square", " ", "blue"],
            "labels": {"colour": "blue"},
            "split": "VAL",
        },
        "",  # blank lines are not records
        {"image": "./img/clear.png", "text": "transparent"},
        *extra_lines,
    ]
    encoded = [
        line if isinstance(line, bytes) else (line if isinstance(line, str) else json.dumps(line)).encode()
        for line in lines
    ]
    write_files(
        root,
        {
            "img/red.png": png_bytes(RED),
            "img/blue.png": png_bytes(BLUE),
            "img/clear.png": png_bytes(CLEAR),
            "img/other.png": png_bytes(RED),
            **(extra_files or {}),
        },
    )
    (root / "captions.jsonl").write_bytes(b"\n".join(encoded) + b"\n")
    return root


def write_csv(root: Path, extra_rows: list[bytes] = (), extra_files: dict | None = None) -> Path:
    """The reference records as captions.csv, plus extra raw rows."""
    buffer = io.StringIO()
    writer = csv.writer(buffer, lineterminator="\n")
    writer.writerow(["image", "text", "split", "group", "label_colour"])
    writer.writerow(["img/red.png", " a red square ", "train", "warm", "red"])
    writer.writerow(["img/blue.png", "a blue square ||  || blue", "val", "", "blue"])
    writer.writerow(["img/clear.png", "transparent", "", "", ""])
    write_files(
        root,
        {
            "img/red.png": png_bytes(RED),
            "img/blue.png": png_bytes(BLUE),
            "img/clear.png": png_bytes(CLEAR),
            "img/other.png": png_bytes(RED),
            **(extra_files or {}),
        },
    )
    (root / "captions.csv").write_bytes(buffer.getvalue().encode() + b"".join(extra_rows))
    return root


def write_shard(path: Path, members: list[tuple[str, bytes]]) -> Path:
    """A tar shard with the given members, in order."""
    path.parent.mkdir(parents=True, exist_ok=True)
    with tarfile.open(path, "w") as tar:
        for name, data in members:
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))
    return path


GOOD_MEMBERS = [
    ("red.png", png_bytes(RED)),
    ("red.txt", b" a red square "),
    ("red.json", json.dumps({"labels": {"colour": "red"}, "split": "train", "group": "warm"}).encode()),
    ("blue.jpg", jpeg_bytes((0, 0, 255))),
    (
        "blue.json",
        json.dumps(
            {"caption": ["a blue square", "", "blue"], "labels": {"colour": "blue"}, "split": "val"}
        ).encode(),
    ),
    ("clear.png", png_bytes(CLEAR)),
    ("clear.txt", b"transparent"),
]


def write_shards(root: Path, extra_members: list = ()) -> Path:
    """The reference records over two shards (red+blue, clear), extra members appended to the second."""
    write_shard(root / "shard-000.tar", GOOD_MEMBERS[:5])
    write_shard(root / "shard-001.tar", GOOD_MEMBERS[5:] + list(extra_members))
    return root


FOLDER_KEYS = {"red": "img/red.png", "blue": "img/blue.png", "clear": "img/clear.png"}
SHARD_KEYS = {"red": "red", "blue": "blue", "clear": "clear"}
FORMATS = {  # format name -> (writer, reference name -> key)
    "folder": (write_folder, FOLDER_KEYS),
    "csv": (write_csv, FOLDER_KEYS),
    "webdataset": (write_shards, SHARD_KEYS),
}


def summary(sample) -> tuple:
    return sample.key, sample.texts, sample.labels, sample.split, sample.group


@pytest.mark.parametrize("fmt", FORMATS)
def test_formats_read_back_the_reference(tmp_path, fmt):
    writer, keys = FORMATS[fmt]
    samples = list(iter_samples(writer(tmp_path)))
    expected = [
        (keys[name], texts, labels, split, group or keys[name])
        for name, texts, labels, split, group, _ in EXPECTED
    ]
    assert [summary(s) for s in samples] == expected
    for sample, (*_, pixel) in zip(samples, EXPECTED):
        assert sample.image.mode == "RGB"
        assert max(abs(a - b) for a, b in zip(sample.image.getpixel((0, 0)), pixel)) <= 8  # JPEG tolerance


@pytest.mark.parametrize("fmt", FORMATS)
@pytest.mark.parametrize("split, names", [("train", ["red"]), ("val", ["blue"]), ("test", [])])
def test_split_filter(tmp_path, fmt, split, names):
    writer, keys = FORMATS[fmt]
    source = writer(tmp_path)
    assert [s.key for s in iter_samples(source, split=split)] == [keys[n] for n in names]
    assert splits_present(source) == {"train", "val"}


def check_bad(source: Path, reason: str, count: int = 1, good: int = 3, seen: int | None = None):
    """Reading `source` yields the reference samples and counts `count` records skipped for `reason`."""
    bad = BadRecords()
    samples = list(iter_samples(source, bad=bad))
    assert len(samples) == good
    assert bad.skipped == Counter({reason: count})
    assert bad.seen == (good + count if seen is None else seen)


@pytest.mark.parametrize(
    "reason, line, files",
    [
        ("missing_image", {"image": "img/nope.png", "text": "x"}, {}),
        ("missing_image", {"image": "img", "text": "a directory"}, {}),
        ("corrupt_image", {"image": "img/junk.png", "text": "x"}, {"img/junk.png": b"not an image at all"}),
        ("corrupt_image", {"image": "img/cut.png", "text": "x"}, {"img/cut.png": noisy_png()[:400]}),
        ("empty_caption", {"image": "img/other.png", "text": "   "}, {}),
        ("empty_caption", {"image": "img/other.png", "text": ["", " "]}, {}),
        ("empty_caption", {"image": "img/other.png"}, {}),
        ("bad_encoding", b'{"image": "img/other.png", "text": "caf\xe9"}', {}),
        ("bad_json", '{"image": "img/other.png", "text": ', {}),
        ("bad_json", '["img/other.png", "x"]', {}),
        ("unsafe_path", {"image": "../outside.png", "text": "x"}, {}),
        ("unsafe_path", {"image": "img/../../outside.png", "text": "x"}, {}),
        ("unsafe_path", {"image": "/etc/hostname", "text": "x"}, {}),
        ("bad_record", {"text": "no image"}, {}),
        ("bad_record", {"image": "img/nul\u0000.png", "text": "x"}, {}),
        ("bad_split", {"image": "img/other.png", "text": "x", "split": "training"}, {}),
        ("bad_labels", {"image": "img/other.png", "text": "x", "labels": "red"}, {}),
        ("bad_facets", {"image": "img/other.png", "text": "x", "facets": ["twitter"]}, {}),
        ("duplicate_key", {"image": "img/red.png", "text": "red again"}, {}),
    ],
)
def test_folder_bad_records(tmp_path, reason, line, files):
    (tmp_path / "outside.png").write_bytes(png_bytes(RED))
    check_bad(write_folder(tmp_path / "data", [line], files), reason)


FACETED = {"labels": {"colour": "red"}, "facets": {"vendor": "twitter"}}  # a facet beside a label


def write_faceted(root: Path, fmt: str) -> Path:
    """One record with FACETED's label and facet among the reference records (alone in the CSV)."""
    if fmt == "folder":
        return write_folder(root, [{"image": "img/other.png", "text": "x", **FACETED}])
    if fmt == "csv":
        write_files(root, {"img/other.png": png_bytes(RED)})
        (root / "captions.csv").write_text(
            "image,text,label_colour,facet_vendor\nimg/other.png,x,red,twitter\n"
        )
        return root
    return write_shards(
        root, [("other.png", png_bytes(RED)), ("other.json", json.dumps({"text": "x", **FACETED}).encode())]
    )


@pytest.mark.parametrize("fmt", FORMATS)
def test_facets_are_read_apart_from_labels(tmp_path, fmt):
    samples = list(iter_samples(write_faceted(tmp_path, fmt)))
    faceted = [(s.key, s.labels, s.facets) for s in samples if s.facets]
    key = "other" if fmt == "webdataset" else "img/other.png"
    assert faceted == [(key, {"colour": "red"}, {"vendor": "twitter"})]
    assert "vendor" not in label_sets(samples)


def test_one_record_parses_alike_as_a_jsonl_line_a_csv_row_and_a_shard_sample(tmp_path):
    root = tmp_path.resolve()
    write_files(root, {"red.png": png_bytes(RED)})
    fields = {"labels": {"colour": "red"}, "facets": {"vendor": "noto"}, "split": "train", "group": "warm"}
    line = json.dumps({"image": "red.png", "text": [" a red square ", "red"], **fields}).encode()
    row = {"image": "red.png", "text": " a red square || red", "split": "train", "group": "warm",
           "label_colour": "red", "facet_vendor": "noto"}
    member = {"__key__": "red", "__url__": "s.tar", "png": png_bytes(RED), "txt": b" a red square ",
              "json": json.dumps({"caption": "red", **fields}).encode()}
    shard = parse_shard_sample(member)
    expected = Record("red.png", root / "red.png", ("a red square", "red"), {"colour": "red"}, "train", "warm",
                      {"vendor": "noto"})
    assert parse_jsonl_line(line, root, "captions.jsonl:1") == expected
    assert parse_csv_row(row, root, "captions.csv:2") == expected
    assert dataclasses.replace(shard, key="red.png", image=root / "red.png") == expected
    assert shard.image == png_bytes(RED)  # undecoded
    assert shard.to_sample().image.getpixel((0, 0)) == expected.to_sample().image.getpixel((0, 0)) == RED[:3]
    assert parse_jsonl_line(line, root, "captions.jsonl:1", split="val") is None
    assert parse_shard_sample(member, split="val") is None


@pytest.mark.parametrize(
    "parse, reason, key, detail",
    [
        (lambda root: parse_jsonl_line(b'{"image": "red.png", "text": " "}', root, "c.jsonl:3"),
         "empty_caption", "red.png", ""),
        (lambda root: parse_csv_row({"image": "../red.png", "text": "x"}, root, "c.csv:4"),
         "unsafe_path", "c.csv:4", "../red.png"),
        (lambda root: parse_shard_sample({"__key__": "k", "__url__": "s.tar", "txt": b"x"}),
         "missing_image", "k", "s.tar"),
        (lambda root: Record("k", b"not an image", ("x",), {}, None, "k", {}).to_sample(),
         "corrupt_image", "k", "cannot"),
    ],
)
def test_a_rejection_carries_reason_key_and_detail(tmp_path, parse, reason, key, detail):
    with pytest.raises(RejectedRecord) as caught:
        parse(tmp_path.resolve())
    assert (caught.value.reason, caught.value.key) == (reason, key)
    assert caught.value.detail.startswith(detail)


def test_shard_records_are_numbered_by_their_place_among_the_shards_samples(tmp_path):
    shard = write_shard(tmp_path / "s.tar", [("a.txt", b"no image"), *GOOD_MEMBERS[5:]])
    bad = BadRecords()
    assert [(index, record.key) for index, record in shard_records(str(shard), None, bad)] == [(1, "clear")]
    assert (bad.seen, bad.skipped) == (2, Counter({"missing_image": 1}))


def test_folder_symlink_out_of_root_is_unsafe(tmp_path):
    (tmp_path / "outside.png").write_bytes(png_bytes(RED))
    root = write_folder(tmp_path / "data", [{"image": "img/link.png", "text": "x"}])
    (root / "img/link.png").symlink_to(tmp_path / "outside.png")
    check_bad(root, "unsafe_path")


@pytest.mark.parametrize(
    "reason, row, files",
    [
        ("missing_image", b"img/nope.png,x,,,\n", {}),
        ("corrupt_image", b"img/junk.png,x,,,\n", {"img/junk.png": b"junk"}),
        ("empty_caption", b"img/other.png,  ||  ,,,\n", {}),
        ("bad_encoding", b"img/other.png,caf\xe9,,,\n", {}),
        ("unsafe_path", b"../outside.png,x,,,\n", {}),
        ("bad_split", b"img/other.png,x,dev,,\n", {}),
    ],
)
def test_csv_bad_records(tmp_path, reason, row, files):
    check_bad(write_csv(tmp_path, [row], files), reason)


def test_csv_without_required_columns_fails_fast(tmp_path):
    (tmp_path / "captions.csv").write_text("path,caption\na.png,x\n")
    with pytest.raises(DataQualityError, match="image"):
        list(iter_samples(tmp_path))


@pytest.mark.parametrize(
    "reason, members",
    [
        ("missing_image", [("x.txt", b"a caption without an image")]),
        ("empty_caption", [("x.png", png_bytes(RED))]),
        ("empty_caption", [("x.png", png_bytes(RED)), ("x.txt", b"  ")]),
        ("corrupt_image", [("x.jpg", b"garbage"), ("x.txt", b"x")]),
        ("corrupt_image", [("x.png", noisy_png()[:400]), ("x.txt", b"x")]),
        ("bad_encoding", [("x.png", png_bytes(RED)), ("x.txt", b"caf\xe9")]),
        ("bad_json", [("x.png", png_bytes(RED)), ("x.json", b"{oops")]),
        ("bad_split", [("x.png", png_bytes(RED)), ("x.txt", b"x"), ("x.json", b'{"split": "dev"}')]),
        ("duplicate_key", [("red.png", png_bytes(RED)), ("red.txt", b"red in another shard")]),
    ],
)
def test_shard_bad_members(tmp_path, reason, members):
    check_bad(write_shards(tmp_path, members), reason)


@pytest.mark.parametrize("junk", [b"this is not a tar file" * 40, b""])
def test_unreadable_shard_among_good_ones(tmp_path, junk):
    root = write_shards(tmp_path)
    (root / "shard-000a.tar").write_bytes(junk)
    check_bad(root, "unreadable_shard")


def test_missing_shard_in_list(tmp_path):
    root = write_shards(tmp_path)
    source = [str(root / "shard-000.tar"), str(root / "gone.tar"), str(root / "shard-001.tar")]
    check_bad(source, "unreadable_shard")


def test_truncated_shard_keeps_the_complete_samples(tmp_path):
    root = write_shards(tmp_path)
    shard = root / "shard-001.tar"
    write_shard(shard, GOOD_MEMBERS[5:] + [("big.png", noisy_png()), ("big.txt", b"never read")])
    whole = shard.read_bytes()
    shard.write_bytes(whole[: whole.index(b"big.png") + 512 + 1000])  # cut inside big.png's data
    bad = BadRecords()
    assert [s.key for s in iter_samples(root, bad=bad)] == ["red", "blue", "clear"]
    assert bad.skipped == Counter({"unreadable_shard": 1})


@pytest.mark.parametrize(
    "as_source",
    [
        lambda root: root,
        lambda root: str(root / "shard-{000..001}.tar"),
        lambda root: [root / "shard-000.tar", str(root / "shard-001.tar")],
        lambda root: [str(root / "shard-{000..000}.tar"), root / "shard-001.tar"],
    ],
)
def test_shard_source_shapes(tmp_path, as_source):
    root = write_shards(tmp_path)
    assert [s.key for s in iter_samples(as_source(root))] == ["red", "blue", "clear"]


def test_csv_file_path_and_jsonl_file_path(tmp_path):
    write_csv(tmp_path / "c")
    write_folder(tmp_path / "f")
    (tmp_path / "c" / "captions.csv").rename(tmp_path / "c" / "pairs.csv")
    (tmp_path / "f" / "captions.jsonl").rename(tmp_path / "f" / "pairs.jsonl")
    assert [s.key for s in iter_samples(tmp_path / "c" / "pairs.csv")] == list(FOLDER_KEYS.values())
    assert [s.key for s in iter_samples(tmp_path / "f" / "pairs.jsonl")] == list(FOLDER_KEYS.values())


def test_unknown_sources_raise(tmp_path):
    (tmp_path / "notes.txt").write_text("x")
    with pytest.raises(FileNotFoundError):
        list(iter_samples(tmp_path / "nowhere"))
    with pytest.raises(FileNotFoundError, match="captions.jsonl"):
        list(iter_samples(tmp_path))
    with pytest.raises(ValueError, match="format"):
        list(iter_samples(tmp_path / "notes.txt"))
    with pytest.raises(ValueError, match="split"):
        list(iter_samples(tmp_path, split="training"))


@pytest.mark.parametrize("max_bad_fraction, raises", [(0.05, True), (0.25, False), (0.5, False)])
def test_load_samples_checks_bad_fraction(tmp_path, max_bad_fraction, raises):
    source = write_folder(tmp_path, [{"image": "img/nope.png", "text": "x"}])
    if raises:
        message = "1 of 4 records (25.0%) were bad, above max_bad_fraction=0.05: missing_image=1"
        with pytest.raises(DataQualityError) as info:
            load_samples(source, max_bad_fraction=max_bad_fraction)
        assert str(info.value) == message
    else:
        samples, bad = load_samples(source, max_bad_fraction=max_bad_fraction)
        assert len(samples) == 3
        assert bad.to_dict() == {"seen": 4, "skipped": 1, "by_reason": {"missing_image": 1}}


def test_load_samples_refuses_an_empty_split(tmp_path):
    with pytest.raises(DataQualityError, match="no samples"):
        load_samples(write_folder(tmp_path), split="test")


def test_bad_record_warnings_are_rate_limited(caplog):
    bad = BadRecords()
    with caplog.at_level(logging.DEBUG, logger="core.data"):
        for i in range(25):
            bad.add("corrupt_image", f"k{i}")
    warned = [r for r in caplog.records if r.levelno == logging.WARNING and "k" in r.getMessage()]
    assert len([r for r in warned if r.getMessage().startswith("skipping")]) == 10
    assert len([r for r in caplog.records if r.levelno == logging.DEBUG]) == 15
    assert bad.skipped == Counter({"corrupt_image": 25})


def test_label_sets():
    samples = [
        type("S", (), {"labels": labels})
        for labels in ({"colour": "red", "shape": "square"}, {"colour": "blue"}, {}, {"colour": "red"})
    ]
    assert label_sets(samples) == {"colour": ["blue", "red"], "shape": ["square"]}


def test_folder_fingerprint_follows_the_captions(tmp_path):
    a, b = write_folder(tmp_path / "a"), write_folder(tmp_path / "b")
    assert fingerprint(a) == fingerprint(b)  # same content, different place
    before = fingerprint(a)
    captions = a / "captions.jsonl"
    captions.write_text(captions.read_text().replace("a red square", "a crimson square"))
    assert fingerprint(a) != before
    assert len(before) == 64 and int(before, 16) >= 0


def test_shard_fingerprint_follows_the_shard_list(tmp_path):
    root = write_shards(tmp_path)
    before = fingerprint(root)
    assert fingerprint(str(root / "shard-{000..001}.tar")) == before
    write_shard(root / "shard-002.tar", [("green.png", png_bytes(RED)), ("green.txt", b"green")])
    assert fingerprint(root) != before


def test_csv_fingerprint_differs_from_folder(tmp_path):
    assert fingerprint(write_csv(tmp_path / "c")) != fingerprint(write_folder(tmp_path / "f"))
