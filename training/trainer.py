"""The training loop: thin glue over the model, losses, batches and optimiser modules.

A run directory holds `tokenizer.json`, `preprocess.json`, `train_config.json`, `checkpoints/`, `metrics.jsonl`
(one JSON line per step and per evaluation), `metrics.json` (the summary) and `plots/`."""

from __future__ import annotations

import dataclasses
import json
import logging
import math
import shutil
import time
from pathlib import Path

import numpy as np
import torch
from torch.nn.parallel import DistributedDataParallel
from tqdm import tqdm

from core import data as datasets
from core.data import BadRecords
from core.metrics import DEFAULT_TEMPLATES, check_templates
from core.preprocess import PreprocessConfig
from core.tokenizer import TextTokenizer, train_tokenizer
from training import distributed as dist_utils
from training import streaming
from training.augment import AugmentConfig, style_rows
from training.batches import BatchSampler, build_cache, rank_rows
from training.evaluate import evaluate_model, load_eval_sets
from training.init_from import InitSource, resolve_init, resolve_text_tower
from training.losses import OBJECTIVE_DEFAULTS, NClipConfig, ObjectiveLoss, caption_keys, collapse_indicators
from training.model import DualEncoder, ModelConfig, count_parameters, create_model, load_config
from training.optim import cosine_lr, latest_checkpoint, load_checkpoint, param_groups, save_checkpoint
from training.perf import measure_matmul_peak, training_flops_per_sample
from training.streaming import StreamingBatches
from training.towers import LockedTextFeatures, is_fully_locked, lock_tower, pretrained_parameter_ids

log = logging.getLogger(__name__)


DATA_MODES = ("auto", "cache", "stream")


@dataclasses.dataclass
class TrainConfig:
    data: str
    output: str = "runs/xclip"
    model: str = "small"
    objective: str = "xclip"
    epochs: int = 30
    max_steps: int | None = None  # stop early (the schedule still spans all epochs): tests and interruptions
    batch_size: int = 64  # global batch, split across ranks
    # 5e-4 over 1e-3: better zero-shot subcategory and R@1 for all three objectives on the val split, and a better
    # probe for xCLIP and nCLIP (CLIP's within the spread) (docs/BENCHMARKS.md, "sweep": bench/sweeps/recipe.json)
    lr: float = 5e-4
    min_lr_ratio: float = 0.05
    weight_decay: float = 0.1
    warmup_steps: int = 50
    grad_clip: float = 1.0
    # Identical captions in a batch are all positives of each other (UniCL) instead of each other's negatives.
    multi_positive: bool = True
    seed: int = 0
    precision: str = "fp32"  # "bf16" autocast or "fp32"; the CLI resolves "auto" (see resolve_precision)
    checkpoint_every: int = 200
    eval_every: int = 1  # epochs between evaluations (and always after the last step); 0: only after the last step
    eval_split: str = "val"
    augment: AugmentConfig = dataclasses.field(default_factory=AugmentConfig)
    nclip: NClipConfig = dataclasses.field(default_factory=NClipConfig)
    vocab_size: int | None = None  # overrides the architecture config's
    # overrides the architecture config's vision.image_size (a multiple of its patch size); the run's preprocessing,
    # hence its bundle's, follows the model's
    image_size: int | None = None
    max_bad_fraction: float = 0.05
    image_mean: tuple[float, float, float] = (0.5, 0.5, 0.5)
    image_std: tuple[float, float, float] = (0.5, 0.5, 0.5)
    resize_mode: str = "longest_pad"
    # zero-shot prompt templates (one "{}" each, ensembled): evaluation uses them and the bundle records them for
    # `eval --bundle` and the service; the default is the emoji captions' form
    templates: tuple[str, ...] = DEFAULT_TEMPLATES
    # Image–label mixing (as UniCL): with this probability a training image's caption is its `label_prompt_set`
    # label in the first template ("a face smiling emoji") instead of one of its captions; images without that
    # label keep their captions, and data without it trains on captions alone. 0 turns it off. 0.5: on the emoji
    # val split, per emoji, xCLIP zero-shot subcategory 37.6 vs 28.5 at equal steps, R@1 and probe within the
    # spread; it costs the cluster heads some prototype use (docs/BENCHMARKS.md, objectives and sweep readings).
    label_prompt_prob: float = 0.5
    label_prompt_set: str = "subcategory"
    resume: bool = True
    progress: bool = True
    # Training data: "cache" preprocesses every image into memory once (fast epochs, small data); "stream" decodes
    # and augments in DataLoader workers as it goes (training/streaming.py: any size, exact resume); "auto" caches
    # when the preprocessed pixels fit `cache_budget_mb`. Shard sets without sizes.json: give train_num_samples.
    data_mode: str = "auto"
    cache_budget_mb: int = 4096
    stream_workers: int = 2
    train_num_samples: int | None = None
    # Fine-tuning (`--init`): start from a pretrained checkpoint or a bundle (training/init_from.py); its weights
    # train at `init_lr_scale` × lr (new cluster heads at lr). Locking as open_clip: a locked tower trains only its
    # last `*_unlocked_groups` layer groups (embeddings, each block, final norm, projection).
    init: str | None = None
    # a sentence-transformers checkpoint directory as the text tower (its tokenizer too); the image tower is the
    # model config's, from scratch
    text_tower: str | None = None
    init_lr_scale: float = 0.1
    lock_image: bool = False
    lock_image_unlocked_groups: int = 0
    lock_text: bool = False
    lock_text_unlocked_groups: int = 0

    def __post_init__(self):
        self.templates = check_templates(self.templates)
        if not 0.0 <= self.label_prompt_prob <= 1.0:
            raise ValueError(f"label_prompt_prob must be in [0, 1], got {self.label_prompt_prob}")
        if self.objective in OBJECTIVE_DEFAULTS:  # the run's config records the nCLIP values it trains with
            self.nclip = self.nclip.for_objective(self.objective)
        if self.data_mode not in DATA_MODES:
            raise ValueError(f"data_mode must be one of {DATA_MODES}, got {self.data_mode!r}")
        if self.image_size is not None:
            self._check_image_size()

    def _check_image_size(self) -> None:
        if self.init:
            raise ValueError("image_size cannot change a pretrained model's input (--init brings its own)")
        patch = load_config(self.model).vision.patch_size
        if self.image_size < 8 or self.image_size % patch:
            raise ValueError(f"image_size must be a multiple of the {self.model} model's patch size {patch} "
                             f"(and at least 8), got {self.image_size}")

    def model_config(self) -> ModelConfig:
        """The architecture config with this run's objective, vocabulary size and image size."""
        return load_config(self.model, objective=self.objective, vocab_size=self.vocab_size,
                           image_size=self.image_size)

    def label_prompts(self, samples: list) -> list[str | None] | None:
        """Each sample's label prompt for image–label mixing (None where it lacks the label); None when off or
        when no sample has the label."""
        if not self.label_prompt_prob:
            return None
        labels = [(s.labels or {}).get(self.label_prompt_set) for s in samples]
        if not any(labels):
            log.warning("label prompts off: no training sample has a %r label (label_prompt_set)",
                        self.label_prompt_set)
            return None
        return [self.templates[0].format(label) if label else None for label in labels]

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, data: dict) -> TrainConfig:
        data = dict(data)
        data["augment"] = AugmentConfig(**{k: tuple(v) if isinstance(v, list) else v
                                           for k, v in data.get("augment", {}).items()})
        data["nclip"] = NClipConfig(**data.get("nclip", {}))
        return cls(**data)


def resolve_precision(precision: str) -> str:
    """"auto" → bf16 on CUDA or on CPUs with native bf16 (AVX512-BF16/AMX); fp32 elsewhere.

    Measured on the AVX2-only EPYC CI machines: a bf16 matmul runs at ~1 GFLOP/s vs ~100 in fp32 (bench/)."""
    if precision != "auto":
        if precision not in ("fp32", "bf16"):
            raise ValueError(f"precision must be auto, fp32 or bf16, got {precision!r}")
        return precision
    if torch.cuda.is_available():
        return "bf16"
    flags = Path("/proc/cpuinfo").read_text() if Path("/proc/cpuinfo").exists() else ""
    return "bf16" if ("avx512_bf16" in flags or "amx_bf16" in flags) else "fp32"


@dataclasses.dataclass
class RunState:
    """What the loop needs at hand; built once by `prepare`."""

    cfg: TrainConfig
    info: dist_utils.DistInfo
    out_dir: Path
    model_cfg: ModelConfig
    model: DualEncoder
    ddp_model: torch.nn.Module
    loss_fn: ObjectiveLoss
    optimizer: torch.optim.Optimizer
    sampler: BatchSampler | StreamingBatches
    tokenizer: TextTokenizer
    preprocess: PreprocessConfig
    total_steps: int
    start_step: int
    bad_records: dict
    perf: dict
    text_features: LockedTextFeatures | None = None  # a locked text tower's outputs, computed once (LiT)


def build_tokenizer(model_cfg: ModelConfig, samples, out_dir: Path, resuming: bool,
                    extra_texts: list[str | None] | None = None) -> TextTokenizer:
    """Train the BPE tokenizer on the training captions (and label prompts), or reload the run's own when resuming."""
    path = out_dir / "tokenizer.json"
    if resuming and path.exists():
        return TextTokenizer.from_file(path)
    texts = [t for s in samples for t in s.texts] + [t for t in extra_texts or [] if t]
    return train_tokenizer(texts, model_cfg.text.vocab_size, model_cfg.text.context_length)


def prepare(cfg: TrainConfig) -> RunState:
    """Load data, build tokenizer, model, loss, optimiser; restore the latest checkpoint when resuming."""
    info = dist_utils.init_distributed()
    torch.manual_seed(cfg.seed)
    out_dir = Path(cfg.output)
    out_dir.mkdir(parents=True, exist_ok=True)
    resuming = cfg.resume and latest_checkpoint(out_dir / "checkpoints") is not None
    if not cfg.resume and info.is_main:
        _start_over(out_dir)
    dist_utils.barrier(info)
    model_cfg = cfg.model_config()
    init = _init_source(cfg, model_cfg)
    split = "train" if "train" in datasets.splits_present(cfg.data) else None
    mode, samples, bad = _training_data(cfg, split, (init.model_config if init else model_cfg).vision.image_size)
    label_prompts = cfg.label_prompts(samples)
    if init is not None:
        model_cfg, tokenizer = init.model_config, init.tokenizer
    else:
        tokenizer = build_tokenizer(model_cfg, samples, out_dir, resuming, label_prompts)
    preprocess = init.preprocess if init is not None and init.preprocess is not None else PreprocessConfig(
        image_size=model_cfg.vision.image_size, resize_mode=cfg.resize_mode, mean=cfg.image_mean,
        std=cfg.image_std)
    if info.is_main:
        tokenizer.save(out_dir / "tokenizer.json")
        preprocess.save(out_dir / "preprocess.json")
        (out_dir / "train_config.json").write_text(json.dumps(
            {"train": cfg.to_dict(), "model": model_cfg.to_dict(), "label_sets": datasets.label_sets(samples),
             "data_fingerprint": datasets.fingerprint(cfg.data)}, indent=1))
    sampler = _sampler(cfg, mode, samples, split, preprocess, tokenizer, label_prompts, info)
    del samples
    bad = bad if mode == "cache" else sampler.bad_records
    model = create_model(model_cfg, eos_id=tokenizer.eos_id, cluster_temp=cfg.nclip.student_temp)
    if init is not None and not resuming:
        init.load_weights(model)
        log.info("initialised from %s", init.description)
    model = _lock_towers(cfg, model, init).to(info.device)
    _train_mode(model)
    loss_fn = ObjectiveLoss(model_cfg.objective, cfg.nclip, model_cfg.cluster_head.num_clusters,
                            cfg.multi_positive).to(info.device)
    lr_scales = ({"pretrained": (pretrained_parameter_ids(model, init.pretrained_parts), cfg.init_lr_scale)}
                 if init is not None else {})
    optimizer = torch.optim.AdamW(param_groups(model, cfg.weight_decay, lr_scales), lr=cfg.lr, betas=(0.9, 0.98),
                                  eps=1e-6)
    start_step = _maybe_resume(cfg, out_dir, model, loss_fn, optimizer)
    text_features = _locked_text_features(model, sampler)
    perf = _measure_perf(cfg, model, sampler, info, text_features) if info.is_main else {}  # before DDP hooks
    if info.world_size > 1 and info.device.startswith("cuda"):  # BatchNorm statistics over the global batch
        model = torch.nn.SyncBatchNorm.convert_sync_batchnorm(model)
    ddp_model = model if info.world_size == 1 else DistributedDataParallel(model)
    return RunState(cfg, info, out_dir, model_cfg, model, ddp_model, loss_fn, optimizer, sampler, tokenizer,
                    preprocess, sampler.steps_per_epoch * cfg.epochs, start_step, bad.to_dict(), perf,
                    text_features)


def _training_data(cfg: TrainConfig, split: str | None, image_size: int) -> tuple[str, list, BadRecords]:
    """(mode, samples, bad records): decoded samples to cache, or, to stream, each record's captions and labels
    (for the tokenizer, label sets and prompts) with no image decoded."""
    mode, bad = cfg.data_mode, BadRecords()
    entries = None
    if mode != "cache":
        entries = streaming.catalogue(cfg.data, split, bad)
        if mode == "auto":
            count = cfg.train_num_samples or len(entries)
            mode = streaming.choose_data_mode(count, image_size, cfg.cache_budget_mb * 2**20)
            log.info("data mode %s: %d samples at %d px against a %d MB cache budget", mode, count, image_size,
                     cfg.cache_budget_mb)
    if mode == "cache":
        samples, bad = datasets.load_samples(cfg.data, split=split, max_bad_fraction=cfg.max_bad_fraction)
        return mode, samples, bad
    return mode, entries, bad


def _sampler(cfg: TrainConfig, mode: str, samples: list, split: str | None, preprocess: PreprocessConfig,
             tokenizer: TextTokenizer, label_prompts: list | None, info) -> BatchSampler | StreamingBatches:
    """The in-memory cache and its sampler, or the streamed batches."""
    prompt_prob = cfg.label_prompt_prob if label_prompts is not None else 0.0
    if mode == "cache":
        alphas = _cache_alphas(cfg, samples, split, preprocess) if cfg.augment.keeps_alpha else None
        cache = build_cache(samples, preprocess, tokenizer, progress=cfg.progress and info.is_main,
                            label_prompts=label_prompts, alphas=alphas)
        return BatchSampler(cache, cfg.batch_size, cfg.seed, cfg.augment, prompt_prob)
    prompt = streaming.LabelPrompt(cfg.templates[0], cfg.label_prompt_set) if prompt_prob else None
    return StreamingBatches(cfg.data, preprocess, tokenizer, cfg.batch_size, cfg.seed, cfg.augment, split=split,
                            label_prompt=prompt, label_prompt_prob=prompt_prob, num_samples=cfg.train_num_samples,
                            max_bad_fraction=cfg.max_bad_fraction,
                            config=streaming.StreamConfig(workers=cfg.stream_workers))


def _cache_alphas(cfg: TrainConfig, samples: list, split: str | None,
                  preprocess: PreprocessConfig) -> list[np.ndarray]:
    """Each sample's opacity at the model's input, for background augmentation: the cached samples are composited
    on white, so the records' alpha is read again. A sample without one (its key's first record undecodable) is
    taken as opaque."""
    found = streaming.record_alphas(cfg.data, split, preprocess)
    missing = sum(sample.key not in found for sample in samples)
    if missing:
        log.warning("background augmentation: no alpha for %d of %d samples; they are taken as opaque", missing,
                    len(samples))
    opaque = np.full((preprocess.image_size, preprocess.image_size), 255, np.uint8)
    return [found.get(sample.key, opaque) for sample in samples]


def _init_source(cfg: TrainConfig, model_cfg: ModelConfig) -> InitSource | None:
    """Where the weights start: a checkpoint or bundle (--init), a sentence-transformers text tower
    (--text-tower), or nowhere (from scratch)."""
    if cfg.init and cfg.text_tower:
        raise ValueError("--init and --text-tower are exclusive: --init brings both towers")
    if cfg.init:
        return resolve_init(cfg.init, cfg.objective, model_cfg.cluster_head)
    return resolve_text_tower(cfg.text_tower, model_cfg) if cfg.text_tower else None


def _lock_towers(cfg: TrainConfig, model: DualEncoder, init: InitSource | None) -> DualEncoder:
    """Freeze the towers `--lock-image` / `--lock-text` ask for, but their last unlocked groups (a projection new
    to the run trains)."""
    parts = init.pretrained_parts if init is not None else None
    if cfg.lock_image:
        lock_tower(model, "image", cfg.lock_image_unlocked_groups, parts)
    if cfg.lock_text:
        lock_tower(model, "text", cfg.lock_text_unlocked_groups, parts)
    return model


def _train_mode(model: DualEncoder) -> None:
    """Training mode, but for fully locked towers, which run in eval mode (no dropout): their outputs are then a
    fixed function of their input, as LiT's locked tower's, and can be computed once."""
    model.train()
    for modality, tower in (("image", model.visual), ("text", model.text)):
        if is_fully_locked(model, modality):
            tower.eval()


def _locked_text_features(model: DualEncoder, sampler) -> LockedTextFeatures | None:
    """A fully locked text tower's outputs for every caption and label prompt of the cache, computed once; None
    when the tower trains or the data stream (whose captions are not known up front)."""
    if not isinstance(sampler, BatchSampler) or not is_fully_locked(model, "text"):
        return None
    cache = sampler.cache
    rows = cache.tokens if cache.label_tokens is None else torch.cat([cache.tokens, cache.label_tokens])
    start = time.perf_counter()
    features = LockedTextFeatures(model.text, rows)
    log.info("locked text tower: %d distinct texts encoded once in %.1f s", len(features.index),
             time.perf_counter() - start)
    return features


def _start_over(out_dir: Path) -> None:
    """Drop a previous run's checkpoints and step log from the run directory (`--no-resume`)."""
    if (out_dir / "checkpoints").exists() or (out_dir / "metrics.jsonl").exists():
        log.info("starting over in %s: removing its checkpoints and metrics.jsonl", out_dir)
    shutil.rmtree(out_dir / "checkpoints", ignore_errors=True)
    (out_dir / "metrics.jsonl").unlink(missing_ok=True)


def _maybe_resume(cfg: TrainConfig, out_dir: Path, model, loss_fn, optimizer) -> int:
    checkpoint = latest_checkpoint(out_dir / "checkpoints") if cfg.resume else None
    if checkpoint is None:
        return 0
    step = load_checkpoint(checkpoint, model, loss_fn, optimizer)["step"]
    log.info("resumed from %s at step %d", checkpoint, step)
    return step


def train_step(run: RunState, step: int) -> dict[str, float]:
    """One optimisation step on the global batch; returns the logged scalars."""
    cfg, info = run.cfg, run.info
    lr = cosine_lr(step, run.total_steps, cfg.warmup_steps, cfg.lr, cfg.min_lr_ratio)
    for group in run.optimizer.param_groups:
        group["lr"] = lr * group.get("lr_scale", 1.0)
    pixels, input_ids = run.sampler.batch(step, info.rank, info.world_size)
    pixels = _styled(run, step, pixels.to(info.device))
    device_type = "cuda" if info.device.startswith("cuda") else "cpu"
    with torch.autocast(device_type, dtype=torch.bfloat16, enabled=cfg.precision == "bf16"):
        text_features = run.text_features(input_ids) if run.text_features is not None else None
        out = run.ddp_model(pixels, input_ids.to(info.device), text_features=text_features)
    out = {k: dist_utils.gather_with_local_grad(v.float(), info) if v.ndim else
           dist_utils.shared_parameter(v, info) for k, v in out.items()}
    if cfg.multi_positive:
        out["text_key"] = dist_utils.gather_with_local_grad(caption_keys(input_ids).to(info.device), info)
    if cfg.label_prompt_prob:
        out["label_prompt"] = _label_prompt_rows(run, step)
    terms = run.loss_fn(out)
    loss = sum(terms.values())
    (loss * info.world_size).backward()  # DDP averages; the loss already covers the global batch
    grad_norm = torch.nn.utils.clip_grad_norm_(run.model.parameters(), cfg.grad_clip)
    run.optimizer.step()
    run.optimizer.zero_grad(set_to_none=True)
    return _step_record(run, step, lr, loss, terms, out, grad_norm)


def _styled(run: RunState, step: int, pixels: torch.Tensor) -> torch.Tensor:
    """This rank's pixels with their style augmentations (training/augment.py), on its device: drawn for the
    global batch from (seed, step), so that the ranks' rows together are one process's batch."""
    cfg, info = run.cfg, run.info
    if not cfg.augment.has_style:
        return pixels
    alpha = run.sampler.alpha(step, info.rank, info.world_size) if cfg.augment.keeps_alpha else None
    return style_rows(pixels, alpha, cfg.augment, run.preprocess, cfg.seed, step,
                      rank_rows(cfg.batch_size, info.rank, info.world_size), cfg.batch_size)


def _label_prompt_rows(run: RunState, step: int) -> torch.Tensor:
    """(B,) which rows of the global batch carry label prompts. The cache's draws are a function of (seed, step),
    so every rank knows them all; a stream's rank reads only its own rows, so they are gathered."""
    info = run.info
    if isinstance(run.sampler, StreamingBatches) and info.world_size > 1:
        mine = run.sampler.label_prompt_rows(step, info.rank, info.world_size).to(info.device)
        return dist_utils.gather_with_local_grad(mine.float(), info).bool()
    return run.sampler.label_prompt_rows(step).to(info.device)


def _step_record(run: RunState, step: int, lr: float, loss, terms, out, grad_norm) -> dict[str, float]:
    record = {"step": step + 1, "epoch": step / run.sampler.steps_per_epoch, "lr": lr, "loss": float(loss.detach()),
              "grad_norm": float(grad_norm), **{k: float(v.detach()) for k, v in terms.items()}}
    if "logit_scale" in out:
        record["logit_scale"] = float(out["logit_scale"].detach().exp())
    if "image_cluster_logits" in out:
        temp = run.cfg.nclip.student_temp
        for side in ("image", "text"):
            stats = collapse_indicators(out[f"{side}_cluster_logits"], temp)
            record.update({f"{side}_{k}": v for k, v in stats.items()})
    return record


def train(cfg: TrainConfig) -> dict:
    """Run (or resume) training; returns the summary also written to `metrics.json`."""
    run = prepare(cfg)
    eval_sets = load_eval_sets(cfg.data, cfg.eval_split) if run.info.is_main else None
    metrics_file = (run.out_dir / "metrics.jsonl").open("a") if run.info.is_main else None
    last_step = min(run.total_steps, cfg.max_steps or run.total_steps)
    history = _loop(run, last_step, metrics_file, eval_sets)
    summary = {}
    if run.info.is_main:
        summary = _finish(run, history, eval_sets, last_step, metrics_file)
    dist_utils.barrier(run.info)
    dist_utils.cleanup(run.info)
    return summary


def _loop(run: RunState, last_step: int, metrics_file, eval_sets) -> dict:
    cfg, info = run.cfg, run.info
    bar = tqdm(range(run.start_step, last_step), initial=run.start_step, total=last_step, unit="step",
               desc=f"train {run.model_cfg.objective}", disable=not (cfg.progress and info.is_main))
    history = {"steps": [], "evals": [], "train_seconds": 0.0, "samples": 0}
    start = time.perf_counter()
    for step in bar:
        record = train_step(run, step)
        history["samples"] += cfg.batch_size
        bar.set_postfix(loss=f"{record['loss']:.3f}", refresh=False)
        if info.is_main:
            metrics_file.write(json.dumps(record) + "\n")
            history["steps"].append(record)
        if (step + 1) % cfg.checkpoint_every == 0 and info.is_main:
            _checkpoint(run, step + 1)
        if _epoch_end_eval_due(run, step) and info.is_main:
            history["evals"].append(_evaluate(run, step + 1, eval_sets, metrics_file))
        if not math.isfinite(record["loss"]):
            raise FloatingPointError(f"loss became {record['loss']} at step {step + 1}")
    history["train_seconds"] = time.perf_counter() - start
    return history


def _epoch_end_eval_due(run: RunState, step: int) -> bool:
    every = run.cfg.eval_every
    epoch_done = (step + 1) % run.sampler.steps_per_epoch == 0
    return bool(every) and epoch_done and ((step + 1) // run.sampler.steps_per_epoch) % every == 0


def _checkpoint(run: RunState, step: int) -> None:
    save_checkpoint(run.out_dir / "checkpoints", run.model, run.loss_fn, run.optimizer, step,
                    {"objective": run.model_cfg.objective})


def _evaluate(run: RunState, step: int, eval_sets, metrics_file) -> dict:
    run.model.eval()
    run.loss_fn.eval()
    result = evaluate_model(run.model, run.tokenizer, run.preprocess, eval_sets, run.cfg.templates)
    _train_mode(run.model)
    run.loss_fn.train()
    record = {"step": step, "eval": result}
    metrics_file.write(json.dumps(record) + "\n")
    metrics_file.flush()
    log.info("eval at step %d: %s", step, {k: round(v, 4) for k, v in result.items() if isinstance(v, float)})
    return record


def _measure_perf(cfg: TrainConfig, model: DualEncoder, sampler: BatchSampler, info,
                  text_features: LockedTextFeatures | None) -> dict:
    """FLOPs per sample (a locked text tower's computed once: not counted) and the matmul peak of the training
    dtype, measured once before training."""
    pixels, ids = sampler.batch(0)
    n = min(8, pixels.shape[0])
    ids = ids[:n].to(info.device)
    features = text_features(ids) if text_features is not None else None
    flops = training_flops_per_sample(model, pixels[:n].to(info.device), ids, features)
    dtype = torch.bfloat16 if cfg.precision == "bf16" else torch.float32
    return {"flops_per_sample": flops, "matmul_peak_flops": measure_matmul_peak(dtype),
            "parameters": count_parameters(model)}


def _finish(run: RunState, history: dict, eval_sets, last_step: int, metrics_file) -> dict:
    """Final checkpoint, final evaluation, summary metrics and plots."""
    from training.plots import plot_run

    _checkpoint(run, last_step)
    final = history["evals"][-1] if history["evals"] and history["evals"][-1]["step"] == last_step else None
    final = final or _evaluate(run, last_step, eval_sets, metrics_file)
    metrics_file.close()
    summary = _summary(run, history, final, last_step)
    (run.out_dir / "metrics.json").write_text(json.dumps(summary, indent=1))
    plot_run(run.out_dir)
    _warn_if_collapsed(summary)
    return summary


def _summary(run: RunState, history: dict, final: dict, last_step: int) -> dict:
    perf = run.perf
    seconds = history["train_seconds"]
    rate = history["samples"] / seconds if seconds else 0.0
    achieved = rate * perf["flops_per_sample"]
    return {
        "objective": run.model_cfg.objective, "model": run.model_cfg.name, "steps": last_step,
        "epochs": last_step / run.sampler.steps_per_epoch, "train_samples": run.sampler.num_samples,
        "train_seconds": seconds, "samples_per_second": rate, "achieved_flops": achieved,
        "mfu": achieved / perf["matmul_peak_flops"], **perf, "world_size": run.info.world_size,
        "precision": run.cfg.precision, "augment": dataclasses.asdict(run.cfg.augment),
        "data_mode": "stream" if isinstance(run.sampler, StreamingBatches) else "cache",
        "bad_records": run.bad_records,
        "final_loss": history["steps"][-1]["loss"] if history["steps"] else None,
        "eval_split": run.cfg.eval_split, "eval": final["eval"],
    }


def _warn_if_collapsed(summary: dict) -> None:
    for side in ("image", "text"):
        if summary["eval"].get(f"clusters/{side}/collapsed"):
            log.warning("nCLIP %s clusters COLLAPSED: %d prototypes in use, entropy of mean %.2f nats", side,
                        summary["eval"][f"clusters/{side}/clusters_used"],
                        summary["eval"][f"clusters/{side}/entropy_of_mean"])
