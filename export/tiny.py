"""A tiny random BERT with its own tokenizer, and a synthetic task it learns in seconds.

For the tests, and for benchmarks that need a small slice without downloading anything (e.g.
``cartosplit bench cloud-scale --tiny``): the vocabulary, tokenizer and weights are made on the spot.
"""

from __future__ import annotations

import csv
import random
from pathlib import Path

POSITIVE = ["good", "great", "fine", "nice", "superb", "lovely"]
NEGATIVE = ["bad", "awful", "poor", "sad", "dull", "boring"]
FILLER = ["the", "a", "movie", "film", "is", "was", "very", "quite", "plot", "actors", "this", "it"]
SPECIAL = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"]


def make_tiny_bert(folder: Path, layers: int = 4, hidden: int = 32, seed: int = 0) -> Path:
    """A random BertModel (hidden 32, 4 layers by default) with a WordPiece tokenizer.json beside it."""
    import torch
    from tokenizers import Tokenizer, models, normalizers, pre_tokenizers, processors
    from transformers import BertConfig, BertModel

    vocab = {tok: i for i, tok in enumerate(SPECIAL + POSITIVE + NEGATIVE + FILLER)}
    tokenizer = Tokenizer(models.WordPiece(vocab, unk_token="[UNK]"))
    tokenizer.normalizer = normalizers.BertNormalizer(lowercase=True)
    tokenizer.pre_tokenizer = pre_tokenizers.BertPreTokenizer()
    cls, sep = vocab["[CLS]"], vocab["[SEP]"]
    tokenizer.post_processor = processors.TemplateProcessing(
        single="[CLS] $A [SEP]",
        pair="[CLS] $A [SEP] $B:1 [SEP]:1",
        special_tokens=[("[CLS]", cls), ("[SEP]", sep)],
    )
    torch.manual_seed(seed)
    config = BertConfig(
        vocab_size=len(vocab),
        hidden_size=hidden,
        num_hidden_layers=layers,
        num_attention_heads=2,
        intermediate_size=2 * hidden,
        max_position_embeddings=64,
    )
    folder.mkdir(parents=True, exist_ok=True)
    BertModel(config).save_pretrained(folder)
    tokenizer.save(str(folder / "tokenizer.json"))
    return folder


def synthetic_rows(n: int, seed: int, noise: float = 0.05) -> list[tuple[str, str]]:
    """Sentiment sentences: one cue word among fillers; some rows carry both cues (hard), some flipped labels."""
    rng = random.Random(seed)
    rows = []
    for _ in range(n):
        label = rng.choice(["positive", "negative"])
        words = rng.sample(FILLER, rng.randint(2, 6))
        cue = rng.choice(POSITIVE if label == "positive" else NEGATIVE)
        words.insert(rng.randrange(len(words) + 1), cue)
        if rng.random() < 0.15:  # a conflicting cue: harder to read early
            words.append(rng.choice(NEGATIVE if label == "positive" else POSITIVE))
        if rng.random() < noise:
            label = "negative" if label == "positive" else "positive"
        rows.append((" ".join(words), label))
    return rows


def synthetic_pair_rows(n: int, seed: int, noise: float = 0.05) -> list[tuple[str, str, str]]:
    """(text, text_pair, label): ``synthetic_rows``' sentence as the text, and a second, cue-free one as its pair,
    for a run trained on text pairs (as MRPC or RTE are)."""
    rng = random.Random(seed + 1)
    rows = synthetic_rows(n, seed, noise)
    return [(text, " ".join(rng.sample(FILLER, rng.randint(2, 5))), label) for text, label in rows]


def write_csv(path: Path, rows: list[tuple[str, str]] | list[tuple[str, str, str]]) -> Path:
    """Rows of (text, label), or (text, text_pair, label) from ``synthetic_pair_rows``, under their header."""
    with path.open("w", newline="", encoding="utf-8") as f:
        writer = csv.writer(f)
        writer.writerow(["text", "text_pair", "label"] if rows and len(rows[0]) == 3 else ["text", "label"])
        writer.writerows(rows)
    return path


def tiny_train_config(out: Path, model: Path, files: tuple[Path, Path], **overrides):
    from cartosplit.export.train import TrainConfig

    settings = dict(
        out=str(out),
        model=str(model),
        train_file=str(files[0]),
        dev_file=str(files[1]),
        train_size=400,
        calib_size=150,
        epochs=3,
        batch_size=16,
        lr=1e-3,
        head_lr=3e-3,
        max_length=32,
        device_split=1,
        edge_split=2,
        seed=0,
        threads=1,
    )
    settings.update(overrides)
    return TrainConfig(**settings)
