"""Streamed batches: every sample once per epoch, a pure function of (seed, data) whatever the workers, resume
and DDP shares exact, label-prompt rows consistent, and a tiny model's losses unchanged by an interruption."""

from __future__ import annotations

import copy
import csv
import io
import json
import random
import shutil
import tarfile

import pytest
import torch

from core.data import load_samples
from core.preprocess import PreprocessConfig, preprocess_image
from core.tokenizer import train_tokenizer
from training.batches import AugmentConfig
from training.losses import NClipConfig, ObjectiveLoss, caption_keys
from training.model import create_model
from training.streaming import (
    LabelPrompt,
    StreamConfig,
    StreamingBatches,
    choose_data_mode,
    crop_box,
    deal_shards,
    record_alphas,
    shuffle_buffer,
)

PREPROCESS = PreprocessConfig(image_size=16)  # the tiny model's input size
PROMPT = LabelPrompt("a {} shape", "shape")  # no caption has this form, so a prompt row is told apart


@pytest.fixture(scope="module")
def train_samples(shapes_data):
    return load_samples(str(shapes_data), split="train")[0]


@pytest.fixture(scope="module")
def sources(shapes_data, train_samples, tmp_path_factory) -> dict[str, str]:
    """The train split as a folder, a CSV and 4 WebDataset shards (brace pattern; red samples lack a shape)."""
    root = tmp_path_factory.mktemp("stream-sources")
    (root / "images").mkdir()
    with (root / "train.csv").open("w", newline="") as out:
        writer = csv.writer(out)
        writer.writerow(["image", "text", "label_shape"])
        for s in train_samples:
            shutil.copy(shapes_data / s.key, root / s.key)
            writer.writerow([s.key, " || ".join(s.texts), s.labels["shape"]])
    for shard in range(4):
        with tarfile.open(root / f"shard-{shard}.tar", "w") as tar:
            for s in train_samples[shard * 6:(shard + 1) * 6]:
                labels = {} if s.labels["colour"] == "red" else {"shape": s.labels["shape"]}
                png = io.BytesIO()
                s.image.save(png, format="PNG")
                key = s.key.replace("/", "_").removesuffix(".png")
                _add(tar, f"{key}.png", png.getvalue())
                _add(tar, f"{key}.json", json.dumps({"text": s.texts, "labels": labels}).encode())
    return {"folder": str(shapes_data), "csv": str(root / "train.csv"), "shards": str(root / "shard-{0..3}.tar")}


def _add(tar: tarfile.TarFile, name: str, payload: bytes) -> None:
    info = tarfile.TarInfo(name)
    info.size = len(payload)
    tar.addfile(info, io.BytesIO(payload))


@pytest.fixture(scope="module")
def tokenizer(train_samples):
    texts = [t for s in train_samples for t in s.texts] + [PROMPT(s.labels) for s in train_samples]
    return train_tokenizer(texts, 512, 16)


@pytest.fixture(scope="module")
def sample_of_pixels(train_samples) -> dict[bytes, str]:
    """The eval transform of each train sample → its key: names the sample of an unaugmented batch row."""
    found = {preprocess_image(s.image, PREPROCESS).tobytes(): s.key for s in train_samples}
    assert len(found) == len(train_samples)  # every image is told apart
    return found


def streamer(source, tokenizer, *, workers=0, seed=0, batch=8, augment=None, prompt_prob=0.0, **kwargs):
    split = None if source.endswith((".csv", ".tar")) else "train"
    return StreamingBatches(source, PREPROCESS, tokenizer, batch, seed, augment, split=split,
                            label_prompt=PROMPT if prompt_prob else None, label_prompt_prob=prompt_prob,
                            config=StreamConfig(workers=workers, streams=4, shuffle_buffer=4), **kwargs)


def batches(sampler, steps, rank=0, world_size=1) -> list[tuple[torch.Tensor, torch.Tensor, torch.Tensor]]:
    found = [(*sampler.batch(s, rank, world_size), sampler.label_prompt_rows(s, rank, world_size)) for s in steps]
    sampler.close()
    return found


def assert_same(a, b):
    assert len(a) == len(b)
    for got, expected in zip(a, b, strict=True):
        assert all(torch.equal(x, y) for x, y in zip(got, expected, strict=True))


@pytest.mark.parametrize("kind", ["folder", "csv", "shards"])
def test_two_workers_yield_every_sample_once_per_epoch(kind, sources, tokenizer, sample_of_pixels):
    sampler = streamer(sources[kind], tokenizer, workers=2)
    assert (sampler.num_samples, sampler.steps_per_epoch) == (24, 3)
    epochs = []
    for epoch in range(2):
        rows = torch.cat([sampler.batch(step)[0] for step in range(epoch * 3, epoch * 3 + 3)])
        epochs.append([sample_of_pixels[row.numpy().tobytes()] for row in rows])
    sampler.close()
    assert all(sorted(keys) == sorted(sample_of_pixels.values()) for keys in epochs)
    assert epochs[0] != epochs[1]  # reshuffled


def test_batches_are_a_function_of_the_seed_not_of_the_workers(sources, tokenizer):
    steps = range(4)
    augment = AugmentConfig(hflip=True)
    in_process = batches(streamer(sources["folder"], tokenizer, augment=augment, prompt_prob=0.5), steps)
    two_workers = batches(streamer(sources["folder"], tokenizer, workers=2, augment=augment, prompt_prob=0.5), steps)
    assert_same(two_workers, in_process)
    other_seed = batches(streamer(sources["folder"], tokenizer, seed=1, augment=augment), steps)
    assert not torch.equal(other_seed[0][0], in_process[0][0])


@pytest.mark.parametrize("kind, resume_at", [("folder", 4), ("shards", 2)])
def test_a_resumed_stream_continues_with_the_uninterrupted_batches(kind, resume_at, sources, tokenizer):
    settings = {"workers": 2, "augment": AugmentConfig(), "prompt_prob": 0.5}
    whole = batches(streamer(sources[kind], tokenizer, **settings), range(7))
    resumed = batches(streamer(sources[kind], tokenizer, **settings), range(resume_at, 7))
    assert_same(resumed, whole[resume_at:])


def test_ranks_read_disjoint_shares_of_the_global_batch(sources, tokenizer, sample_of_pixels):
    whole = batches(streamer(sources["shards"], tokenizer, prompt_prob=0.5), range(3))
    shares = [batches(streamer(sources["shards"], tokenizer, workers=1, prompt_prob=0.5), range(3), rank, 2)
              for rank in range(2)]
    for step in range(3):
        for column in range(3):  # pixels, input ids, label-prompt rows
            assert torch.equal(torch.cat([share[step][column] for share in shares]), whole[step][column])
        keys = [{sample_of_pixels[row.numpy().tobytes()] for row in share[step][0]} for share in shares]
        assert len(keys[0]) == len(keys[1]) == 4 and not keys[0] & keys[1]


def test_label_prompt_rows_are_the_rows_holding_their_sample_prompt(sources, tokenizer, train_samples,
                                                                    sample_of_pixels):
    prompt_ids = {s.key: torch.from_numpy(tokenizer.encode([PROMPT(s.labels)])[0]) for s in train_samples}
    sampler = streamer(sources["shards"], tokenizer, prompt_prob=0.5)
    used = eligible = 0
    for step in range(12):
        pixels, ids = sampler.batch(step)
        keys = [sample_of_pixels[row.numpy().tobytes()] for row in pixels]
        is_prompt = torch.tensor([torch.equal(row, prompt_ids[key]) for row, key in zip(ids, keys, strict=True)])
        assert torch.equal(sampler.label_prompt_rows(step), is_prompt)
        assert not any(p and key.startswith("images/red") for p, key in zip(is_prompt, keys, strict=True))
        used += int(is_prompt.sum())
        eligible += sum(not key.startswith("images/red") for key in keys)
    sampler.close()
    assert 0.3 < used / eligible < 0.7


def test_a_rank_refuses_the_global_rows_it_did_not_read(sources, tokenizer):
    sampler = streamer(sources["folder"], tokenizer, prompt_prob=0.5)
    sampler.batch(0, 1, 2)
    with pytest.raises(ValueError, match="gather"):
        sampler.label_prompt_rows(0)
    sampler.close()


def test_kept_alpha_is_the_records_opacity_and_leaves_the_pixels(sources, tokenizer, sample_of_pixels):
    """Whole-image crops, so each row names its sample; the cache path reads the same opacity (record_alphas)."""
    whole = {"crop_scale": (1.0, 1.0), "crop_ratio": (1.0, 1.0)}
    plain = streamer(sources["folder"], tokenizer, augment=AugmentConfig(**whole))
    keeping = streamer(sources["folder"], tokenizer, augment=AugmentConfig(**whole, background_prob=0.5))
    opacity = record_alphas(sources["folder"], "train", PREPROCESS)
    for step in range(3):
        pixels, _ = keeping.batch(step)
        assert torch.equal(pixels, plain.batch(step)[0])
        keys = [sample_of_pixels[row.numpy().tobytes()] for row in pixels]
        expected = torch.stack([torch.tensor(opacity[key]) for key in keys])[:, None].float() / 255
        assert torch.equal(keeping.alpha(step), expected)
    assert plain.alpha(0) is None
    assert expected.min() == 0 and expected.max() == 1  # transparent corners, an opaque shape
    keeping.close()
    plain.close()


def test_an_explicit_sample_count_sets_the_epoch(sources, tokenizer):
    sampler = streamer(sources["shards"], tokenizer, num_samples=40)  # more than the 24: streams pass again
    assert sampler.steps_per_epoch == 5
    assert all(sampler.batch(step)[0].shape[0] == 8 for step in range(5))
    sampler.close()


def test_an_undecodable_image_takes_a_neighbour_row(sources, tokenizer, train_samples, tmp_path):
    shards = tmp_path / "broken.tar"
    with tarfile.open(shards, "w") as tar:
        for i, s in enumerate(train_samples[:8]):
            png = io.BytesIO()
            s.image.save(png, format="PNG")
            _add(tar, f"s{i}.png", png.getvalue() if i != 3 else b"not an image")
            _add(tar, f"s{i}.txt", s.texts[0].encode())
    pixels, _ = streamer(str(shards), tokenizer).batch(0)
    assert len({row.numpy().tobytes() for row in pixels}) == 7


@pytest.mark.parametrize("epoch", range(3))
def test_dealt_streams_differ_by_at_most_one_shard_of_records(epoch):
    sizes = [random.Random(shard).randrange(500, 1000) for shard in range(40)]  # img2dataset's ragged shards
    dealt = deal_shards(sizes, (2, 2, 2, 2), seed=0, epoch=epoch)
    assert sorted(shard for stream in dealt for shard in stream) == list(range(40))
    loads = [sum(sizes[shard] for shard in stream) for stream in dealt]
    assert max(loads) - min(loads) <= max(sizes)
    assert deal_shards([10] * 8, (1, 1, 1, 1), seed=0, epoch=epoch) != deal_shards([10] * 8, (1, 1, 1, 1), 0, 9)


def test_shuffle_buffer_keeps_every_item_and_is_seeded():
    items = list(range(50))
    shuffled = list(shuffle_buffer(items, 8, random.Random(0)))
    assert sorted(shuffled) == items and shuffled != items
    assert list(shuffle_buffer(items, 8, random.Random(0))) == shuffled


@pytest.mark.parametrize("width, height", [(40, 40), (64, 20), (20, 64)])
def test_crop_boxes_lie_in_the_image_and_keep_about_their_area(width, height):
    augment = AugmentConfig(crop_scale=(0.5, 0.5), crop_ratio=(1.0, 1.0))
    for u in torch.rand(20, 4, generator=torch.Generator().manual_seed(0)).tolist():
        left, top, right, bottom = crop_box(width, height, augment, u)
        assert 0 <= left < right <= width and 0 <= top < bottom <= height
        assert abs((right - left) * (bottom - top) / (width * height) - 0.5) < 0.08
    whole = AugmentConfig(crop_scale=(1.0, 1.0), crop_ratio=(1.0, 1.0))
    assert crop_box(width, width, whole, [0.3, 0.6, 0.2, 0.9]) == (0, 0, width, width)


def test_the_cache_is_chosen_only_when_its_pixels_fit():
    assert choose_data_mode(3_000, 32, 1 << 30) == "cache"  # the emoji set: 18 MB
    assert choose_data_mode(100_000, 224, 1 << 30) == "stream"  # 30 GB


@pytest.fixture
def one_thread():
    """A tiny model's steps take milliseconds on one thread and up to a second on two contended ones."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def test_a_tiny_model_trains_to_the_same_losses_when_interrupted_and_resumed(sources, tokenizer, one_thread):
    def start():
        torch.manual_seed(0)
        model = create_model("tiny", eos_id=tokenizer.eos_id)
        loss_fn = ObjectiveLoss("xclip", NClipConfig().for_objective("xclip"), 64, multi_positive=True)
        return model, loss_fn, torch.optim.AdamW(model.parameters(), lr=1e-3)

    def train(state, sampler, steps) -> list[float]:
        model, loss_fn, optimizer = state
        losses = []
        for step in steps:
            pixels, ids = sampler.batch(step)
            out = model(pixels, ids)
            out.update(text_key=caption_keys(ids), label_prompt=sampler.label_prompt_rows(step))
            loss = sum(loss_fn(out).values())
            loss.backward()
            optimizer.step()
            optimizer.zero_grad()
            losses.append(loss.item())
        sampler.close()
        return losses

    settings = {"workers": 2, "augment": AugmentConfig(), "prompt_prob": 0.5}
    whole = train(start(), streamer(sources["folder"], tokenizer, **settings), range(6))
    first = start()
    interrupted = train(first, streamer(sources["folder"], tokenizer, **settings), range(4))
    saved = [copy.deepcopy(part.state_dict()) for part in first]
    second = start()
    for part, state in zip(second, saved, strict=True):
        part.load_state_dict(state)
    resumed = train(second, streamer(sources["folder"], tokenizer, **settings), range(4, 6))
    assert interrupted + resumed == whole
    assert len(set(whole)) == 6  # the losses move: the comparison can fail
