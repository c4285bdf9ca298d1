"""Tiny Hugging Face model folders built in the test (no download): a 2-layer BERT with a
word-level tokenizer, as an embedding model (sentence-transformers mean pooling) or a
sequence classifier."""

from __future__ import annotations

import json
from pathlib import Path

WORDS = [
    "the",
    "a",
    "of",
    "to",
    "and",
    "in",
    "is",
    "it",
    "that",
    "for",
    "on",
    "with",
    "as",
    "was",
    "by",
    "this",
    "be",
    "are",
    "from",
    "at",
    "or",
    "an",
    "which",
    "file",
    "path",
    "data",
    "value",
    "list",
    "return",
    "object",
    "name",
    "string",
    "number",
    "function",
    "module",
    "class",
    "test",
]


def tiny_folder(root: Path, task: str = "embedding", seed: int = 0) -> Path:
    import torch

    from compress.models.hf import import_transformers

    tf = import_transformers()
    root.mkdir(parents=True, exist_ok=True)
    vocab = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", *WORDS]
    (root / "vocab.txt").write_text("\n".join(vocab) + "\n")
    tok = tf.BertTokenizer(vocab_file=str(root / "vocab.txt"))
    tok.save_pretrained(str(root))
    cfg = tf.BertConfig(
        vocab_size=len(vocab),
        hidden_size=32,
        num_hidden_layers=2,
        num_attention_heads=4,
        intermediate_size=48,
        max_position_embeddings=160,
        num_labels=3,
    )
    torch.manual_seed(seed)
    model = (tf.BertForSequenceClassification if task == "classification" else tf.BertModel)(cfg)
    model.save_pretrained(str(root))
    if task == "embedding":
        (root / "modules.json").write_text(
            json.dumps(
                [
                    {"idx": 0, "name": "0", "path": "", "type": "sentence_transformers.models.Transformer"},
                    {"idx": 1, "name": "1", "path": "1_Pooling", "type": "sentence_transformers.models.Pooling"},
                    {"idx": 2, "name": "2", "path": "2_Normalize", "type": "sentence_transformers.models.Normalize"},
                ]
            )
        )
        (root / "1_Pooling").mkdir(exist_ok=True)
        (root / "1_Pooling" / "config.json").write_text(json.dumps({"pooling_mode_mean_tokens": True}))
    return root


def sentences(n: int, seed: int = 0) -> list[str]:
    import random

    r = random.Random(seed)
    return [" ".join(r.choice(WORDS) for _ in range(r.randint(3, 12))) for _ in range(n)]


def tiny_vit_folder(root: Path, seed: int = 0) -> Path:
    """A 2-layer ViT image classifier (32×32 images, 8×8 patches, 3 classes)."""
    import torch

    from compress.models.hf import import_transformers

    tf = import_transformers()
    cfg = tf.ViTConfig(
        image_size=32,
        patch_size=8,
        num_channels=3,
        hidden_size=32,
        num_hidden_layers=2,
        num_attention_heads=4,
        intermediate_size=48,
        num_labels=3,
    )
    torch.manual_seed(seed)
    tf.ViTForImageClassification(cfg).save_pretrained(str(root))
    return root
