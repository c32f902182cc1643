"""Image-text data sets on disk: readers for a folder with `captions.jsonl`, a CSV file and WebDataset shards,
all yielding `Sample`s; every bad record is counted by reason in `BadRecords` and skipped, never fatal.

Torch-free at import: the service and the index builder read data too. `webdataset` (whose package import
pulls in torch when torch is installed) is imported only when shards are actually read.
"""

from __future__ import annotations

import csv
import hashlib
import json
import logging
import os
from collections import Counter
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass, field
from pathlib import Path, PurePosixPath, PureWindowsPath

from PIL import Image

from core.preprocess import ImageDecodeError, load_image

logger = logging.getLogger(__name__)

SPLITS = ("train", "val", "test")
SPLIT_ALIASES = {"validation": "val", "valid": "val"}
CAPTIONS_JSONL = "captions.jsonl"
CAPTIONS_CSV = "captions.csv"
CAPTION_KEYS = ("text", "caption")  # record fields holding one caption or a list of them
CSV_CAPTION_SEPARATOR = "||"  # several captions in one CSV cell: "a cat || a kitten"
CSV_LABEL_PREFIX = "label_"  # CSV column "label_category" -> labels["category"]
CSV_FACET_PREFIX = "facet_"  # CSV column "facet_vendor" -> facets["vendor"]
SHARD_IMAGE_SUFFIXES = ("jpg", "jpeg", "png", "webp")  # WebDataset image members, in order of preference
SHARD_SUFFIXES = (".tar", ".tar.gz", ".tgz")
WARNINGS_PER_REASON = 10  # skipped records logged at WARNING per reason; the rest go to DEBUG


@dataclass
class Sample:
    """One image with its captions, labels, split and retrieval group."""

    key: str  # unique id: relative image path (folder/csv) or the shard member key (webdataset)
    image: Image.Image  # decoded RGB, transparency composited on white
    texts: list[str]  # one or more captions, stripped, non-empty
    labels: dict[str, str] = field(default_factory=dict)  # label name -> value, e.g. {"category": "flags"}
    split: str | None = None  # "train" | "val" | "test" | None
    group: str = ""  # samples showing the same concept share a group (retrieval hits); defaults to key
    # how the image is drawn or where it comes from, not what it shows, e.g. {"vendor": "twitter"}: evaluation
    # reports each value apart; never a label (nothing is trained or classified on it)
    facets: dict[str, str] = field(default_factory=dict)

    def __post_init__(self):
        if not self.group:
            self.group = self.key


class DataQualityError(RuntimeError):
    """Too many records of a data set were unusable, or the data set has no usable records at all."""


@dataclass
class BadRecords:
    """Tally of the records a reader looked at and of those it skipped, by reason."""

    seen: int = 0
    skipped: Counter = field(default_factory=Counter)

    def add(self, reason: str, key: str, detail: str = "") -> None:
        """Count one skipped record; the first few per reason are logged at WARNING, the rest at DEBUG."""
        self.skipped[reason] += 1
        count = self.skipped[reason]
        level = logging.WARNING if count <= WARNINGS_PER_REASON else logging.DEBUG
        logger.log(level, "skipping %s (%s)%s", key, reason, f": {detail}" if detail else "")
        if count == WARNINGS_PER_REASON:
            logger.warning("further %s records are logged at DEBUG level only", reason)

    @property
    def total(self) -> int:
        """Number of skipped records, all reasons together."""
        return sum(self.skipped.values())

    @property
    def fraction(self) -> float:
        """Skipped records as a fraction of the records seen (0 when none were seen)."""
        return self.total / self.seen if self.seen else 0.0

    def to_dict(self) -> dict:
        """JSON-ready summary: seen, skipped and the counts by reason."""
        return {"seen": self.seen, "skipped": self.total, "by_reason": dict(self.skipped.most_common())}

    def check(self, max_bad_fraction: float) -> None:
        """Raise DataQualityError when more than `max_bad_fraction` of the records seen were bad."""
        if self.fraction <= max_bad_fraction:
            return
        reasons = ", ".join(f"{reason}={count}" for reason, count in self.skipped.most_common())
        raise DataQualityError(
            f"{self.total} of {self.seen} records ({self.fraction:.1%}) were bad, "
            f"above max_bad_fraction={max_bad_fraction}: {reasons}"
        )


class _Rejected(Exception):
    """A record that cannot become a Sample; `reason` is the name it is counted under in BadRecords."""

    def __init__(self, reason: str, key: str, detail: str = ""):
        super().__init__(f"{reason}: {key}")
        self.reason, self.key, self.detail = reason, key, detail


@dataclass(frozen=True)
class _Source:
    """A data source after dispatch: a captions file (folder or csv) or a list of shard URLs (webdataset)."""

    kind: str  # "folder" | "csv" | "webdataset"
    path: Path | None = None
    urls: tuple[str, ...] = ()


_Record = Sample | _Rejected


# ---------------------------------------------------------------------------------------------- public API


def iter_samples(
    source: str | Path | list, split: str | None = None, bad: BadRecords | None = None
) -> Iterator[Sample]:
    """Stream the samples of a folder, CSV or WebDataset source; bad records are counted in `bad`, skipped."""
    if split is not None and split not in SPLITS:
        raise ValueError(f"split must be one of {SPLITS} or None, got {split!r}")
    bad = bad if bad is not None else BadRecords()
    keys: set[str] = set()
    for record in _read_records(_resolve(source), split):
        bad.seen += 1
        if isinstance(record, _Rejected):
            bad.add(record.reason, record.key, record.detail)
        elif record.key in keys:
            bad.add("duplicate_key", record.key)
        else:
            keys.add(record.key)
            yield record


def load_samples(
    source: str | Path | list, split: str | None = None, max_bad_fraction: float = 0.05
) -> tuple[list[Sample], BadRecords]:
    """Read a whole data set into memory; DataQualityError when too many records were bad or none usable."""
    bad = BadRecords()
    samples = list(iter_samples(source, split, bad))
    logger.info(
        "read %d samples from %s (split=%s); bad records: %s", len(samples), source, split, bad.to_dict()
    )
    bad.check(max_bad_fraction)
    if not samples:
        raise DataQualityError(f"no samples in {source} (split={split})")
    return samples, bad


def label_sets(samples: Iterable[Sample]) -> dict[str, list[str]]:
    """Label name -> sorted distinct values over the samples."""
    values: dict[str, set[str]] = {}
    for sample in samples:
        for name, value in sample.labels.items():
            values.setdefault(name, set()).add(value)
    return {name: sorted(values[name]) for name in sorted(values)}


def splits_present(source: str | Path | list) -> set[str]:
    """Split names used by a data set's records, read from the captions only (no image is decoded)."""
    resolved = _resolve(source)
    if resolved.kind == "webdataset":
        objs = _shard_metadata(resolved.urls)
    elif resolved.kind == "csv":
        objs = _csv_rows(resolved.path)
    else:
        objs = _jsonl_objects(resolved.path)
    found = set()
    for obj in objs:
        try:
            found.add(_clean_split(obj.get("split"), ""))
        except _Rejected:
            continue
    return found - {None}


def fingerprint(source: str | Path | list) -> str:
    """sha256 over the captions file's bytes (folder/csv) or the shard list with file sizes (webdataset)."""
    resolved = _resolve(source)
    digest = hashlib.sha256(resolved.kind.encode() + b"\n")
    if resolved.path is not None:
        with resolved.path.open("rb") as captions:
            for chunk in iter(lambda: captions.read(1 << 20), b""):
                digest.update(chunk)
    for url in resolved.urls:
        digest.update(f"{url}\t{_file_size(url)}\n".encode())
    return digest.hexdigest()


# ---------------------------------------------------------------------------------------------- dispatch


def _resolve(source: str | Path | list) -> _Source:
    """Decide a source's format from its shape: directory contents, file suffix or shard pattern."""
    if isinstance(source, (list, tuple)):
        return _resolve_shard_list(source)
    text = os.fspath(source)
    if _looks_like_shards(text):
        return _Source("webdataset", urls=tuple(_expand_shards(text)))
    path = Path(text)
    if path.is_dir():
        return _resolve_dir(path)
    if path.suffix == ".csv":
        return _Source("csv", path=path)
    if path.suffix == ".jsonl":
        return _Source("folder", path=path)
    if not path.exists():
        raise FileNotFoundError(f"data source {path} does not exist")
    raise ValueError(
        f"cannot tell the format of {path}: expected a directory, a .csv/.jsonl file or .tar shards"
    )


def _resolve_dir(path: Path) -> _Source:
    """A directory: captions.jsonl (folder) before captions.csv before *.tar shards."""
    if (path / CAPTIONS_JSONL).is_file():
        return _Source("folder", path=path / CAPTIONS_JSONL)
    if (path / CAPTIONS_CSV).is_file():
        return _Source("csv", path=path / CAPTIONS_CSV)
    shards = sorted(str(p) for p in path.iterdir() if p.name.endswith(SHARD_SUFFIXES))
    if shards:
        return _Source("webdataset", urls=tuple(shards))
    raise FileNotFoundError(f"{path} holds no {CAPTIONS_JSONL}, {CAPTIONS_CSV} or .tar shards")


def _resolve_shard_list(sources: list | tuple) -> _Source:
    """A list of shard paths, patterns or shard directories, read as one WebDataset source."""
    urls: list[str] = []
    for item in sources:
        part = _resolve(item)
        if part.kind != "webdataset":
            raise ValueError(f"a list of sources must name WebDataset shards only; {item} is {part.kind}")
        urls.extend(part.urls)
    return _Source("webdataset", urls=tuple(urls))


def _looks_like_shards(text: str) -> bool:
    """Shard paths, brace patterns ("shards/{000..009}.tar") and remote/pipe URLs."""
    remote = "://" in text or text.startswith("pipe:")
    return remote or ("{" in text and ".." in text) or text.endswith(SHARD_SUFFIXES)


def _expand_shards(pattern: str) -> list[str]:
    """Brace-expand a shard pattern (braceexpand ships with webdataset and does not import torch)."""
    import braceexpand

    return list(braceexpand.braceexpand(pattern))


def _file_size(url: str) -> int:
    """Size in bytes of a local shard; -1 for remote URLs and missing files."""
    try:
        return os.stat(url).st_size
    except (OSError, ValueError):
        return -1


def _read_records(source: _Source, split: str | None) -> Iterator[_Record]:
    """Samples and rejected records of one source, in file order; records of other splits are left out."""
    if source.kind == "folder":
        return _read_folder(source.path, split)
    if source.kind == "csv":
        return _read_csv(source.path, split)
    return _read_shards(source.urls, split)


def _attempt(build: Callable[..., Sample | None], *args) -> _Record | None:
    """Run a record builder, turning its rejection into a value the reader can yield."""
    try:
        return build(*args)
    except _Rejected as rejected:
        return rejected


# ---------------------------------------------------------------------------------------------- field rules


def _clean_split(value, key: str) -> str | None:
    """Normalise a record's split ("" and None mean no split); unknown names reject the record."""
    if value is None or (isinstance(value, str) and not value.strip()):
        return None
    if not isinstance(value, str):
        raise _Rejected("bad_split", key, repr(value))
    name = SPLIT_ALIASES.get(value.strip().lower(), value.strip().lower())
    if name not in SPLITS:
        raise _Rejected("bad_split", key, repr(value))
    return name


def _clean_texts(values: Iterable) -> list[str]:
    """Stripped, non-empty, distinct captions, in order; non-string entries are ignored."""
    texts = (value.strip() for value in values if isinstance(value, str))
    return list(dict.fromkeys(text for text in texts if text))


def _caption_values(obj: dict) -> list:
    """The raw caption values of a record: its "text" and "caption" fields, each a string or a list."""
    values: list = []
    for name in CAPTION_KEYS:
        value = obj.get(name)
        values.extend([value] if isinstance(value, str) else value if isinstance(value, list) else [])
    return values


def _require_texts(texts: list[str], key: str) -> list[str]:
    """The captions, or a rejection when none is left."""
    if not texts:
        raise _Rejected("empty_caption", key)
    return texts


def _clean_labels(value, key: str) -> dict[str, str]:
    """Label dict with string values; empty values are dropped, non-scalar ones reject the record."""
    return _string_map(value, key, "bad_labels")


def _clean_facets(value, key: str) -> dict[str, str]:
    """Facet dict with string values ({"vendor": "twitter"}), by the labels' rules."""
    return _string_map(value, key, "bad_facets")


def _string_map(value, key: str, reason: str) -> dict[str, str]:
    """A {name: scalar} object as {name: string}; empty values are dropped, anything else rejects the record."""
    if value is None:
        return {}
    if not isinstance(value, dict):
        raise _Rejected(reason, key, repr(value)[:80])
    strings = {}
    for name, raw in value.items():
        if not isinstance(raw, (str, int, float)) or isinstance(raw, bool):
            raise _Rejected(reason, key, f"{name}={raw!r}"[:80])
        if str(raw).strip():
            strings[str(name).strip()] = str(raw).strip()
    return strings


def _clean_group(value, key: str) -> str:
    """The record's group, defaulting to its key."""
    if isinstance(value, (str, int)) and str(value).strip():
        return str(value).strip()
    return key


def _image_path(root: Path, value, where: str) -> tuple[str, Path]:
    """(key, absolute path) of a record's image; absolute paths and paths leaving `root` are rejected."""
    if not isinstance(value, str) or not value.strip():
        raise _Rejected("bad_record", where, "no image path")
    relative = value.strip()
    as_windows = PureWindowsPath(relative)  # splits on both separators, sees drives and roots
    if as_windows.anchor or ".." in as_windows.parts:
        raise _Rejected("unsafe_path", where, relative)
    path = root / relative
    try:
        inside = path.resolve().is_relative_to(root)  # False for a symlink pointing outside the data set
    except (OSError, ValueError) as err:  # NUL bytes, symlink loops
        raise _Rejected("bad_record", where, f"image path {relative!r}: {err}") from err
    if not inside:
        raise _Rejected("unsafe_path", where, relative)
    return PurePosixPath(relative).as_posix(), path


def _decode(key: str, source: bytes | Path) -> Image.Image:
    """Decode an image, rejecting the record when the bytes are not a readable image."""
    try:
        return load_image(source)
    except ImageDecodeError as err:
        raise _Rejected("corrupt_image", key, str(err)) from err


def _parse_json(raw: bytes, where: str) -> dict:
    """A JSON object from UTF-8 bytes; bad bytes and non-objects reject the record."""
    try:
        text = raw.decode("utf-8").lstrip("\ufeff")
    except UnicodeDecodeError as err:
        raise _Rejected("bad_encoding", where, str(err)) from err
    try:
        obj = json.loads(text)
    except json.JSONDecodeError as err:
        raise _Rejected("bad_json", where, str(err)) from err
    if not isinstance(obj, dict):
        raise _Rejected("bad_json", where, "not a JSON object")
    return obj


# ------------------------------------------------------------------------------------------- folder and csv


def _file_sample(obj: dict, root: Path, where: str, split: str | None) -> Sample | None:
    """A folder/CSV record, parsed into a dict, as a Sample; None when it belongs to another split."""
    record_split = _clean_split(obj.get("split"), where)
    if split is not None and record_split != split:
        return None
    key, path = _image_path(root, obj.get("image"), where)
    texts = _require_texts(_clean_texts(_caption_values(obj)), key)
    labels = _clean_labels(obj.get("labels"), key)
    facets = _clean_facets(obj.get("facets"), key)
    if not path.is_file():
        raise _Rejected("missing_image", key, str(path))
    image = _decode(key, path)
    return Sample(key, image, texts, labels, record_split, _clean_group(obj.get("group"), key), facets)


def _read_folder(captions: Path, split: str | None) -> Iterator[_Record]:
    """Records of `captions.jsonl`, one JSON object per non-blank line; image paths relative to its folder."""
    root = captions.parent.resolve()
    with captions.open("rb") as lines:
        for number, raw in enumerate(lines, 1):
            if raw.strip():
                record = _attempt(_jsonl_sample, raw, root, f"{captions.name}:{number}", split)
                if record is not None:
                    yield record


def _jsonl_sample(raw: bytes, root: Path, where: str, split: str | None) -> Sample | None:
    """One captions.jsonl line as a Sample."""
    return _file_sample(_parse_json(raw, where), root, where, split)


def _jsonl_objects(captions: Path) -> Iterator[dict]:
    """The parseable JSON objects of a captions.jsonl, bad lines left out silently."""
    with captions.open("rb") as lines:
        for raw in lines:
            try:
                yield _parse_json(raw, "")
            except _Rejected:
                continue


def _read_csv(path: Path, split: str | None) -> Iterator[_Record]:
    """Records of a CSV file with columns image, text, optional split, group and label_<name>."""
    root = path.parent.resolve()
    for where, row in _csv_lines(path):
        record = row if isinstance(row, _Rejected) else _attempt(_csv_sample, row, root, where, split)
        if record is not None:
            yield record


def _csv_lines(path: Path) -> Iterator[tuple[str, dict | _Rejected]]:
    """(location, row) pairs; undecodable bytes stay as surrogates so one bad row does not stop the file."""
    with path.open(encoding="utf-8-sig", errors="surrogateescape", newline="") as stream:
        reader = csv.DictReader(stream)
        missing = {"image", "text"} - set(reader.fieldnames or ())
        if missing:
            raise DataQualityError(
                f"{path} lacks the column(s) {sorted(missing)}; it has {reader.fieldnames}"
            )
        while True:
            try:
                row = next(reader)
            except StopIteration:
                return
            except csv.Error as err:
                row = _Rejected("bad_csv", f"{path.name}:{reader.line_num}", str(err))
            yield f"{path.name}:{reader.line_num}", row


def _csv_sample(row: dict, root: Path, where: str, split: str | None) -> Sample | None:
    """One CSV row as a Sample."""
    return _file_sample(_csv_record(row, where), root, where, split)


def _csv_record(row: dict, where: str) -> dict:
    """A CSV row in the captions.jsonl record shape."""
    cells = [value for value in row.values() if isinstance(value, str)]
    if any(has_surrogates(cell) for cell in cells):
        raise _Rejected("bad_encoding", where)
    return {
        "image": row.get("image"),
        "text": (row.get("text") or "").split(CSV_CAPTION_SEPARATOR),
        "labels": _prefixed_columns(row, CSV_LABEL_PREFIX),
        "facets": _prefixed_columns(row, CSV_FACET_PREFIX),
        "split": row.get("split"),
        "group": row.get("group"),
    }


def _prefixed_columns(row: dict, prefix: str) -> dict:
    """The non-empty cells of the columns named `<prefix><name>`, keyed by name."""
    return {
        name[len(prefix) :]: value
        for name, value in row.items()
        if isinstance(name, str) and name.startswith(prefix) and value
    }


def _csv_rows(path: Path) -> Iterator[dict]:
    """The readable rows of a CSV file, as plain dicts."""
    for _, row in _csv_lines(path):
        if not isinstance(row, _Rejected):
            yield row


def has_surrogates(text: str) -> bool:
    """True when `text` holds UTF-16 surrogate code points: escapes left by bytes that were not UTF-8, or lone
    surrogates from a JSON `\\uD800` escape; neither is valid Unicode nor encodable as UTF-8."""
    try:
        text.encode("utf-8")
    except UnicodeEncodeError:
        return True
    return False


# ---------------------------------------------------------------------------------------------- webdataset


class _ShardErrors:
    """Collects the exceptions webdataset hands to its handlers while one shard is read."""

    def __init__(self, url: str):
        self.url = url
        self.shard: list[Exception] = []  # opening or reading the tar stream failed
        self.members: list[Exception] = []  # a member could not be grouped into a sample
        self.reported_shard = False

    def on_shard_error(self, exn: Exception) -> bool:
        """webdataset handler for url_opener / tar_file_expander: note it and keep going."""
        self.shard.append(exn)
        return True

    def on_member_error(self, exn: Exception) -> bool:
        """webdataset handler for group_by_keys: note it and keep going."""
        self.members.append(exn)
        return True

    def drain(self) -> Iterator[_Rejected]:
        """Rejections for the errors noted so far; a broken shard counts once however often it failed."""
        for exn in self.members:
            yield _Rejected("bad_member", self.url, _first_arg(exn))
        for exn in self.shard:
            if self.reported_shard:
                logger.debug("further error in %s: %s", self.url, exn)
            else:
                self.reported_shard = True
                yield _Rejected("unreadable_shard", self.url, _first_arg(exn))
        self.members.clear()
        self.shard.clear()


def _first_arg(exn: Exception) -> str:
    """The message of an exception webdataset re-raised with streams and URLs appended to its args."""
    message = exn.args[0] if exn.args and isinstance(exn.args[0], str) else exn
    return f"{type(exn).__name__}: {message}"


def _read_shards(urls: Iterable[str], split: str | None) -> Iterator[_Record]:
    """Records of WebDataset shards, one shard after the other."""
    for url in urls:
        errors = _ShardErrors(url)
        for raw in _shard_members(url, errors):
            yield from errors.drain()
            record = _attempt(_shard_sample, raw, split)
            if record is not None:
                yield record
        yield from errors.drain()


def _shard_members(
    url: str, errors: _ShardErrors, wanted: Callable[[str], bool] | None = None
) -> Iterator[dict]:
    """One shard as webdataset dicts {"__key__", "__url__", suffix: bytes}, one sample in memory at a time."""
    from webdataset import tariterators  # the webdataset package import pulls in torch when it is installed

    source = {"url": url}
    try:
        streams = tariterators.url_opener([source], handler=errors.on_shard_error)
        files = tariterators.tar_file_expander(streams, handler=errors.on_shard_error, select_files=wanted)
        yield from tariterators.group_by_keys(files, handler=errors.on_member_error)
    finally:
        if source.get("stream") is not None:
            source["stream"].close()


def _shard_sample(raw: dict, split: str | None) -> Sample | None:
    """One shard sample (KEY.jpg|png|... with KEY.txt and/or KEY.json) as a Sample."""
    key = raw["__key__"]
    obj = _parse_json(raw["json"], key) if "json" in raw else {}
    record_split = _clean_split(obj.get("split"), key)
    if split is not None and record_split != split:
        return None
    texts = _require_texts(_clean_texts(_shard_caption(raw, key) + _caption_values(obj)), key)
    labels = _clean_labels(obj.get("labels"), key)
    facets = _clean_facets(obj.get("facets"), key)
    image_bytes = next((raw[suffix] for suffix in SHARD_IMAGE_SUFFIXES if suffix in raw), None)
    if image_bytes is None:
        raise _Rejected("missing_image", key, raw.get("__url__", ""))
    image = _decode(key, image_bytes)
    return Sample(key, image, texts, labels, record_split, _clean_group(obj.get("group"), key), facets)


def _shard_caption(raw: dict, key: str) -> list[str]:
    """The KEY.txt caption, if the sample has one."""
    if "txt" not in raw:
        return []
    try:
        return [raw["txt"].decode("utf-8")]
    except UnicodeDecodeError as err:
        raise _Rejected("bad_encoding", key, str(err)) from err


def _shard_metadata(urls: Iterable[str]) -> Iterator[dict]:
    """The parseable KEY.json objects of the shards, read without touching image bytes."""
    for url in urls:
        for raw in _shard_members(url, _ShardErrors(url), wanted=lambda name: name.endswith(".json")):
            try:
                yield _parse_json(raw["json"], "") if "json" in raw else {}
            except _Rejected:
                continue
