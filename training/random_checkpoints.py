"""Random-weight checkpoints in the formats people download, written by `transformers` itself (`save_pretrained`):
tiny ones for tests, and the published shapes of CLIP ViT-B/32 and SigLIP base for benchmarks. No network."""

from __future__ import annotations

import io
import json
import random
from pathlib import Path

import torch
from tokenizers import Tokenizer, models, normalizers, pre_tokenizers, trainers

WORDS = ("a", "photo", "of", "the", "cat", "dog", "red", "heart", "fox", "face", "wolf", "smiling", "grinning",
         "sun", "moon", "star", "tree", "house", "car", "blue", "green", "yellow", "grey", "small", "big", "happy",
         "sad", "old", "new", "bird", "fish", "flower", "rocket", "pizza", "apple", "clock", "camera", "train")
CLIP_SPECIALS = ("<|startoftext|>", "<|endoftext|>")
# (vision, text) shapes: tiny for tests; the published configs of openai/clip-vit-base-patch32 and
# google/siglip-base-patch16-224 for benchmarks
SHAPES = {
    "tiny": ({"image_size": 32, "patch_size": 8, "hidden_size": 32, "intermediate_size": 64,
              "num_hidden_layers": 2, "num_attention_heads": 2},
             {"hidden_size": 32, "intermediate_size": 64, "num_hidden_layers": 2, "num_attention_heads": 2}),
    "b32": ({"image_size": 224, "patch_size": 32, "hidden_size": 768, "intermediate_size": 3072,
             "num_hidden_layers": 12, "num_attention_heads": 12},
            {"hidden_size": 512, "intermediate_size": 2048, "num_hidden_layers": 12, "num_attention_heads": 8}),
    "siglip-base": ({"image_size": 224, "patch_size": 16, "hidden_size": 768, "intermediate_size": 3072,
                     "num_hidden_layers": 12, "num_attention_heads": 12},
                    {"hidden_size": 768, "intermediate_size": 3072, "num_hidden_layers": 12,
                     "num_attention_heads": 12}),
}


def sample_texts(n: int = 400, seed: int = 0) -> list[str]:
    """Short captions over a small vocabulary, to train the tiny tokenizers on."""
    rng = random.Random(seed)
    return [" ".join(rng.choice(WORDS) for _ in range(rng.randint(2, 7))) for _ in range(n)]


def clip_tokenizer(vocab_size: int = 300):
    """A CLIP tokenizer (lower-casing byte-level BPE with `</w>` word ends) with a tiny vocabulary whose specials
    come last, as in OpenAI's (so the end-of-text token has the highest id)."""
    from transformers import CLIPTokenizer

    bpe = Tokenizer(models.BPE(end_of_word_suffix="</w>"))
    bpe.normalizer = normalizers.Lowercase()
    bpe.pre_tokenizer = pre_tokenizers.Sequence([pre_tokenizers.Whitespace(),
                                                 pre_tokenizers.ByteLevel(add_prefix_space=False)])
    bpe.train_from_iterator(sample_texts(), trainers.BpeTrainer(
        vocab_size=vocab_size, end_of_word_suffix="</w>", show_progress=False,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet()))
    model = json.loads(bpe.to_str())["model"]
    tokens = sorted(model["vocab"], key=model["vocab"].get)
    vocab = {t: i for i, t in enumerate([*tokens, *CLIP_SPECIALS])}
    merges = [tuple(m.split(" ")) if isinstance(m, str) else tuple(m) for m in model["merges"]]
    return CLIPTokenizer(vocab=vocab, merges=merges, model_max_length=77)


def siglip_tokenizer(directory: Path, vocab_size: int = 40):
    """A SiglipTokenizer over a tiny SentencePiece unigram model trained here."""
    import sentencepiece as spm
    from transformers import SiglipTokenizer

    model = io.BytesIO()
    spm.SentencePieceTrainer.train(
        sentence_iterator=iter(sample_texts()), model_writer=model, vocab_size=vocab_size, model_type="unigram",
        pad_id=0, eos_id=1, unk_id=2, bos_id=-1, pad_piece="<pad>", eos_piece="</s>", unk_piece="<unk>",
        minloglevel=2)
    path = directory / "spiece.model"
    path.write_bytes(model.getvalue())
    return SiglipTokenizer(str(path), model_max_length=64)


def save_clip(directory: Path, shape: str = "tiny", seed: int = 0, legacy_eos: bool = True,
              context_length: int = 77) -> Path:
    """A random CLIPModel directory as `save_pretrained` writes it. `legacy_eos`: eos_token_id 2 in the config, as
    OpenAI's checkpoints have (transformers then pools at the highest token id)."""
    from transformers import CLIPConfig, CLIPImageProcessor, CLIPModel

    directory.mkdir(parents=True, exist_ok=True)
    tokenizer = clip_tokenizer()
    vision, text = SHAPES[shape]
    eos_id = 2 if legacy_eos else tokenizer.eos_token_id
    config = CLIPConfig(
        projection_dim=16 if shape == "tiny" else 512,
        vision_config={**vision, "hidden_act": "quick_gelu"},
        text_config={**text, "hidden_act": "quick_gelu", "max_position_embeddings": context_length,
                     "vocab_size": 49408 if shape != "tiny" else len(tokenizer),
                     "bos_token_id": tokenizer.bos_token_id, "eos_token_id": eos_id,
                     "pad_token_id": tokenizer.pad_token_id})
    torch.manual_seed(seed)
    CLIPModel(config).save_pretrained(directory, safe_serialization=True)
    tokenizer.save_pretrained(directory)
    size = vision["image_size"]
    CLIPImageProcessor(size={"shortest_edge": size}, crop_size={"height": size, "width": size}).save_pretrained(
        directory)
    return directory


def save_siglip(directory: Path, shape: str = "tiny", seed: int = 0) -> Path:
    """A random SiglipModel directory as `save_pretrained` writes it (SentencePiece tokenizer, squash resize)."""
    from transformers import SiglipConfig, SiglipImageProcessor, SiglipModel

    directory.mkdir(parents=True, exist_ok=True)
    tokenizer = siglip_tokenizer(directory)
    vision, text = SHAPES["tiny" if shape == "tiny" else "siglip-base"]
    config = SiglipConfig(
        vision_config=vision,
        text_config={**text, "max_position_embeddings": 16 if shape == "tiny" else 64,
                     "vocab_size": 32000 if shape != "tiny" else len(tokenizer), "bos_token_id": None,
                     "eos_token_id": tokenizer.eos_token_id, "pad_token_id": tokenizer.pad_token_id})
    torch.manual_seed(seed)
    model = SiglipModel(config)
    with torch.no_grad():  # random, but like a trained model's: SigLIP starts at scale 10, bias -10
        model.logit_scale.fill_(float(torch.log(torch.tensor(10.0))))
        model.logit_bias.fill_(-10.0)
    model.save_pretrained(directory, safe_serialization=True)
    tokenizer.save_pretrained(directory)
    size = vision["image_size"]
    SiglipImageProcessor(size={"height": size, "width": size}).save_pretrained(directory)
    return directory


def save_open_clip(directory: Path, seed: int = 0, width: int = 32, layers: int = 2, embed_dim: int = 16,
                   image_size: int = 32, patch_size: int = 8, context_length: int = 77) -> Path:
    """A random OpenCLIP ViT directory as the hub ships one (`open_clip_config.json` +
    `open_clip_model.safetensors`, open_clip's own key names) with a tiny CLIP tokenizer beside it."""
    from safetensors.torch import save_file

    directory.mkdir(parents=True, exist_ok=True)
    tokenizer = clip_tokenizer()
    tokenizer.save_pretrained(directory)
    generator = torch.Generator().manual_seed(seed)
    state = {"logit_scale": torch.tensor(float(torch.log(torch.tensor(1 / 0.07))))}
    grid = (image_size // patch_size) ** 2
    towers = {"visual.": {"conv1.weight": (width, 3, patch_size, patch_size), "class_embedding": (width,),
                          "positional_embedding": (grid + 1, width), "proj": (width, embed_dim),
                          **_layer_norm("ln_pre", width), **_layer_norm("ln_post", width)},
              "": {"token_embedding.weight": (len(tokenizer), width),
                   "positional_embedding": (context_length, width), "text_projection": (width, embed_dim),
                   **_layer_norm("ln_final", width)}}
    for prefix, shapes in towers.items():
        shapes.update(_resblocks("transformer.", width, layers))
        for name, shape in shapes.items():
            state[prefix + name] = _random(name, shape, generator)
    save_file(state, directory / "open_clip_model.safetensors")
    model_cfg = {"embed_dim": embed_dim, "quick_gelu": True,
                 "vision_cfg": {"image_size": image_size, "patch_size": patch_size, "width": width,
                                "layers": layers, "head_width": width // 2},
                 "text_cfg": {"context_length": context_length, "vocab_size": len(tokenizer), "width": width,
                              "heads": 2, "layers": layers}}
    (directory / "open_clip_config.json").write_text(json.dumps(
        {"model_cfg": model_cfg, "preprocess_cfg": {"mean": [0.48145466, 0.4578275, 0.40821073],
                                                    "std": [0.26862954, 0.26130258, 0.27577711]}}))
    return directory


def _layer_norm(name: str, width: int) -> dict:
    return {f"{name}.weight": (width,), f"{name}.bias": (width,)}


def _resblocks(prefix: str, width: int, layers: int) -> dict:
    """open_clip ResidualAttentionBlock parameter shapes (fused q/k/v in_proj, MLP ratio 4)."""
    shapes = {}
    for i in range(layers):
        block = f"{prefix}resblocks.{i}."
        shapes.update({f"{block}attn.in_proj_weight": (3 * width, width), f"{block}attn.in_proj_bias": (3 * width,),
                       f"{block}attn.out_proj.weight": (width, width), f"{block}attn.out_proj.bias": (width,),
                       f"{block}mlp.c_fc.weight": (4 * width, width), f"{block}mlp.c_fc.bias": (4 * width,),
                       f"{block}mlp.c_proj.weight": (width, 4 * width), f"{block}mlp.c_proj.bias": (width,),
                       **_layer_norm(f"{block}ln_1", width), **_layer_norm(f"{block}ln_2", width)})
    return shapes


def _random(name: str, shape: tuple, generator: torch.Generator) -> torch.Tensor:
    """LayerNorm gains near 1, everything else small noise: activations stay in a sensible range."""
    noise = torch.randn(shape, generator=generator) * 0.05
    return noise + 1.0 if ".weight" in name and "ln_" in name else noise


def save_sentence_transformer(directory: Path, seed: int = 0, pooling: str = "mean") -> Path:
    """A random BERT sentence-transformers directory (config.json, model.safetensors, a WordPiece tokenizer.json
    trained here, 1_Pooling/config.json), shaped like all-MiniLM-L6-v2 but tiny."""
    from tokenizers import decoders, processors
    from transformers import BertConfig, BertModel

    directory.mkdir(parents=True, exist_ok=True)
    specials = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"]
    wordpiece = Tokenizer(models.WordPiece(unk_token="[UNK]"))
    wordpiece.normalizer = normalizers.BertNormalizer(lowercase=True)
    wordpiece.pre_tokenizer = pre_tokenizers.BertPreTokenizer()
    wordpiece.decoder = decoders.WordPiece()
    wordpiece.train_from_iterator(sample_texts(), trainers.WordPieceTrainer(
        vocab_size=200, special_tokens=specials, show_progress=False))
    cls_id, sep_id = wordpiece.token_to_id("[CLS]"), wordpiece.token_to_id("[SEP]")
    wordpiece.post_processor = processors.TemplateProcessing(
        single="[CLS] $A [SEP]", special_tokens=[("[CLS]", cls_id), ("[SEP]", sep_id)])
    wordpiece.enable_padding(pad_id=wordpiece.token_to_id("[PAD]"), pad_token="[PAD]")
    wordpiece.save(str(directory / "tokenizer.json"))
    torch.manual_seed(seed)
    config = BertConfig(vocab_size=wordpiece.get_vocab_size(), hidden_size=32, num_hidden_layers=2,
                        num_attention_heads=2, intermediate_size=64, max_position_embeddings=64, pad_token_id=0)
    BertModel(config).save_pretrained(directory, safe_serialization=True)
    (directory / "1_Pooling").mkdir(exist_ok=True)
    (directory / "1_Pooling" / "config.json").write_text(json.dumps(
        {"word_embedding_dimension": 32, "pooling_mode_cls_token": pooling == "cls",
         "pooling_mode_mean_tokens": pooling == "mean"}))
    return directory
