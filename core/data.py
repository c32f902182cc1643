"""Image-text data sets on disk: readers for a folder with `captions.jsonl`, a CSV file and WebDataset shards.
Each record is parsed once, into a `Record` whose image is not decoded yet, then decoded into a `Sample`; every bad
record is counted by reason in `BadRecords` and skipped, never fatal.

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


@dataclass(frozen=True, slots=True)  # slots: a streamed folder's million records stay small
class Record:
    """A parsed record, its image not decoded yet: what a Sample holds, the image as a file or encoded bytes."""

    key: str
    image: Path | bytes  # the image file (folder/csv) or the encoded bytes of a shard member (webdataset)
    texts: tuple[str, ...]
    labels: dict[str, str]
    split: str | None
    group: str
    facets: dict[str, str]

    def to_sample(self) -> Sample:
        """The record with its image decoded; RejectedRecord("corrupt_image") when it is not a readable image."""
        try:
            image = load_image(self.image)
        except ImageDecodeError as err:
            raise RejectedRecord("corrupt_image", self.key, str(err)) from err
        return Sample(self.key, image, list(self.texts), self.labels, self.split, self.group, self.facets)


class RejectedRecord(Exception):
    """A record that cannot become a Sample; `reason` is the name it is counted under in BadRecords."""

    def __init__(self, reason: str, key: str, detail: str = ""):
        super().__init__(f"{reason}: {key}")
        self.reason, self.key, self.detail = reason, key, detail


@dataclass(frozen=True)
class DataSource:
    """A data source after dispatch: a captions file (folder or csv) or a list of shard URLs (webdataset)."""

    kind: str  # "folder" | "csv" | "webdataset"
    path: Path | None = None
    urls: tuple[str, ...] = ()


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

    def reject(self, rejected: RejectedRecord) -> None:
        """Count one record as seen and skipped under its rejection's reason."""
        self.seen += 1
        self.add(rejected.reason, rejected.key, rejected.detail)

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


# ---------------------------------------------------------------------------------------------- public API


def iter_samples(
    source: str | Path | list, split: str | None = None, bad: BadRecords | None = None
) -> Iterator[Sample]:
    """Stream the samples of a folder, CSV or WebDataset source; bad records are counted in `bad`, skipped."""
    if split is not None and split not in SPLITS:
        raise ValueError(f"split must be one of {SPLITS} or None, got {split!r}")
    bad = bad if bad is not None else BadRecords()
    keys: set[str] = set()
    for record in read_records(resolve_source(source), split, bad):
        try:
            sample = record.to_sample()
        except RejectedRecord as rejected:
            bad.add(rejected.reason, rejected.key, rejected.detail)
            continue
        if sample.key in keys:
            bad.add("duplicate_key", sample.key)
        else:
            keys.add(sample.key)
            yield sample


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
    resolved = resolve_source(source)
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
        except RejectedRecord:
            continue
    return found - {None}


def fingerprint(source: str | Path | list) -> str:
    """sha256 over the captions file's bytes (folder/csv) or the shard list with file sizes (webdataset)."""
    resolved = resolve_source(source)
    digest = hashlib.sha256(resolved.kind.encode() + b"\n")
    if resolved.path is not None:
        with resolved.path.open("rb") as captions:
            for chunk in iter(lambda: captions.read(1 << 20), b""):
                digest.update(chunk)
    for url in resolved.urls:
        digest.update(f"{url}\t{_file_size(url)}\n".encode())
    return digest.hexdigest()


# ---------------------------------------------------------------------------------------------- dispatch


def resolve_source(source: str | Path | list) -> DataSource:
    """A --data argument as a DataSource, its format told from its shape: directory contents, suffix, shard pattern."""
    if isinstance(source, (list, tuple)):
        return _resolve_shard_list(source)
    text = os.fspath(source)
    if _looks_like_shards(text):
        return DataSource("webdataset", urls=tuple(_expand_shards(text)))
    path = Path(text)
    if path.is_dir():
        return _resolve_dir(path)
    if path.suffix == ".csv":
        return DataSource("csv", path=path)
    if path.suffix == ".jsonl":
        return DataSource("folder", path=path)
    if not path.exists():
        raise FileNotFoundError(f"data source {path} does not exist")
    raise ValueError(
        f"cannot tell the format of {path}: expected a directory, a .csv/.jsonl file or .tar shards"
    )


def _resolve_dir(path: Path) -> DataSource:
    """A directory: captions.jsonl (folder) before captions.csv before *.tar shards."""
    if (path / CAPTIONS_JSONL).is_file():
        return DataSource("folder", path=path / CAPTIONS_JSONL)
    if (path / CAPTIONS_CSV).is_file():
        return DataSource("csv", path=path / CAPTIONS_CSV)
    shards = sorted(str(p) for p in path.iterdir() if p.name.endswith(SHARD_SUFFIXES))
    if shards:
        return DataSource("webdataset", urls=tuple(shards))
    raise FileNotFoundError(f"{path} holds no {CAPTIONS_JSONL}, {CAPTIONS_CSV} or .tar shards")


def _resolve_shard_list(sources: list | tuple) -> DataSource:
    """A list of shard paths, patterns or shard directories, read as one WebDataset source."""
    urls: list[str] = []
    for item in sources:
        part = resolve_source(item)
        if part.kind != "webdataset":
            raise ValueError(f"a list of sources must name WebDataset shards only; {item} is {part.kind}")
        urls.extend(part.urls)
    return DataSource("webdataset", urls=tuple(urls))


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


def read_records(source: DataSource, split: str | None, bad: BadRecords) -> Iterator[Record]:
    """The usable records of a source in file order, images undecoded; records of other splits are left out and
    rejected ones counted in `bad` (duplicate keys are left to the caller)."""
    if source.kind == "folder":
        return _read_folder(source.path, split, bad)
    if source.kind == "csv":
        return _read_csv(source.path, split, bad)
    return (record for url in source.urls for _, record in shard_records(url, split, bad))


def _accepted(bad: BadRecords, parse: Callable[..., Record | None], *args) -> Record | None:
    """`parse(*args)`, counted in `bad` as seen (or as skipped when rejected); None for another split's record."""
    try:
        record = parse(*args)
    except RejectedRecord as rejected:
        bad.reject(rejected)
        return None
    if record is not None:  # another split's record is not seen
        bad.seen += 1
    return record


# ---------------------------------------------------------------------------------------------- field rules


def _clean_split(value, key: str) -> str | None:
    """Normalise a record's split ("" and None mean no split); unknown names reject the record."""
    if value is None or (isinstance(value, str) and not value.strip()):
        return None
    if not isinstance(value, str):
        raise RejectedRecord("bad_split", key, repr(value))
    name = SPLIT_ALIASES.get(value.strip().lower(), value.strip().lower())
    if name not in SPLITS:
        raise RejectedRecord("bad_split", key, repr(value))
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
        raise RejectedRecord("empty_caption", key)
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
        raise RejectedRecord(reason, key, repr(value)[:80])
    strings = {}
    for name, raw in value.items():
        if not isinstance(raw, (str, int, float)) or isinstance(raw, bool):
            raise RejectedRecord(reason, key, f"{name}={raw!r}"[:80])
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
        raise RejectedRecord("bad_record", where, "no image path")
    relative = value.strip()
    as_windows = PureWindowsPath(relative)  # splits on both separators, sees drives and roots
    if as_windows.anchor or ".." in as_windows.parts:
        raise RejectedRecord("unsafe_path", where, relative)
    path = root / relative
    try:
        inside = path.resolve().is_relative_to(root)  # False for a symlink pointing outside the data set
    except (OSError, ValueError) as err:  # NUL bytes, symlink loops
        raise RejectedRecord("bad_record", where, f"image path {relative!r}: {err}") from err
    if not inside:
        raise RejectedRecord("unsafe_path", where, relative)
    return PurePosixPath(relative).as_posix(), path


def _parse_json(raw: bytes, where: str) -> dict:
    """A JSON object from UTF-8 bytes; bad bytes and non-objects reject the record."""
    try:
        text = raw.decode("utf-8").lstrip("\ufeff")
    except UnicodeDecodeError as err:
        raise RejectedRecord("bad_encoding", where, str(err)) from err
    try:
        obj = json.loads(text)
    except json.JSONDecodeError as err:
        raise RejectedRecord("bad_json", where, str(err)) from err
    if not isinstance(obj, dict):
        raise RejectedRecord("bad_json", where, "not a JSON object")
    return obj


# ------------------------------------------------------------------------------------------- folder and csv


def _file_record(obj: dict, root: Path, where: str, split: str | None) -> Record | None:
    """A folder/CSV record, parsed into a dict, as a Record; None when it belongs to another split."""
    record_split = _clean_split(obj.get("split"), where)
    if split is not None and record_split != split:
        return None
    key, path = _image_path(root, obj.get("image"), where)
    texts = _require_texts(_clean_texts(_caption_values(obj)), key)
    labels = _clean_labels(obj.get("labels"), key)
    facets = _clean_facets(obj.get("facets"), key)
    if not path.is_file():
        raise RejectedRecord("missing_image", key, str(path))
    return Record(key, path, tuple(texts), labels, record_split, _clean_group(obj.get("group"), key), facets)


def _read_folder(captions: Path, split: str | None, bad: BadRecords) -> Iterator[Record]:
    """Records of `captions.jsonl`, one JSON object per non-blank line; image paths relative to its folder."""
    root = captions.parent.resolve()
    with captions.open("rb") as lines:
        for number, raw in enumerate(lines, 1):
            if raw.strip():
                record = _accepted(bad, parse_jsonl_line, raw, root, f"{captions.name}:{number}", split)
                if record is not None:
                    yield record


def parse_jsonl_line(raw: bytes, root: Path, where: str, split: str | None = None) -> Record | None:
    """One captions.jsonl line (image path relative to `root`) as a Record; None when it is of another split."""
    return _file_record(_parse_json(raw, where), root, where, split)


def _jsonl_objects(captions: Path) -> Iterator[dict]:
    """The parseable JSON objects of a captions.jsonl, bad lines left out silently."""
    with captions.open("rb") as lines:
        for raw in lines:
            try:
                yield _parse_json(raw, "")
            except RejectedRecord:
                continue


def _read_csv(path: Path, split: str | None, bad: BadRecords) -> Iterator[Record]:
    """Records of a CSV file with columns image, text, optional split, group, label_<name> and facet_<name>."""
    root = path.parent.resolve()
    for where, row in _csv_lines(path):
        if isinstance(row, RejectedRecord):
            bad.reject(row)
            continue
        record = _accepted(bad, parse_csv_row, row, root, where, split)
        if record is not None:
            yield record


def _csv_lines(path: Path) -> Iterator[tuple[str, dict | RejectedRecord]]:
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
                row = RejectedRecord("bad_csv", f"{path.name}:{reader.line_num}", str(err))
            yield f"{path.name}:{reader.line_num}", row


def parse_csv_row(row: dict, root: Path, where: str, split: str | None = None) -> Record | None:
    """One CSV row (csv.DictReader's) as a Record; None when it is of another split."""
    return _file_record(_csv_record(row, where), root, where, split)


def _csv_record(row: dict, where: str) -> dict:
    """A CSV row in the captions.jsonl record shape."""
    cells = [value for value in row.values() if isinstance(value, str)]
    if any(has_surrogates(cell) for cell in cells):
        raise RejectedRecord("bad_encoding", where)
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
        if not isinstance(row, RejectedRecord):
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

    def drain(self) -> Iterator[RejectedRecord]:
        """Rejections for the errors noted so far; a broken shard counts once however often it failed."""
        for exn in self.members:
            yield RejectedRecord("bad_member", self.url, _first_arg(exn))
        for exn in self.shard:
            if self.reported_shard:
                logger.debug("further error in %s: %s", self.url, exn)
            else:
                self.reported_shard = True
                yield RejectedRecord("unreadable_shard", self.url, _first_arg(exn))
        self.members.clear()
        self.shard.clear()


def _first_arg(exn: Exception) -> str:
    """The message of an exception webdataset re-raised with streams and URLs appended to its args."""
    message = exn.args[0] if exn.args and isinstance(exn.args[0], str) else exn
    return f"{type(exn).__name__}: {message}"


def shard_records(url: str, split: str | None, bad: BadRecords) -> Iterator[tuple[int, Record]]:
    """(index among the shard's samples, record) of one WebDataset shard in file order, images undecoded; records
    of other splits are left out, rejected ones, broken members and an unreadable shard counted in `bad`."""
    errors = _ShardErrors(url)
    for index, raw in enumerate(_shard_members(url, errors)):
        _reject_all(errors.drain(), bad)
        record = _accepted(bad, parse_shard_sample, raw, split)
        if record is not None:
            yield index, record
    _reject_all(errors.drain(), bad)


def _reject_all(rejections: Iterable[RejectedRecord], bad: BadRecords) -> None:
    """Count each rejection in `bad`."""
    for rejected in rejections:
        bad.reject(rejected)


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


def parse_shard_sample(raw: dict, split: str | None = None) -> Record | None:
    """One webdataset sample dict (KEY.jpg|png|... with KEY.txt and/or KEY.json) as a Record; None when it is
    of another split."""
    key = raw["__key__"]
    obj = _parse_json(raw["json"], key) if "json" in raw else {}
    record_split = _clean_split(obj.get("split"), key)
    if split is not None and record_split != split:
        return None
    texts = _require_texts(_clean_texts(_shard_caption(raw, key) + _caption_values(obj)), key)
    labels = _clean_labels(obj.get("labels"), key)
    facets = _clean_facets(obj.get("facets"), key)
    image = next((raw[suffix] for suffix in SHARD_IMAGE_SUFFIXES if suffix in raw), None)
    if image is None:
        raise RejectedRecord("missing_image", key, raw.get("__url__", ""))
    return Record(key, image, tuple(texts), labels, record_split, _clean_group(obj.get("group"), key), facets)


def _shard_caption(raw: dict, key: str) -> list[str]:
    """The KEY.txt caption, if the sample has one."""
    if "txt" not in raw:
        return []
    try:
        return [raw["txt"].decode("utf-8")]
    except UnicodeDecodeError as err:
        raise RejectedRecord("bad_encoding", key, str(err)) from err


def _shard_metadata(urls: Iterable[str]) -> Iterator[dict]:
    """The parseable KEY.json objects of the shards, read without touching image bytes."""
    for url in urls:
        for raw in _shard_members(url, _ShardErrors(url), wanted=lambda name: name.endswith(".json")):
            try:
                yield _parse_json(raw["json"], "") if "json" in raw else {}
            except RejectedRecord:
                continue
