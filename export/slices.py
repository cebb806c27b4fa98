"""The straight-line graphs each tier runs, as torch modules ready to trace.

Routing and exit decisions stay in Python on the device and servers; each graph here is plain
computation with no data-dependent control flow, so ONNX and TFLite converters see a fixed graph.

  device_head   tokens -> first r layers -> (router logits, hidden state at depth r)
  device_tail   hidden at r -> layers r+1..d -> (hidden state at d, device exit logits)
  edge          hidden at d -> layers d+1..e -> (hidden state at e, edge exit logits)
  cloud_from_<k> hidden at k -> layers k+1..L -> final exit logits   (k = e, and k = r when r > 0)
  full          tokens -> all L layers -> final exit logits (all-cloud baseline, recompute from text)

Hidden states cross tiers unpooled ([B, S, H]) with the attention mask, because the next slice's
attention needs every token.
"""

from __future__ import annotations

import torch
from torch import nn

from cartosplit.device_runtime.manifest import cloud_graph
from cartosplit.export.model import MultiExitBert
from cartosplit.export.router import Router


def _embed(model: MultiExitBert, input_ids: torch.Tensor, token_type_ids: torch.Tensor) -> torch.Tensor:
    # explicit position ids (arange) instead of the embeddings' buffer slice: converters lower it cleanly
    positions = torch.arange(input_ids.shape[1], device=input_ids.device).unsqueeze(0)
    return model.encoder.embeddings(input_ids=input_ids, token_type_ids=token_type_ids, position_ids=positions)


class DeviceHead(nn.Module):
    def __init__(self, model: MultiExitBert, router: Router, router_depth: int) -> None:
        super().__init__()
        self.model, self.router, self.depth = model, router, router_depth

    def forward(self, input_ids, attention_mask, token_type_ids):
        hidden = _embed(self.model, input_ids, token_type_ids)
        mask = self.model.additive_mask(attention_mask, hidden.dtype)
        hidden = self.model.run_layers(hidden, mask, 0, self.depth)
        # the token count is free at depth r; a router without free features leaves it out of the graph
        return self.router(self.model.pool(hidden, attention_mask), attention_mask.sum(-1)), hidden


class LayerSlice(nn.Module):
    """Layers ``start+1 .. end`` and, when ``end`` is an exit depth, that exit's head."""

    def __init__(self, model: MultiExitBert, start: int, end: int, return_hidden: bool = True) -> None:
        super().__init__()
        exits = dict(zip(model.config.exit_depths(), range(3), strict=True))
        if end not in exits:
            raise ValueError(f"slice end {end} is not an exit depth {model.config.exit_depths()}")
        self.model, self.start, self.end = model, start, end
        self.head = model.heads[exits[end]]
        self.return_hidden = return_hidden

    def forward(self, hidden, attention_mask):
        mask = self.model.additive_mask(attention_mask, hidden.dtype)
        hidden = self.model.run_layers(hidden, mask, self.start, self.end)
        logits = self.head(self.model.pool(hidden, attention_mask))
        return (hidden, logits) if self.return_hidden else logits


class FullModel(nn.Module):
    def __init__(self, model: MultiExitBert) -> None:
        super().__init__()
        self.model = model

    def forward(self, input_ids, attention_mask, token_type_ids):
        hidden = _embed(self.model, input_ids, token_type_ids)
        mask = self.model.additive_mask(attention_mask, hidden.dtype)
        hidden = self.model.run_layers(hidden, mask, 0, self.model.config.num_layers)
        return self.model.heads[2](self.model.pool(hidden, attention_mask))


TOKEN_INPUTS = ("input_ids", "attention_mask", "token_type_ids")
HIDDEN_INPUTS = ("hidden_in", "attention_mask")


def build_slices(model: MultiExitBert, router: Router, router_depth: int) -> dict[str, tuple[nn.Module, tuple, tuple]]:
    """Every graph of a bundle: name -> (module in eval mode, input names, output names)."""
    cfg = model.config
    d, e, total = cfg.device_split, cfg.edge_split, cfg.num_layers
    slices = {
        "device_head": (DeviceHead(model, router, router_depth), TOKEN_INPUTS, ("router_logits", "hidden_out")),
        "device_tail": (LayerSlice(model, router_depth, d), HIDDEN_INPUTS, ("hidden_out", "logits")),
        "edge": (LayerSlice(model, d, e), HIDDEN_INPUTS, ("hidden_out", "logits")),
        cloud_graph(e): (LayerSlice(model, e, total, return_hidden=False), HIDDEN_INPUTS, ("logits",)),
        "full": (FullModel(model), TOKEN_INPUTS, ("logits",)),
    }
    if router_depth > 0:  # r = 0: a hard sample goes to the cloud as tokens, through `full`
        slices[cloud_graph(router_depth)] = (
            LayerSlice(model, router_depth, total, return_hidden=False),
            HIDDEN_INPUTS,
            ("logits",),
        )
    for module, _, _ in slices.values():
        module.eval()
    return slices
