"""The embedded default data set: Google's Noto emoji art from the npm package `emoji-datasource-google`,
captioned the way alt text describes emoji and labelled by category and subcategory, built once into a
folder-format data set (`captions.jsonl` + `images/`) that `core.data` reads.

With more vendors (`vendors=("google", "twitter")`: Twemoji from `emoji-datasource-twitter`, the only other
openly licensed art of the family) every emoji is drawn in each style, with the same captions, labels and split,
and each image records its vendor as a facet (`{"vendor": "twitter"}`), which evaluation reports apart.
"""

from __future__ import annotations

import json
import logging
import math
import os
import random
import re
import shutil
import subprocess
import tarfile
import tempfile
import time
import zlib
from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

from tqdm import tqdm

from core.data import CAPTIONS_JSONL, label_sets
from core.preprocess import ImageDecodeError, load_image

logger = logging.getLogger(__name__)

# bump when captions, labels, splits or images change: cached builds are then redone. 3: images keep their alpha
BUILD_FORMAT = 3
EMOJI_JSON = "package/emoji.json"
METADATA_JSON = "dataset.json"
DROPPED_CATEGORIES = frozenset({"Component"})  # bare skin-tone swatches, not emoji anyone looks for
SKIN_TONES = {
    "1F3FB": "light",
    "1F3FC": "medium-light",
    "1F3FD": "medium",
    "1F3FE": "medium-dark",
    "1F3FF": "dark",
}
EVAL_FRACTION = {"val": 0.1, "test": 0.1}  # per subcategory, of base emoji; the rest is train
FLAG_CODE = re.compile(r"(flag-)?[a-z]{2}")  # flag short names "flag-de", "de": country codes, not words
NPM_TIMEOUT_S = 600


@dataclass(frozen=True)
class Vendor:
    """One vendor's emoji art: the npm package that ships it, its licences and the credit the art asks for."""

    name: str  # as emoji.json's `has_img_<name>` and the package's img/<name>/ spell it
    package: str
    license: str
    attribution: str | None = None  # to be shown wherever the art goes (CC-BY)

    @property
    def image_dir(self) -> str:
        """Where the package keeps the 64 px PNGs."""
        return f"package/img/{self.name}/64/"


VENDORS = {  # only openly licensed art (Apple's and Facebook's is not)
    vendor.name: vendor
    for vendor in (
        Vendor(
            "google",
            "emoji-datasource-google",
            "emoji-datasource-google: MIT data; Noto emoji art Apache-2.0",
        ),
        Vendor(
            "twitter",
            "emoji-datasource-twitter",
            "emoji-datasource-twitter: MIT data; Twemoji art CC-BY 4.0",
            "Twemoji by Twitter, Inc and other contributors, CC-BY 4.0 "
            "(https://creativecommons.org/licenses/by/4.0/), from the jdecked/twemoji fork",
        ),
    )
}
DEFAULT_VENDORS = ("google",)  # the default data set, laid out as it was before there were vendors


class EmojiBuildError(RuntimeError):
    """The emoji package could not be fetched or read."""


@dataclass
class EmojiImage:
    """One image of the data set: a base emoji or one of its skin-tone variants."""

    image: str  # PNG file name in the package, e.g. "1f385-1f3fb.png"
    texts: list[str]  # captions, the emoji's name first
    labels: dict[str, str]  # {"category": ..., "subcategory": ...}
    group: str  # the base emoji's unified code, shared by its variants
    split: str
    vendor: str = "google"  # whose art

    def path(self, by_vendor: bool) -> str:
        """Where the image lies in the data set: images/<name>, or images/<vendor>/<name> when `by_vendor`."""
        return f"images/{self.vendor}/{self.image}" if by_vendor else f"images/{self.image}"

    def record(self, by_vendor: bool = False) -> dict:
        """The captions.jsonl line for this image; `by_vendor` (builds of other vendors than the default's) nests
        the image in its vendor's folder and records the vendor as a facet."""
        record = {
            "image": self.path(by_vendor),
            "text": self.texts,
            "labels": self.labels,
            "split": self.split,
            "group": self.group,
        }
        return {**record, "facets": {"vendor": self.vendor}} if by_vendor else record


def build_emoji_dataset(
    cache_dir: Path, version: str = "16.0.0", seed: int = 0, vendors: Sequence[str] = DEFAULT_VENDORS
) -> Path:
    """Build (or reuse) the emoji data set of `vendors`' art in `cache_dir/<dataset_dir_name>/`; returns it."""
    vendors = check_vendors(vendors)
    cache_dir = Path(cache_dir)
    out_dir = cache_dir / dataset_dir_name(version, vendors)
    if is_built(out_dir, version, seed, vendors):
        logger.info("emoji data set %s is already built (version %s, seed %d)", out_dir, version, seed)
        return out_dir
    started = time.perf_counter()
    (out_dir / CAPTIONS_JSONL).unlink(missing_ok=True)  # a half-done rebuild must not pass for a finished one
    entries, pngs = read_packages(cache_dir, version, vendors)
    by_vendor = vendors != DEFAULT_VENDORS  # the default data set keeps the layout it had before vendors
    images = _write_images(emoji_images(entries, seed, vendors), pngs, out_dir, by_vendor)
    metadata = dataset_metadata(images, version, seed, vendors)
    _write_atomically(out_dir / METADATA_JSON, json.dumps(metadata, indent=2, ensure_ascii=False) + "\n")
    _write_atomically(
        out_dir / CAPTIONS_JSONL, "".join(_jsonl_line(item.record(by_vendor)) for item in images)
    )
    logger.info(
        "built emoji data set %s in %.1f s: %d images, per split %s, %d categories, %d subcategories",
        out_dir,
        time.perf_counter() - started,
        len(images),
        metadata["counts"]["images"],
        len(metadata["labels"]["category"]),
        len(metadata["labels"]["subcategory"]),
    )
    return out_dir


def check_vendors(vendors: Sequence[str]) -> tuple[str, ...]:
    """The vendors in VENDORS' order, each once; ValueError naming the choices for an unknown one or none."""
    names = [name.strip().lower() for name in vendors if name.strip()]
    unknown = [name for name in names if name not in VENDORS]
    if unknown or not names:
        problem = f"unknown emoji vendor {', '.join(unknown)}" if unknown else "no emoji vendor given"
        raise ValueError(
            f"{problem}: choose one or more of {', '.join(VENDORS)} "
            "(the openly licensed art of the emoji-datasource packages)"
        )
    return tuple(name for name in VENDORS if name in names)


def dataset_dir_name(version: str, vendors: Sequence[str]) -> str:
    """`emoji-<version>` for the default data set, `emoji-<version>-google-twitter` for other vendor sets."""
    return f"emoji-{version}" if tuple(vendors) == DEFAULT_VENDORS else "-".join(["emoji", version, *vendors])


def is_built(out_dir: Path, version: str, seed: int, vendors: Sequence[str] = DEFAULT_VENDORS) -> bool:
    """True when `out_dir` holds a finished build of this version, seed and vendors in the current BUILD_FORMAT."""
    if not (out_dir / CAPTIONS_JSONL).is_file():
        return False
    try:
        metadata = json.loads((out_dir / METADATA_JSON).read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return False
    built = (metadata.get("version"), metadata.get("seed"), metadata.get("build_format"))
    built_vendors = tuple(metadata.get("vendors", DEFAULT_VENDORS))
    return built == (version, seed, BUILD_FORMAT) and built_vendors == tuple(vendors)


# ---------------------------------------------------------------------------------------------- package


def read_packages(
    cache_dir: Path, version: str, vendors: Sequence[str]
) -> tuple[list[dict], dict[str, dict[str, bytes]]]:
    """emoji.json's entries (the first vendor's: the packages of one version share it, `has_img_<vendor>` flags
    and all) and each vendor's 64 px PNGs (vendor -> file name -> bytes)."""
    entries, pngs = None, {}
    for vendor in vendors:
        tarball = fetch_package(cache_dir, version, VENDORS[vendor].package)
        package_entries, pngs[vendor] = read_package(tarball, vendor)
        entries = package_entries if entries is None else entries
    return entries, pngs


def fetch_package(cache_dir: Path, version: str, package: str = VENDORS["google"].package) -> Path:
    """The package tarball in `cache_dir`, fetched with `npm pack` unless it is already there."""
    cache_dir.mkdir(parents=True, exist_ok=True)
    tarball = cache_dir / f"{package}-{version}.tgz"
    if tarball.is_file():
        logger.info("reusing %s", tarball)
        return tarball
    logger.info("fetching %s@%s with npm pack", package, version)
    packed = npm_pack(f"{package}@{version}", cache_dir)
    if packed != tarball:
        os.replace(packed, tarball)
    return tarball


def npm_pack(spec: str, dest_dir: Path) -> Path:
    """Download an npm package's tarball into `dest_dir` with `npm pack`; it appears there only complete."""
    npm = shutil.which("npm")
    if npm is None:
        raise EmojiBuildError(
            f"npm is not on PATH: install Node.js (https://nodejs.org) to fetch {spec}, "
            f"or run `npm pack {spec}` elsewhere and copy the .tgz into {dest_dir}"
        )
    with tempfile.TemporaryDirectory(dir=dest_dir, prefix=".npm-pack-") as scratch:
        _run_npm(npm, spec, Path(scratch))
        packed = sorted(Path(scratch).glob("*.tgz"))
        if len(packed) != 1:
            raise EmojiBuildError(f"`npm pack {spec}` left {len(packed)} tarballs, expected one")
        target = dest_dir / packed[0].name
        os.replace(packed[0], target)
    return target


def _run_npm(npm: str, spec: str, cwd: Path) -> None:
    """`npm pack spec` in `cwd`, translating failures into EmojiBuildError."""
    try:
        subprocess.run(
            [npm, "pack", spec], cwd=cwd, check=True, capture_output=True, text=True, timeout=NPM_TIMEOUT_S
        )
    except subprocess.CalledProcessError as err:
        tail = (err.stderr or err.stdout or "").strip()[-800:]
        raise EmojiBuildError(f"`npm pack {spec}` failed with exit code {err.returncode}: {tail}") from err
    except subprocess.TimeoutExpired as err:
        raise EmojiBuildError(f"`npm pack {spec}` did not finish within {NPM_TIMEOUT_S} s") from err


def read_package(tarball: Path, vendor: str = "google") -> tuple[list[dict], dict[str, bytes]]:
    """emoji.json's entries and the vendor's 64 px PNGs (file name -> bytes), in one streaming pass."""
    entries, pngs = None, {}
    image_dir = VENDORS[vendor].image_dir
    try:
        with tarfile.open(tarball, "r|gz") as tar:
            for member in tar:
                if member.name == EMOJI_JSON:
                    entries = json.load(tar.extractfile(member))
                elif member.isfile() and member.name.startswith(image_dir) and member.name.endswith(".png"):
                    pngs[member.name[len(image_dir) :]] = tar.extractfile(member).read()
    except (tarfile.TarError, OSError, EOFError, zlib.error, ValueError) as err:
        tarball.unlink(missing_ok=True)
        raise EmojiBuildError(
            f"cannot read {tarball} ({err}); deleted it, run again to fetch it afresh"
        ) from err
    if not isinstance(entries, list):
        raise EmojiBuildError(f"{tarball} has no {EMOJI_JSON} list")
    return entries, pngs


# ----------------------------------------------------------------------------------------- captions, labels


def emoji_images(
    entries: list[dict], seed: int = 0, vendors: Sequence[str] = DEFAULT_VENDORS
) -> list[EmojiImage]:
    """Per vendor, every kept base emoji it has art for followed by its skin-tone variants, with captions, labels,
    group and split; an emoji's split is drawn once, over every kept emoji, and holds in every vendor's art."""
    bases = sorted((e for e in entries if _is_kept(e)), key=lambda e: (e.get("sort_order", 0), e["unified"]))
    splits = assign_splits(bases, seed)
    return [
        image
        for vendor in vendors
        for entry in bases
        if _has_art(entry, vendor)
        for image in _entry_images(entry, splits[entry["unified"]], vendor)
    ]


def _is_kept(entry: dict) -> bool:
    """Emoji outside the dropped categories."""
    return entry.get("category") not in DROPPED_CATEGORIES


def _has_art(entry: dict, vendor: str) -> bool:
    """Whether emoji.json says the vendor draws this emoji (or variant); taken as drawn when it does not say."""
    return entry.get(f"has_img_{vendor}", True)


def _entry_images(entry: dict, split: str, vendor: str = "google") -> list[EmojiImage]:
    """A base emoji's image and its variants' in one vendor's art, sharing captions, labels, group and split."""
    labels = emoji_labels(entry)
    texts = emoji_captions(entry, labels)
    group = entry["unified"]
    base = EmojiImage(entry["image"], texts, labels, group, split, vendor)
    variants = [
        EmojiImage(variant["image"], texts + tone_captions(texts[0], tones), labels, group, split, vendor)
        for tones, variant in sorted((entry.get("skin_variations") or {}).items())
        if _has_art(variant, vendor)
    ]
    return [base, *variants]


def emoji_labels(entry: dict) -> dict[str, str]:
    """Readable labels: category lowercased ("animals & nature"), subcategory spaced ("animal mammal")."""
    return {
        "category": entry["category"].strip().lower(),
        "subcategory": entry["subcategory"].strip().lower().replace("-", " "),
    }


def emoji_name(entry: dict) -> str:
    """The emoji's name in lower case ("father christmas", "germany flag"): the retrieval query."""
    return " ".join(entry["name"].split()).lower()


def short_name_phrases(entry: dict) -> list[str]:
    """Short names as words ("raised_hands" -> "raised hands", "male-farmer" -> "male farmer"), no codes."""
    phrases = []
    for short in entry.get("short_names") or [entry.get("short_name", "")]:
        if not short or (entry.get("category") == "Flags" and FLAG_CODE.fullmatch(short)):
            continue
        phrases.append(re.sub(r"(?<=[a-z])-(?=[a-z])", " ", short.replace("_", " ")).strip())
    return list(dict.fromkeys(p for p in phrases if p))


def emoji_captions(entry: dict, labels: dict[str, str]) -> list[str]:
    """Alt-text captions: the name, its short names, then phrases carrying the label words (over half)."""
    name = emoji_name(entry)
    shorts = [phrase for phrase in short_name_phrases(entry) if phrase != name]
    category, subcategory = labels["category"], labels["subcategory"]
    texts = [
        name,
        *shorts,
        f"{name} emoji",
        f"{name}, a {subcategory} emoji",
        f"a {category} emoji of {name}",
        f"a {subcategory} emoji",  # label words alone: the zero-shot prompt's own form
        f"a {category} emoji",
    ]
    if shorts:
        texts.append(f"{shorts[0]}, {subcategory} emoji")
    return list(dict.fromkeys(texts))


def tone_captions(name: str, tones: str) -> list[str]:
    """A variant's skin-tone caption ("1F3FB-1F3FC" -> "..., light skin tone, medium-light skin tone")."""
    words = list(dict.fromkeys(SKIN_TONES[code] for code in tones.upper().split("-") if code in SKIN_TONES))
    return [f"{name}, " + ", ".join(f"{word} skin tone" for word in words)] if words else []


# ---------------------------------------------------------------------------------------------- splits


def assign_splits(bases: list[dict], seed: int = 0) -> dict[str, str]:
    """Base emoji unified code -> split, ~80/10/10 within each subcategory, seeded and order-independent."""
    by_subcategory: dict[str, list[str]] = {}
    for entry in bases:
        by_subcategory.setdefault(entry["subcategory"], []).append(entry["unified"])
    splits = {}
    for subcategory, codes in sorted(by_subcategory.items()):
        codes = sorted(codes)
        random.Random(seed + zlib.crc32(subcategory.encode())).shuffle(codes)
        train, val, test = split_sizes(len(codes))
        splits.update(zip(codes, ["test"] * test + ["val"] * val + ["train"] * train))
    return splits


def split_sizes(count: int) -> tuple[int, int, int]:
    """(train, val, test) sizes for a subcategory of `count` base emoji; train is never left empty."""
    val = math.floor(count * EVAL_FRACTION["val"] + 0.5)
    test = math.floor(count * EVAL_FRACTION["test"] + 0.5)
    while count and val + test >= count:  # tiny subcategories: give train its share first
        if test >= val:
            test -= 1
        else:
            val -= 1
    return count - val - test, val, test


# ---------------------------------------------------------------------------------------------- writing


def _write_images(
    images: list[EmojiImage], pngs: dict[str, dict[str, bytes]], out_dir: Path, by_vendor: bool
) -> list[EmojiImage]:
    """Write each emoji's PNG as its package has it, transparency kept (readers composite it onto white, as
    preprocessing does; training's background augmentation puts it on other colours); returns the images written."""
    for folder in {(out_dir / item.path(by_vendor)).parent for item in images}:
        folder.mkdir(parents=True, exist_ok=True)
    written = []
    for item in tqdm(images, desc="writing emoji", unit="img", disable=None):
        try:
            png = pngs[item.vendor][item.image]
            load_image(png)  # refuse what does not decode
            (out_dir / item.path(by_vendor)).write_bytes(png)
        except (KeyError, ImageDecodeError) as err:
            reason = f"not in the {item.vendor} package" if isinstance(err, KeyError) else err
            logger.warning("leaving out %s: %s", item.path(by_vendor), reason)
            continue
        written.append(item)
    return written


def dataset_metadata(
    images: list[EmojiImage], version: str, seed: int, vendors: Sequence[str] = DEFAULT_VENDORS
) -> dict:
    """What dataset.json records: provenance and licences, build parameters, counts per split (and per vendor,
    credits, when the vendors are not the default's) and the label sets."""
    metadata = {
        "name": "emoji",
        "source": ", ".join(f"npm:{VENDORS[vendor].package}@{version}" for vendor in vendors),
        "version": version,
        "seed": seed,
        "build_format": BUILD_FORMAT,
        "license": "; ".join(VENDORS[vendor].license for vendor in vendors),
        "counts": split_counts(images),
        "labels": label_sets(images),
    }
    if tuple(vendors) == DEFAULT_VENDORS:
        return metadata
    return {
        **metadata,
        "vendors": list(vendors),
        "attribution": [VENDORS[v].attribution for v in vendors if VENDORS[v].attribution],
        "counts_by_vendor": {v: split_counts([i for i in images if i.vendor == v]) for v in vendors},
    }


def split_counts(images: list[EmojiImage]) -> dict[str, dict[str, int]]:
    """Images and base emoji per split."""
    return {
        "images": dict(sorted(Counter(item.split for item in images).items())),
        "emoji": dict(sorted(Counter(item.split for item in {i.group: i for i in images}.values()).items())),
    }


def _jsonl_line(record: dict) -> str:
    return json.dumps(record, ensure_ascii=False) + "\n"


def _write_atomically(path: Path, text: str) -> None:
    """Write a file through a temporary sibling and a rename, so readers never see half of it."""
    path.parent.mkdir(parents=True, exist_ok=True)
    scratch = path.with_name(path.name + ".tmp")
    scratch.write_text(text, encoding="utf-8")
    os.replace(scratch, path)
