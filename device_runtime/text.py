"""Tokenization with the `tokenizers` library alone, and dynamic padding into numpy batches.

Shared by training and the device so both see exactly the same ids.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import numpy as np


def load_tokenizer(path: str | Path, max_length: int):
    """Load a ``tokenizer.json`` with truncation at ``max_length`` and no padding.

    Padding is removed because batches are padded dynamically (see :func:`pad_batch`); some shipped
    tokenizers (all-MiniLM-L6-v2's among them) pad every input to 128 tokens otherwise.
    """
    from tokenizers import Tokenizer

    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"tokenizer file {path} does not exist")
    tokenizer = Tokenizer.from_file(str(path))
    tokenizer.no_padding()
    tokenizer.enable_truncation(max_length=max_length)
    return tokenizer


def encode(
    tokenizer, texts: Sequence[str], text_pairs: Sequence[str] | None = None
) -> list[tuple[list[int], list[int]]]:
    """Token ids and token-type ids per sample (pairs are encoded as ``[CLS] a [SEP] b [SEP]``)."""
    if text_pairs is not None and len(text_pairs) != len(texts):
        raise ValueError(f"{len(texts)} texts but {len(text_pairs)} text pairs")
    inputs = list(texts) if text_pairs is None else list(zip(texts, text_pairs, strict=True))
    return [(enc.ids, enc.type_ids) for enc in tokenizer.encode_batch(inputs)]


def pad_batch(encoded: Sequence[tuple[list[int], list[int]]], pad_id: int = 0) -> dict[str, np.ndarray]:
    """Pad to the longest sample of the batch: ``input_ids``, ``attention_mask``, ``token_type_ids`` (int64)."""
    if not encoded:
        raise ValueError("cannot pad an empty batch")
    width = max(len(ids) for ids, _ in encoded)
    input_ids = np.full((len(encoded), width), pad_id, dtype=np.int64)
    token_type_ids = np.zeros((len(encoded), width), dtype=np.int64)
    attention_mask = np.zeros((len(encoded), width), dtype=np.int64)
    for row, (ids, types) in enumerate(encoded):
        input_ids[row, : len(ids)] = ids
        token_type_ids[row, : len(types)] = types
        attention_mask[row, : len(ids)] = 1
    return {"input_ids": input_ids, "attention_mask": attention_mask, "token_type_ids": token_type_ids}
