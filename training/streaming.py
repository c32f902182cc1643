"""Streamed training batches: DataLoader workers read a folder, a CSV or WebDataset shards and decode, augment and
tokenize on the fly, in an order that is a pure function of (seed, data), so resume and DDP stay exact without
the data set in memory (`training/batches.py` caches all of it; `choose_data_mode` picks one of the two).

The global batch. Each epoch the shards (tar files; a folder's or a CSV's records in pseudo-shards) are dealt to
S streams (`StreamConfig.streams`, at most the number of shards and the batch size). Stream s reads its shards
through its own shuffle buffer and supplies rows [B·s//S, B·(s+1)//S) of every global batch of B rows. With S a
multiple of the world size W, rank r reads only streams [r·S/W, (r+1)·S/W), which are exactly the rows
[r·B/W, (r+1)·B/W) of `BatchSampler`'s convention, and its DataLoader workers share those streams in contiguous
blocks. Streams read disjoint shards, so no two ranks see a sample in the same step. The batches depend on the
seed, the data, B, S, the buffer and pseudo-shard sizes; never on the number of workers or ranks.

Every random choice is seeded by its place: the shard order by (seed, epoch), a stream's shuffle buffer by
(seed, epoch, stream, pass), a sample's caption, crop and label-prompt draws by (seed, epoch, shard, index in the
shard, pass). A run resumed at step k deals the same shards and replays each stream's buffer over its first
k·quota records, raw (tar bytes read, no image decoded, nothing tokenized), then continues.

An epoch is num_samples // B steps. A stream whose shards run out first starts another pass over them (a few
repeats); what a stream has left at the end of the epoch is not seen in it. A record whose image fails to decode
takes the row of the nearest decodable record of its stream's step: decided within one step, so a resumed run
makes the same choice without decoding anything before its first step.
"""

from __future__ import annotations

import dataclasses
import io
import itertools
import json
import logging
import random
from collections.abc import Callable, Iterable, Iterator
from pathlib import Path
from typing import NamedTuple

import numpy as np
import torch
from PIL import Image, ImageOps

from core.data import (
    BadRecords,
    DataQualityError,
    DataSource,
    Record,
    read_records,
    resolve_source,
    shard_records,
)
from core.preprocess import (
    ImageDecodeError,
    PreprocessConfig,
    alpha_channel,
    decode_for_model,
    decode_with_alpha,
    normalize,
    open_image,
    resize,
    resize_alpha,
)
from core.tokenizer import TextTokenizer
from training.batches import AugmentConfig

log = logging.getLogger(__name__)

CACHE_BYTES_PER_VALUE = 2  # the cache holds float16 pixels (training/batches.py)
SIZES_FILE = "sizes.json"  # open_clip's per-shard sample counts beside the shards: {"00000.tar": 10000, ...}
# Namespaces of the seed sequences, so that no two kinds of draw share a stream of random numbers.
_DEAL, _BUFFER, _SAMPLE, _PSEUDO_SHARDS = range(4)
_DRAWS = 7  # per sample: [0] caption, [1:5] crop box, [5] mirror, [6] label prompt


def cache_bytes(num_samples: int, image_size: int) -> int:
    """Bytes of the cache's pixels for `num_samples` images (float16, 3 channels); captions are extra but small."""
    return num_samples * 3 * image_size * image_size * CACHE_BYTES_PER_VALUE


def choose_data_mode(num_samples: int, image_size: int, budget_bytes: int) -> str:
    """"cache" when the preprocessed pixels fit `budget_bytes`, else "stream"."""
    return "cache" if cache_bytes(num_samples, image_size) <= budget_bytes else "stream"


@dataclasses.dataclass(frozen=True)
class StreamConfig:
    """How samples are read. `workers` changes only the speed; the others also change which batches come."""

    workers: int = 2  # DataLoader worker processes per rank; 0 reads in the training process
    streams: int = 8  # S: also the most ranks × workers that can read at once; a multiple of the world size
    shuffle_buffer: int = 1000  # records per stream's buffer; held raw (encoded bytes or paths)
    pseudo_shard_size: int = 1000  # folder/CSV records per pseudo-shard (at most)

    def __post_init__(self):
        if self.workers < 0:
            raise ValueError(f"workers must be >= 0, got {self.workers}")
        for name in ("streams", "shuffle_buffer", "pseudo_shard_size"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be >= 1, got {getattr(self, name)}")


@dataclasses.dataclass(frozen=True)
class LabelPrompt:
    """A sample's label prompt: its `label_set` label in `template` ("a {} emoji"); None without that label.

    A class rather than a closure: DataLoader workers started by spawn or forkserver receive it pickled."""

    template: str
    label_set: str

    def __call__(self, labels: dict[str, str]) -> str | None:
        label = labels.get(self.label_set)
        return self.template.format(label) if label else None


class Rows(NamedTuple):
    """Some rows of a global batch."""

    pixels: torch.Tensor  # (b, 3, H, W) float32
    input_ids: torch.Tensor  # (b, L) int64
    label_prompt: torch.Tensor  # (b,) bool: the row's text is its label prompt
    alpha: torch.Tensor | None = None  # (b, 1, H, W) uint8 opacity of the pixels, kept for background augmentation


def cat_rows(parts: list[Rows]) -> Rows:
    if len(parts) == 1:
        return parts[0]
    return Rows(*(None if column[0] is None else torch.cat(column) for column in zip(*parts, strict=True)))


# ---------------------------------------------------------------------------------------------- records


@dataclasses.dataclass(frozen=True, slots=True)  # slots: a folder's million records stay small
class PlacedRecord:
    """A record (core.data's, not decoded) at its place: (shard, index) names it for its random draws, whatever
    order it is read in."""

    record: Record
    shard: int
    index: int  # position among the shard's records


@dataclasses.dataclass(frozen=True)
class RecordShard:
    """A pseudo-shard: some of a folder's or CSV's records (paths and captions, no pixels)."""

    records: tuple[PlacedRecord, ...]

    @property
    def size(self) -> int:
        return len(self.records)

    def read(self, bad: BadRecords) -> Iterator[PlacedRecord]:
        return iter(self.records)


@dataclasses.dataclass(frozen=True)
class TarShard:
    """A WebDataset shard; `size` is its record count (counted, listed in sizes.json, or assumed)."""

    url: str
    number: int
    split: str | None
    size: int

    def read(self, bad: BadRecords) -> Iterator[PlacedRecord]:
        """Its usable records in file order, image bytes read but not decoded; bad ones counted in `bad`."""
        for index, record in shard_records(self.url, self.split, bad):
            yield PlacedRecord(record, self.number, index)


def file_records(source: DataSource, split: str | None, bad: BadRecords) -> list[Record]:
    """Every usable record of a folder or CSV source, duplicates of a key left out (as `iter_samples`)."""
    found, keys = [], set()
    for record in read_records(source, split, bad):
        if record.key in keys:
            bad.add("duplicate_key", record.key)
            continue
        keys.add(record.key)
        found.append(record)
    return found


def _usable_records(source: DataSource, split: str | None, bad: BadRecords) -> Iterator[Record]:
    """A source's usable records, undecoded: a shard set's all of them, a folder's or CSV's as `file_records`."""
    if source.kind == "webdataset":
        return (placed.record for number, url in enumerate(source.urls)
                for placed in TarShard(url, number, split, 0).read(bad))
    return iter(file_records(source, split, bad))


@dataclasses.dataclass(frozen=True, slots=True)
class Entry:
    """A record's captions and labels, without its image."""

    texts: tuple[str, ...]
    labels: dict[str, str]


def catalogue(source: str | Path | list, split: str | None, bad: BadRecords) -> list[Entry]:
    """Captions and labels of every usable record of `source`, no image decoded (a tar shard's bytes are read):
    what tokenizer training, label sets and the choice of data mode need before streaming."""
    return [Entry(record.texts, record.labels) for record in _usable_records(resolve_source(source), split, bad)]


def record_alphas(source: str | Path | list, split: str | None, preprocess: PreprocessConfig) -> dict[str, np.ndarray]:
    """Each record's opacity at the model's input (`resize_alpha`, (H, W) uint8) by key, the first decodable record
    of a key (as `core.data` keeps it): the samples `core.data` decodes are composited on white, so the cache's
    background augmentation reads their alpha here."""
    alphas = {}
    for record in _usable_records(resolve_source(source), split, BadRecords()):
        if record.key in alphas:
            continue
        try:
            alphas[record.key] = resize_alpha(alpha_channel(open_image(_image_source(record))), preprocess)
        except ImageDecodeError:
            continue
    return alphas


def pseudo_shards(records: list[Record], count: int, seed: int) -> list[RecordShard]:
    """`count` near-equal pseudo-shards of a seeded permutation of the records (fixed for the run, as files are):
    a folder's records are often grouped by class, which a shuffle buffer alone would not mix."""
    order = np.random.default_rng(_seed_sequence(_PSEUDO_SHARDS, seed)).permutation(len(records))
    return [RecordShard(tuple(PlacedRecord(records[i], shard, index) for index, i in enumerate(part.tolist())))
            for shard, part in enumerate(np.array_split(order, count))]


def tar_shards(urls: tuple[str, ...], split: str | None, num_samples: int | None,
               bad: BadRecords) -> list[TarShard]:
    """The shards with their sizes: spread from an explicit total, listed in sizes.json (whole shards only), or
    counted by reading each shard's records without decoding an image."""
    if num_samples is not None:
        sizes = spread(num_samples, len(urls))
    else:
        sizes = (listed_sizes(urls) if split is None else None) or [
            sum(1 for _ in TarShard(url, i, split, 0).read(bad)) for i, url in enumerate(urls)]
    return [TarShard(url, i, split, size) for i, (url, size) in enumerate(zip(urls, sizes, strict=True))]


def listed_sizes(urls: tuple[str, ...]) -> list[int] | None:
    """Per-shard counts from the sizes.json beside local shards (open_clip's convention); None without one."""
    listing = Path(urls[0]).parent / SIZES_FILE
    if "://" in urls[0] or not listing.is_file():
        return None
    sizes = json.loads(listing.read_text())
    names = [Path(url).name for url in urls]
    return [int(sizes[name]) for name in names] if all(name in sizes for name in names) else None


def spread(total: int, parts: int) -> list[int]:
    """`total` split into `parts` near-equal integers."""
    return [total * (i + 1) // parts - total * i // parts for i in range(parts)]


# ---------------------------------------------------------------------------------------------- order


def _seed_sequence(*parts: int) -> np.random.SeedSequence:
    return np.random.SeedSequence([int(p) % (1 << 64) for p in parts])


def _python_rng(*parts: int) -> random.Random:
    return random.Random(int(_seed_sequence(*parts).generate_state(1, np.uint64)[0]))


def stream_quotas(global_batch: int, streams: int) -> tuple[int, ...]:
    """Rows each stream supplies to every global batch: stream s holds rows [B·s//S, B·(s+1)//S)."""
    return tuple(spread(global_batch, streams))


def rank_streams(streams: int, rank: int, world_size: int) -> range:
    """The streams rank `rank` reads: its rows [r·B/W, (r+1)·B/W) of the global batch when S is a multiple of W."""
    if streams % world_size:
        raise ValueError(f"{streams} streams cannot be shared by {world_size} ranks: set StreamConfig.streams to a "
                         f"multiple of the world size (and at most the {streams} shards or the batch size)")
    if not 0 <= rank < world_size:
        raise ValueError(f"rank {rank} is outside a world of {world_size}")
    return range(rank * streams // world_size, (rank + 1) * streams // world_size)


def worker_streams(streams: range, worker: int, num_workers: int) -> range:
    """A worker's contiguous block of its rank's streams, so workers' rows in worker order are in stream order."""
    return streams[worker * len(streams) // num_workers:(worker + 1) * len(streams) // num_workers]


def deal_shards(sizes: list[int], quotas: tuple[int, ...], seed: int, epoch: int) -> list[list[int]]:
    """Shard numbers of each stream in one epoch: the shards in a (seed, epoch) order, each to the stream with the
    fewest records per row of quota so far (ties to the lower stream), which evens out unequal shards."""
    order = np.random.default_rng(_seed_sequence(_DEAL, seed, epoch)).permutation(len(sizes))
    dealt: list[list[int]] = [[] for _ in quotas]
    load = [0] * len(quotas)
    for shard in order.tolist():
        stream = min(range(len(quotas)), key=lambda s: (load[s] / quotas[s], s))
        dealt[stream].append(shard)
        load[stream] += sizes[shard]
    return dealt


def shuffle_buffer(items: Iterable, size: int, rng: random.Random) -> Iterator:
    """The items in a random order through a buffer of `size`: once it is full each new item takes the place of a
    random one, which is yielded (webdataset's `shuffle`, seeded); the rest in random order at the end."""
    buffer = []
    for item in items:
        if len(buffer) < size:
            buffer.append(item)
            continue
        slot = rng.randrange(size)
        yield buffer[slot]
        buffer[slot] = item
    rng.shuffle(buffer)
    yield from buffer


@dataclasses.dataclass(frozen=True)
class StreamPlan:
    """Which records make up every global batch: the shards, each stream's rows per step, the shuffles."""

    shards: tuple[RecordShard | TarShard, ...]
    quotas: tuple[int, ...]  # rows per step of each stream
    steps_per_epoch: int
    seed: int
    shuffle_buffer: int

    def deal(self, epoch: int) -> list[list[int]]:
        return deal_shards([shard.size for shard in self.shards], self.quotas, self.seed, epoch)

    def records(self, stream: int, epoch: int, shard_numbers: list[int],
                bad: BadRecords) -> Iterator[tuple[int, PlacedRecord]]:
        """(pass, record) of one stream in one epoch, without end: its shards through its shuffle buffer, then
        again with a new buffer seed when it needs more than they hold."""
        for pass_ in itertools.count():
            rng = _python_rng(_BUFFER, self.seed, epoch, stream, pass_)
            records = (record for number in shard_numbers for record in self.shards[number].read(bad))
            emitted = 0
            for record in shuffle_buffer(records, self.shuffle_buffer, rng):
                emitted += 1
                yield pass_, record
            if not emitted:
                raise DataQualityError(f"stream {stream} has no usable record in epoch {epoch} "
                                       f"(shards {shard_numbers})")


# ---------------------------------------------------------------------------------------------- samples


def crop_box(width: int, height: int, aug: AugmentConfig, u) -> tuple[int, int, int, int]:
    """(left, top, right, bottom) of a random resized crop from 4 uniforms: `aug.crop_scale` of the image's area at
    a pixel aspect ratio in `aug.crop_ratio` (torchvision's RandomResizedCrop), placed uniformly; a side longer
    than the image's is cut to it and the other lengthened to keep the area. The cache path's crop of its square
    input, applied to the decoded image."""
    area = width * height * (aug.crop_scale[0] + (aug.crop_scale[1] - aug.crop_scale[0]) * u[0])
    log_lo, log_hi = np.log(aug.crop_ratio[0]), np.log(aug.crop_ratio[1])
    ratio = float(np.exp(log_lo + (log_hi - log_lo) * u[1]))
    crop_w, crop_h = (area * ratio) ** 0.5, (area / ratio) ** 0.5
    if crop_w > width:
        crop_w, crop_h = width, area / width
    if crop_h > height:
        crop_w, crop_h = area / height, height
    crop_w, crop_h = min(width, max(1, round(crop_w))), min(height, max(1, round(crop_h)))
    left, top = round(u[2] * (width - crop_w)), round(u[3] * (height - crop_h))
    return left, top, left + crop_w, top + crop_h


def augment_image(image: Image.Image, aug: AugmentConfig, u) -> Image.Image:
    """The random resized crop of a decoded image, mirrored when `aug.hflip` and u[4] < 0.5; u: 5 uniforms."""
    cropped = image.crop(crop_box(image.width, image.height, aug, u[:4]))
    return ImageOps.mirror(cropped) if aug.hflip and u[4] < 0.5 else cropped


def sample_draws(seed: int, epoch: int, placed: PlacedRecord, pass_: int) -> np.ndarray:
    """The uniforms one sample owns in one epoch (see _DRAWS), whatever the order it is read in."""
    return np.random.default_rng(_seed_sequence(_SAMPLE, seed, epoch, placed.shard, placed.index, pass_)).random(
        _DRAWS)


def decode(record: Record, preprocess: PreprocessConfig) -> Image.Image:
    """The record's image in RGB, decoded no larger than the model needs (JPEG draft, reduction)."""
    return decode_for_model(open_record(record), preprocess)


def open_record(record: Record) -> Image.Image:
    """The record's image opened (lazily: not decoded yet)."""
    try:
        return Image.open(_image_source(record))
    except (OSError, ValueError, Image.DecompressionBombError) as err:
        raise ImageDecodeError(f"cannot open image: {err}") from err


def _image_source(record: Record) -> io.BytesIO | Path:
    return io.BytesIO(record.image) if isinstance(record.image, bytes) else record.image


def fill_failures(rows: list) -> list:
    """Each None replaced by the nearest earlier non-None row, else the nearest later one."""
    good = [i for i, row in enumerate(rows) if row is not None]
    if not good:
        raise DataQualityError(f"none of {len(rows)} records of a step's stream could be decoded")
    return [row if row is not None else rows[max((g for g in good if g < i), default=good[0])]
            for i, row in enumerate(rows)]


@dataclasses.dataclass(frozen=True)
class SampleTransform:
    """Records → training rows: decode, random resized crop, the shared resize and normalise; one caption drawn,
    or with probability `label_prompt_prob` the label prompt of a sample that has one. With `keep_alpha` each row
    also keeps its image's opacity, cropped and resized alike (background augmentation)."""

    preprocess: PreprocessConfig
    tokenizer: TextTokenizer
    augment: AugmentConfig | None
    seed: int
    label_prompt: Callable[[dict[str, str]], str | None] | None = None
    label_prompt_prob: float = 0.0
    keep_alpha: bool = False

    def rows(self, records: list[tuple[int, PlacedRecord]], epoch: int, bad: BadRecords) -> Rows:
        """One stream's rows of one step; an undecodable record repeats the nearest decodable one's row."""
        prepared = fill_failures([self.prepare(placed, epoch, pass_, bad) for pass_, placed in records])
        pixels, alphas, texts, is_prompt = zip(*prepared, strict=True)
        return Rows(torch.from_numpy(np.stack(pixels)), torch.from_numpy(self.tokenizer.encode(list(texts))),
                    torch.tensor(is_prompt, dtype=torch.bool),
                    torch.from_numpy(np.stack(alphas))[:, None] if self.keep_alpha else None)

    def prepare(self, placed: PlacedRecord, epoch: int, pass_: int,
                bad: BadRecords) -> tuple[np.ndarray, np.ndarray | None, str, bool] | None:
        """(pixels (3, H, W) float32, opacity (H, W) uint8 or None, text, is label prompt) of one sample; None when
        its image is unusable."""
        draws, record = sample_draws(self.seed, epoch, placed, pass_), placed.record
        try:
            image, alpha = self.decode(record)
        except ImageDecodeError as err:
            bad.add("corrupt_image", record.key, str(err))
            return None
        if self.augment is not None:
            image = augment_image(image, self.augment, draws[1:6])
            alpha = augment_image(alpha, self.augment, draws[1:6]) if alpha is not None else None
        pixels = normalize(resize(image, self.preprocess), self.preprocess)
        alpha = resize_alpha(alpha, self.preprocess) if alpha is not None else None
        return (pixels, alpha, *self.text(record, draws))

    def decode(self, record: Record) -> tuple[Image.Image, Image.Image | None]:
        """The record's RGB image and, with `keep_alpha`, its opacity ("L")."""
        if self.keep_alpha:
            return decode_with_alpha(open_record(record), self.preprocess)
        return decode(record, self.preprocess), None

    def text(self, record: Record, draws: np.ndarray) -> tuple[str, bool]:
        if self.label_prompt is not None and draws[6] < self.label_prompt_prob:
            prompt = self.label_prompt(record.labels)
            if prompt is not None:
                return prompt, True
        return record.texts[int(draws[0] * len(record.texts))], False


# ---------------------------------------------------------------------------------------------- reading


def plan_steps(plan: StreamPlan, transform: SampleTransform, streams: range,
               start_step: int) -> Iterator[tuple[int, Rows]]:
    """(step, rows of `streams`) from `start_step` on, without end; the steps before it are skipped raw."""
    bad = BadRecords()
    start_epoch, first = divmod(start_step, plan.steps_per_epoch)
    for epoch in itertools.count(start_epoch):
        dealt = plan.deal(epoch)
        readers = {s: plan.records(s, epoch, dealt[s], bad) for s in streams}
        for s, reader in readers.items():
            skip = first * plan.quotas[s]
            next(itertools.islice(reader, skip, skip), None)  # resume: consume `skip` raw records
        for within in range(first, plan.steps_per_epoch):
            parts = [transform.rows(list(itertools.islice(reader, plan.quotas[s])), epoch, bad)
                     for s, reader in readers.items()]
            yield epoch * plan.steps_per_epoch + within, cat_rows(parts)
        first = 0


class _StreamDataset(torch.utils.data.IterableDataset):
    """A rank's streams from `start_step` on: one item per step and worker, (step, rows of the worker's block)."""

    def __init__(self, plan: StreamPlan, transform: SampleTransform, streams: range, start_step: int):
        super().__init__()
        self.plan, self.transform, self.streams, self.start_step = plan, transform, streams, start_step

    def __iter__(self) -> Iterator[tuple[int, Rows]]:
        worker = torch.utils.data.get_worker_info()
        mine = self.streams if worker is None else worker_streams(self.streams, worker.id, worker.num_workers)
        return plan_steps(self.plan, self.transform, mine, self.start_step)


def _as_is(item):
    return item


class _Reader:
    """One DataLoader over a rank's streams, consumed one step at a time from `start_step`.

    The DataLoader asks its workers for items in turn (in order), and every worker yields one item per step, so a
    step is the next `workers` items, in stream order."""

    def __init__(self, plan: StreamPlan, transform: SampleTransform, start_step: int, rank: int, world_size: int,
                 workers: int):
        streams = rank_streams(len(plan.quotas), rank, world_size)
        workers = min(workers, len(streams))
        loader = torch.utils.data.DataLoader(_StreamDataset(plan, transform, streams, start_step), batch_size=None,
                                             num_workers=workers, collate_fn=_as_is)
        self.iterator = iter(loader)
        self.items_per_step = max(1, workers)
        self.next_step, self.rank, self.world_size = start_step, rank, world_size

    def take(self) -> Rows:
        parts = []
        for _ in range(self.items_per_step):
            step, rows = next(self.iterator)
            if step != self.next_step:  # the loader's in-order contract, checked rather than assumed
                raise RuntimeError(f"streamed step {step} arrived when step {self.next_step} was due")
            parts.append(rows)
        self.next_step += 1
        return cat_rows(parts)


class StreamingBatches:
    """`BatchSampler`'s interface over data streamed from disk: `steps_per_epoch`, `batch(step, rank, world_size)`,
    `label_prompt_rows(step, rank, world_size)`, `alpha(step, rank, world_size)`, and `num_samples` for the summary
    (the module docstring defines the global batch).

    Steps are read in sequence: asking for any other step than the next (a resume, or another rank's share)
    starts the reading over at that step; the last step's rows are kept, so `batch` and `label_prompt_rows` of one
    step read it once. A rank reads only its own rows, so `label_prompt_rows` gives only them: in DDP gather them
    over the ranks for the global batch's."""

    def __init__(self, source: str | Path | list, preprocess: PreprocessConfig, tokenizer: TextTokenizer,
                 global_batch: int, seed: int, augment: AugmentConfig | None, *, split: str | None = None,
                 label_prompt: Callable[[dict[str, str]], str | None] | None = None, label_prompt_prob: float = 0.0,
                 num_samples: int | None = None, max_bad_fraction: float = 0.05,
                 config: StreamConfig | None = None):
        if not 0.0 <= label_prompt_prob <= 1.0:
            raise ValueError(f"label_prompt_prob must be in [0, 1], got {label_prompt_prob}")
        if label_prompt_prob and label_prompt is None:
            raise ValueError("label_prompt_prob > 0 needs a label_prompt")
        config = config or StreamConfig()
        self.bad_records = BadRecords()
        shards = self._shards(source, split, num_samples, global_batch, seed, config)
        self.bad_records.check(max_bad_fraction)
        self.num_samples = num_samples if num_samples is not None else sum(shard.size for shard in shards)
        if global_batch > self.num_samples:
            raise ValueError(f"batch size {global_batch} exceeds the {self.num_samples} training samples")
        self.global_batch, self.workers = global_batch, config.workers
        self.steps_per_epoch = self.num_samples // global_batch
        streams = min(config.streams, len(shards), global_batch)
        self.plan = StreamPlan(tuple(shards), stream_quotas(global_batch, streams), self.steps_per_epoch, seed,
                               config.shuffle_buffer)
        self.transform = SampleTransform(preprocess, tokenizer, augment, seed, label_prompt, label_prompt_prob,
                                         keep_alpha=augment is not None and augment.keeps_alpha)
        self._reader: _Reader | None = None
        self._last: tuple[tuple[int, int, int], Rows] | None = None
        log.info("streaming %d samples from %d shards in %d streams: %d steps per epoch", self.num_samples,
                 len(shards), streams, self.steps_per_epoch)

    def _shards(self, source, split, num_samples, global_batch, seed, config) -> list[RecordShard | TarShard]:
        resolved = resolve_source(source)
        if resolved.kind == "webdataset":
            return tar_shards(resolved.urls, split, num_samples, self.bad_records)
        records = file_records(resolved, split, self.bad_records)
        if not records:
            raise DataQualityError(f"no samples in {source} (split={split})")
        streams = min(config.streams, len(records), global_batch)
        per_stream = -(-len(records) // (streams * config.pseudo_shard_size))
        return pseudo_shards(records, streams * per_stream, seed)

    @property
    def streams(self) -> int:
        return len(self.plan.quotas)

    def batch(self, step: int, rank: int = 0, world_size: int = 1) -> tuple[torch.Tensor, torch.Tensor]:
        """(pixels (b, 3, H, W) float32, input_ids (b, L)) for this rank's share of step's global batch."""
        rows = self._rows(step, rank, world_size)
        return rows.pixels, rows.input_ids

    def alpha(self, step: int, rank: int = 0, world_size: int = 1) -> torch.Tensor | None:
        """(b, 1, H, W) float32 in [0, 1]: the opacity of `batch(step, rank, world_size)`'s pixels; None unless the
        augmentation keeps it (background augmentation)."""
        alpha = self._rows(step, rank, world_size).alpha
        return None if alpha is None else alpha.float() / 255

    def label_prompt_rows(self, step: int, rank: int = 0, world_size: int = 1) -> torch.Tensor:
        """(b,) bool: which rows of `batch(step, rank, world_size)` carry their label prompt instead of a caption."""
        if self._last is not None and self._last[0][0] == step and self._last[0][2] != world_size:
            raise ValueError(f"step {step} was streamed as rank {self._last[0][1]} of {self._last[0][2]}, which "
                             f"reads only its own rows: gather label_prompt_rows(step, rank, world_size) over the "
                             f"ranks for the global batch's")
        return self._rows(step, rank, world_size).label_prompt

    def close(self) -> None:
        """Stop the worker processes (they also stop when this object is collected)."""
        self._reader = None

    def _rows(self, step: int, rank: int, world_size: int) -> Rows:
        key = (step, rank, world_size)
        if self._last is not None and self._last[0] == key:
            return self._last[1]
        reader = self._reader
        if reader is None or (reader.next_step, reader.rank, reader.world_size) != key:
            if step:
                log.info("streaming from step %d (rank %d of %d): skipping the records before it", *key)
            self._reader = None  # its workers stop before the new ones start
            self._reader = _Reader(self.plan, self.transform, step, rank, world_size, self.workers)
        rows = self._reader.take()
        self._last = (key, rows)
        return rows
