"""Tests for core.emoji against fake npm packages in the real layout: filtering, compositing, captions,
labels, splits by base emoji, vendors, and the build cache."""

from __future__ import annotations

import hashlib
import io
import json
import subprocess
import tarfile
from collections import Counter
from pathlib import Path

import pytest
from PIL import Image

from core import emoji
from core.data import load_samples, splits_present

COLOURS = [(200, 30, 30), (30, 200, 30), (30, 30, 200), (200, 200, 30), (30, 200, 200), (200, 30, 200)]
TWEMOJI_COLOURS = [(90, 90, 90), (150, 150, 150)]  # the fake twitter package's art: told apart from google's
VENDOR_COLOURS = {"google": COLOURS, "twitter": TWEMOJI_COLOURS}


def entry(
    name,
    unified,
    short_names,
    category,
    subcategory,
    order,
    tones=(),
    google=True,
    twitter=True,
    twitter_lacks=(),
):
    """An emoji.json entry as emoji-datasource writes it (only the keys the builder reads, plus noise);
    `google`/`twitter` False: that vendor has no art for it; `twitter_lacks`: nor for these skin tones."""
    image = unified.lower() + ".png"
    skin = {
        tone: {
            "unified": f"{unified}-{tone}",
            "image": f"{unified.lower()}-{tone.lower()}.png",
            "has_img_google": google,
            "has_img_twitter": twitter and tone not in twitter_lacks,
            "sheet_x": 0,
        }
        for tone in tones
    }
    return {
        "name": name,
        "unified": unified,
        "image": image,
        "short_name": short_names[0],
        "short_names": short_names,
        "category": category,
        "subcategory": subcategory,
        "sort_order": order,
        "has_img_google": google,
        "has_img_twitter": twitter,
        "has_img_apple": True,
        **({"skin_variations": skin} if skin else {}),
    }


ENTRIES = [
    entry("DOG FACE", "1F436", ["dog"], "Animals & Nature", "animal-mammal", 3, twitter=False),
    entry(
        "FATHER CHRISTMAS",
        "1F385",
        ["santa"],
        "People & Body",
        "person-fantasy",
        2,
        ["1F3FB", "1F3FF"],
        twitter_lacks=["1F3FF"],
    ),
    entry(
        "PEOPLE HOLDING HANDS",
        "1F9D1-200D-1F91D-200D-1F9D1",
        ["people_holding_hands"],
        "People & Body",
        "family",
        5,
        ["1F3FB-1F3FC", "1F3FD-1F3FD"],
    ),
    entry("GRINNING FACE", "1F600", ["grinning", "grinning_face"], "Smileys & Emotion", "face-smiling", 1),
    entry("Germany Flag", "1F1E9-1F1EA", ["de", "flag-de"], "Flags", "country-flag", 6),
    entry("CAT FACE", "1F431", ["cat"], "Animals & Nature", "animal-mammal", 4),
    entry("EMOJI MODIFIER FITZPATRICK TYPE-1-2", "1F3FB", ["skin-tone-2"], "Component", "skin-tone", 7),
]


def emoji_png(colour) -> bytes:
    """An 8x8 RGBA PNG: transparent left half, opaque `colour` right half."""
    image = Image.new("RGBA", (8, 8), (0, 0, 0, 0))
    image.paste(Image.new("RGBA", (4, 8), (*colour, 255)), (4, 0))
    buffer = io.BytesIO()
    image.save(buffer, "PNG")
    return buffer.getvalue()


def image_names(entries) -> list[str]:
    return [e["image"] for e in entries] + [
        v["image"] for e in entries for v in e.get("skin_variations", {}).values()
    ]


def fake_package(path: Path, entries=ENTRIES, vendor: str = "google") -> Path:
    """A .tgz laid out like `npm pack emoji-datasource-<vendor>`: emoji.json (the same for every vendor), the
    vendor's 64 px PNGs, and other sizes; PNGs of every emoji, whatever its `has_img_<vendor>` says."""
    colours = VENDOR_COLOURS[vendor]
    with tarfile.open(path, "w:gz") as tar:
        for index, name in enumerate(image_names(entries)):
            for size in ("32", "64"):
                add_member(
                    tar, f"package/img/{vendor}/{size}/{name}", emoji_png(colours[index % len(colours)])
                )
        add_member(
            tar, "package/emoji.json", json.dumps(entries).encode()
        )  # after the images, as in the real pack
        add_member(tar, "package/package.json", json.dumps({"name": f"emoji-datasource-{vendor}"}).encode())
    return path


def add_member(tar: tarfile.TarFile, name: str, data: bytes) -> None:
    info = tarfile.TarInfo(name)
    info.size = len(data)
    tar.addfile(info, io.BytesIO(data))


@pytest.fixture
def package_entries() -> list[dict]:
    """emoji.json of the fake packages (a test may parametrize it)."""
    return ENTRIES


@pytest.fixture
def npm_calls(monkeypatch, package_entries) -> list[str]:
    """Replaces `npm pack` with the fake packages; returns the list of package specs it was asked for."""
    calls = []

    def fake_npm_pack(spec: str, dest_dir: Path) -> Path:
        calls.append(spec)
        name, version = spec.split("@")
        vendor = name.removeprefix("emoji-datasource-")
        return fake_package(dest_dir / f"{name}-{version}.tgz", package_entries, vendor)

    monkeypatch.setattr(emoji, "npm_pack", fake_npm_pack)
    return calls


def read_records(root: Path) -> dict[str, dict]:
    return {r["image"]: r for r in map(json.loads, (root / "captions.jsonl").read_text().splitlines())}


def test_build_reads_back_as_a_folder_dataset(tmp_path, npm_calls):
    root = emoji.build_emoji_dataset(tmp_path, version="16.0.0")
    assert root == tmp_path / "emoji-16.0.0"
    samples, bad = load_samples(root, max_bad_fraction=0.0)
    kept = [e for e in ENTRIES if e["category"] != "Component"]
    assert sorted(s.key for s in samples) == sorted(f"images/{name}" for name in image_names(kept))
    assert bad.to_dict()["skipped"] == 0
    assert npm_calls == ["emoji-datasource-google@16.0.0"]


def test_images_keep_their_transparency_and_read_as_rgb_on_white(tmp_path, npm_calls):
    samples, _ = load_samples(emoji.build_emoji_dataset(tmp_path))
    for sample in samples:
        with Image.open(tmp_path / "emoji-16.0.0" / sample.key) as stored:
            assert stored.mode == "RGBA" and stored.getpixel((0, 0))[3] == 0  # for the background augmentation
        assert sample.image.mode == "RGB"
        assert sample.image.getpixel((0, 0)) == (255, 255, 255)  # transparent: read on white
        assert sample.image.getpixel((7, 0)) in COLOURS  # opaque pixels unchanged


def test_captions_and_labels_of_a_base_emoji(tmp_path, npm_calls):
    records = read_records(emoji.build_emoji_dataset(tmp_path))
    assert records["images/1f385.png"]["text"] == [
        "father christmas",
        "santa",
        "father christmas emoji",
        "father christmas, a person fantasy emoji",
        "a people & body emoji of father christmas",
        "a person fantasy emoji",
        "a people & body emoji",
        "santa, person fantasy emoji",
    ]
    assert records["images/1f385.png"]["labels"] == {
        "category": "people & body",
        "subcategory": "person fantasy",
    }
    assert records["images/1f1e9-1f1ea.png"]["text"] == [  # "de", "flag-de" are codes, not captions
        "germany flag",
        "germany flag emoji",
        "germany flag, a country flag emoji",
        "a flags emoji of germany flag",
        "a country flag emoji",
        "a flags emoji",
    ]
    assert records["images/1f600.png"]["text"][:3] == ["grinning face", "grinning", "grinning face emoji"]


def test_variants_share_captions_group_and_split(tmp_path, npm_calls):
    records = read_records(emoji.build_emoji_dataset(tmp_path))
    base = records["images/1f9d1-200d-1f91d-200d-1f9d1.png"]
    mixed = records["images/1f9d1-200d-1f91d-200d-1f9d1-1f3fb-1f3fc.png"]
    same = records["images/1f9d1-200d-1f91d-200d-1f9d1-1f3fd-1f3fd.png"]
    assert mixed["text"] == base["text"] + ["people holding hands, light skin tone, medium-light skin tone"]
    assert same["text"] == base["text"] + ["people holding hands, medium skin tone"]
    assert records["images/1f385-1f3ff.png"]["text"][-1] == "father christmas, dark skin tone"
    for variant in (mixed, same):
        assert (variant["group"], variant["split"], variant["labels"]) == (
            "1F9D1-200D-1F91D-200D-1F9D1",
            base["split"],
            base["labels"],
        )


def test_about_half_of_captions_carry_label_words(tmp_path, npm_calls):
    records = read_records(emoji.build_emoji_dataset(tmp_path)).values()
    carrying = Counter(
        any(r["labels"][name] in text for name in ("category", "subcategory"))
        for r in records
        for text in r["text"]
    )
    assert 0.4 <= carrying[True] / sum(carrying.values()) <= 0.7  # the name alone stays common


def test_builds_are_deterministic(tmp_path, npm_calls):
    first = emoji.build_emoji_dataset(tmp_path / "a", seed=3)
    second = emoji.build_emoji_dataset(tmp_path / "b", seed=3)
    for name in ("captions.jsonl", "dataset.json"):
        assert (first / name).read_bytes() == (second / name).read_bytes()


def test_second_build_is_served_from_the_cache(tmp_path, npm_calls):
    root = emoji.build_emoji_dataset(tmp_path)
    stamp = (root / "captions.jsonl").stat().st_mtime_ns
    assert emoji.build_emoji_dataset(tmp_path) == root
    assert (root / "captions.jsonl").stat().st_mtime_ns == stamp
    assert len(npm_calls) == 1


@pytest.mark.parametrize("change", ["interrupted", "new_seed", "old_format"])
def test_stale_builds_are_redone_from_the_cached_tarball(tmp_path, npm_calls, change):
    root = emoji.build_emoji_dataset(tmp_path)
    seed = 0
    if change == "interrupted":
        (root / "captions.jsonl").unlink()
    elif change == "new_seed":
        seed = 1
    else:
        metadata = json.loads((root / "dataset.json").read_text())
        (root / "dataset.json").write_text(json.dumps({**metadata, "build_format": 0}))
    emoji.build_emoji_dataset(tmp_path, seed=seed)
    assert json.loads((root / "dataset.json").read_text())["seed"] == seed
    assert emoji.is_built(root, "16.0.0", seed)
    assert len(npm_calls) == 1  # the .tgz is reused


def test_metadata(tmp_path, npm_calls):
    root = emoji.build_emoji_dataset(tmp_path)
    metadata = json.loads((root / "dataset.json").read_text())
    assert sum(metadata["counts"]["images"].values()) == 10  # 6 base emoji + 4 skin-tone variants
    assert sum(metadata["counts"]["emoji"].values()) == 6
    assert set(metadata["counts"]["images"]) == splits_present(root)
    assert metadata["license"] == "emoji-datasource-google: MIT data; Noto emoji art Apache-2.0"
    assert metadata["labels"] == {
        "category": ["animals & nature", "flags", "people & body", "smileys & emotion"],
        "subcategory": ["animal mammal", "country flag", "face smiling", "family", "person fantasy"],
    }


def bases(sizes: dict[str, int]) -> list[dict]:
    return [
        {"unified": f"{sub.upper()}{i:03d}", "subcategory": sub} for sub, n in sizes.items() for i in range(n)
    ]


@pytest.mark.parametrize(
    "count, expected",
    [
        (0, (0, 0, 0)),
        (1, (1, 0, 0)),
        (2, (2, 0, 0)),
        (4, (4, 0, 0)),
        (5, (3, 1, 1)),
        (10, (8, 1, 1)),
        (15, (11, 2, 2)),
        (30, (24, 3, 3)),
        (159, (127, 16, 16)),
    ],
)
def test_split_sizes(count, expected):
    assert emoji.split_sizes(count) == expected


def test_splits_are_stratified_by_subcategory_and_seeded():
    entries = bases({"mammal": 30, "amphibian": 1, "flag": 5})
    splits = emoji.assign_splits(entries, seed=0)
    per_subcategory = Counter((e["subcategory"], splits[e["unified"]]) for e in entries)
    assert per_subcategory == Counter(
        {
            ("mammal", "train"): 24,
            ("mammal", "val"): 3,
            ("mammal", "test"): 3,
            ("amphibian", "train"): 1,
            ("flag", "train"): 3,
            ("flag", "val"): 1,
            ("flag", "test"): 1,
        }
    )
    assert emoji.assign_splits(list(reversed(entries)), seed=0) == splits  # input order does not matter
    assert emoji.assign_splits(entries, seed=1) != splits


def test_npm_missing_is_a_clear_error(tmp_path, monkeypatch):
    monkeypatch.setattr(emoji.shutil, "which", lambda name: None)
    with pytest.raises(emoji.EmojiBuildError, match="npm is not on PATH"):
        emoji.build_emoji_dataset(tmp_path)


def test_npm_failure_is_a_clear_error(tmp_path, monkeypatch):
    def failing_run(command, **kwargs):
        raise subprocess.CalledProcessError(1, command, stderr="npm error 404 Not Found")

    monkeypatch.setattr(emoji.subprocess, "run", failing_run)
    monkeypatch.setattr(emoji.shutil, "which", lambda name: "/usr/bin/npm")
    with pytest.raises(emoji.EmojiBuildError, match="exit code 1: npm error 404"):
        emoji.build_emoji_dataset(tmp_path, version="0.0.0")
    assert not list(tmp_path.glob("*.tgz"))


def test_corrupt_tarball_is_deleted_with_a_clear_error(tmp_path, npm_calls):
    (tmp_path / "emoji-datasource-google-16.0.0.tgz").write_bytes(b"\x1f\x8b not really gzip")
    with pytest.raises(emoji.EmojiBuildError, match="run again"):
        emoji.build_emoji_dataset(tmp_path)
    assert not (tmp_path / "emoji-datasource-google-16.0.0.tgz").exists()
    emoji.build_emoji_dataset(tmp_path)  # the next run fetches it afresh
    assert len(npm_calls) == 1


# ---------------------------------------------------------------------------------------------- vendors

BOTH = ("google", "twitter")
# sha256 of the default build of ENTRIES made before vendors existed: the google-only data set must not change
# (dataset.json: build format 3, images with their alpha; with "build_format": 2 its bytes hash as before, 4798632d…)
DEFAULT_BUILD_SHA256 = {
    "captions.jsonl": "6590da31cc33b68412314a2f9f7a050f86c4be4873391cc6bbefc123643b2508",
    "dataset.json": "075a2e4cc4f73762290dd6f7d58816c3fbeaf8e6c0a9eb423efbe8f89be43573",
}
# 30 + 10 emoji in two subcategories, so that val and test are not empty; some lack one vendor's art or both
MANY = [
    entry(
        f"ANIMAL {i}",
        f"1F{i:03X}",
        [f"animal_{i}"],
        "Animals & Nature",
        "animal-mammal",
        i,
        ["1F3FB"],
        google=i % 7 != 0,
        twitter=i % 3 != 0,
    )
    for i in range(30)
] + [
    entry(
        f"FACE {i}",
        f"1F6{i:02X}",
        [f"face_{i}"],
        "Smileys & Emotion",
        "face-smiling",
        100 + i,
        twitter=i != 4,
    )
    for i in range(10)
]


@pytest.mark.parametrize("vendors", [None, ("google",), ["Google ", "google"]])
def test_the_default_build_is_unchanged(tmp_path, npm_calls, vendors):
    kwargs = {} if vendors is None else {"vendors": vendors}
    root = emoji.build_emoji_dataset(tmp_path, **kwargs)
    assert root == tmp_path / "emoji-16.0.0"
    assert {
        name: hashlib.sha256((root / name).read_bytes()).hexdigest() for name in DEFAULT_BUILD_SHA256
    } == (DEFAULT_BUILD_SHA256)
    assert npm_calls == ["emoji-datasource-google@16.0.0"]


def test_vendors_build_apart_from_the_default(tmp_path, npm_calls):
    default = emoji.build_emoji_dataset(tmp_path)
    root = emoji.build_emoji_dataset(tmp_path, vendors=("twitter", "google"))
    assert root == tmp_path / "emoji-16.0.0-google-twitter"
    assert emoji.build_emoji_dataset(tmp_path, vendors=BOTH) == root  # any order: the same data set, cached
    assert npm_calls == ["emoji-datasource-google@16.0.0", "emoji-datasource-twitter@16.0.0"]
    assert emoji.is_built(default, "16.0.0", 0) and not emoji.is_built(root, "16.0.0", 0)
    assert emoji.is_built(root, "16.0.0", 0, BOTH)


def test_each_vendor_draws_from_its_own_package(tmp_path, npm_calls):
    samples, bad = load_samples(emoji.build_emoji_dataset(tmp_path, vendors=BOTH), max_bad_fraction=0.0)
    drawn = {}
    for sample in samples:
        vendor = sample.facets["vendor"]
        assert sample.key.startswith(f"images/{vendor}/")
        assert sample.image.getpixel((7, 0)) in VENDOR_COLOURS[vendor]
        assert "vendor" not in sample.labels  # a facet, never a label to classify or train on
        drawn.setdefault(vendor, set()).add(sample.key.rsplit("/", 1)[1])
    kept = set(image_names([e for e in ENTRIES if e["category"] != "Component"]))
    assert drawn == {
        "google": kept,
        "twitter": kept - {"1f436.png", "1f385-1f3ff.png"},
    }  # no Twemoji for those
    assert bad.to_dict()["skipped"] == 0


def test_every_style_has_the_same_captions_labels_group_and_split(tmp_path, npm_calls):
    records = read_records(emoji.build_emoji_dataset(tmp_path, vendors=BOTH))
    twemoji = {key: r for key, r in records.items() if key.startswith("images/twitter/")}
    assert twemoji
    for key, record in twemoji.items():
        google = records[key.replace("images/twitter/", "images/google/")]
        assert {**record, "image": "", "facets": {}} == {**google, "image": "", "facets": {}}
        assert (google["facets"], record["facets"]) == ({"vendor": "google"}, {"vendor": "twitter"})


@pytest.mark.parametrize("package_entries", [MANY])
def test_each_emoji_is_in_one_split_in_every_style(tmp_path, npm_calls):
    both = read_records(emoji.build_emoji_dataset(tmp_path / "both", vendors=BOTH)).values()
    google_only = read_records(emoji.build_emoji_dataset(tmp_path / "google")).values()
    splits = {}
    for record in both:
        splits.setdefault(record["group"], set()).add(record["split"])
    assert all(
        len(held) == 1 for held in splits.values()
    )  # no emoji leaks into another split in another style
    assert set().union(*splits.values()) == {"train", "val", "test"}
    drawn_by = {vendor: {r["group"] for r in both if r["facets"]["vendor"] == vendor} for vendor in BOTH}
    assert drawn_by["google"] - drawn_by["twitter"] and drawn_by["twitter"] - drawn_by["google"]
    assert {r["group"]: r["split"] for r in google_only} == {g: splits[g].pop() for g in drawn_by["google"]}


def test_metadata_names_every_package_licence_and_credit(tmp_path, npm_calls):
    metadata = json.loads((emoji.build_emoji_dataset(tmp_path, vendors=BOTH) / "dataset.json").read_text())
    assert metadata["source"] == "npm:emoji-datasource-google@16.0.0, npm:emoji-datasource-twitter@16.0.0"
    assert metadata["license"] == (
        "emoji-datasource-google: MIT data; Noto emoji art Apache-2.0; "
        "emoji-datasource-twitter: MIT data; Twemoji art CC-BY 4.0"
    )
    assert metadata["attribution"][0].startswith("Twemoji by Twitter, Inc and other contributors, CC-BY 4.0")
    assert metadata["vendors"] == ["google", "twitter"]
    by_vendor = metadata["counts_by_vendor"]
    assert (
        sum(by_vendor["google"]["images"].values()) == 10
        and sum(by_vendor["twitter"]["images"].values()) == 8
    )
    assert sum(metadata["counts"]["images"].values()) == 18


def test_unknown_vendor_is_refused(tmp_path, npm_calls):
    with pytest.raises(ValueError, match="unknown emoji vendor apple: choose one or more of google, twitter"):
        emoji.build_emoji_dataset(tmp_path, vendors=("google", "apple"))
    with pytest.raises(ValueError, match="no emoji vendor given"):
        emoji.check_vendors([" "])
    assert npm_calls == []


@pytest.mark.parametrize(
    "vendors, exit_code, printed",
    [("twitter,google", 0, "emoji-16.0.0-google-twitter"), ("google,apple", 2, "unknown emoji vendor apple")],
)
def test_data_emoji_command(tmp_path, npm_calls, vendors, exit_code, printed):
    from typer.testing import CliRunner

    from xclip_serve.cli import app

    result = CliRunner().invoke(app, ["data", "emoji", "--vendors", vendors, "--cache-dir", str(tmp_path)])
    assert result.exit_code == exit_code and printed in result.output
