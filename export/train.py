"""Fine-tune a multi-exit BERT and record its training dynamics, then map the data (cartography).

A run is a folder:
    run.json          configuration, data provenance, label names, status, timings
    split.npz         indices of the training subset and of the held-out calibration split
    model/            the trained model (safetensors, configs, tokenizer.json)
    checkpoint/       the last finished epoch (model, optimizer, scheduler): what ``--resume`` reads
    dynamics.npz      gold-label probability and correctness per epoch, sample and exit, for the trained
                      samples and (calib_*) for the held-out calibration split, which is never trained on
    cartography.npz / cartography.json / data_map.png
"""

from __future__ import annotations

import contextlib
import json
import math
import shutil
import signal
import threading
import time
from collections.abc import Iterator
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np

from cartosplit.device_runtime.defaults import DEFAULT_DEVICE_SPLIT, DEFAULT_EDGE_SPLIT
from cartosplit.device_runtime.text import encode, load_tokenizer, pad_batch
from cartosplit.export.cartography import (
    GroupingRule,
    assign_groups,
    compute_cartography,
    plot_data_map,
    summarize_groups,
)
from cartosplit.export.data import TextDataset, load_file, load_glue, task_spec
from cartosplit.export.model import DEFAULT_MODEL, MultiExitBert, build_model, resolve_model_path, tokenizer_file

RUN_FILE = "run.json"
EXITS = 3


@dataclass
class TrainConfig:
    task: str | None = "sst2"  # a GLUE task; None for a user's own --train-file/--dev-file
    out: str = "runs/sst2"
    model: str = DEFAULT_MODEL
    data_dir: str | None = None
    train_file: str | None = None  # a user's own CSV/JSONL instead of GLUE train
    dev_file: str | None = None
    train_size: int | None = 4000  # None = every training sample not held out for calibration
    calib_size: int = 2000
    epochs: int = 3
    batch_size: int = 32
    lr: float = 5e-5
    head_lr: float = 1e-3  # fresh exit heads learn faster than the pretrained encoder
    weight_decay: float = 0.01
    warmup_ratio: float = 0.1
    max_length: int = 128
    device_split: int = DEFAULT_DEVICE_SPLIT
    edge_split: int = DEFAULT_EDGE_SPLIT
    pooling: str = "mean"
    seed: int = 42
    threads: int | None = None
    grouping: GroupingRule = field(default_factory=GroupingRule)

    @classmethod
    def from_dict(cls, raw: dict) -> TrainConfig:
        raw = dict(raw)
        raw["grouping"] = GroupingRule(**raw.get("grouping", {}))
        return cls(**raw)


class RunError(ValueError):
    """A run folder that cannot be used as asked (missing, from another configuration, unfinished)."""


def exit_weights(config_depths: tuple[int, ...]) -> np.ndarray:
    """Deeper exits weigh more (DIMEE/PABEE): weight proportional to the exit's layer index."""
    w = np.asarray(config_depths, dtype=np.float64)
    return w / w.sum()


def load_datasets(cfg: TrainConfig) -> tuple[TextDataset, TextDataset]:
    """Full training pool and the dev set used for reporting (never for tuning)."""
    if cfg.train_file:
        train = load_file(cfg.train_file)
        if not cfg.dev_file:
            raise RunError("--train-file needs --dev-file: the dev set reports results and is never tuned on")
        dev = load_file(cfg.dev_file, label_names=train.label_names)
        return train, dev
    task_spec(cfg.task)  # unknown task -> clear error before anything loads
    return load_glue(cfg.task, "train", cfg.data_dir), load_glue(cfg.task, "dev", cfg.data_dir)


def split_indices(n: int, train_size: int | None, calib_size: int, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """Disjoint random calibration and training subsets of a pool of ``n`` samples."""
    if calib_size < 1:
        raise RunError("--calib-size must be at least 1: thresholds are chosen on held-out samples")
    if calib_size >= n:
        raise RunError(f"--calib-size {calib_size} leaves no training sample out of {n}")
    available = n - calib_size
    if train_size is not None and not 1 <= train_size <= available:
        raise RunError(
            f"--train-size must lie in [1, {available}] ({n} samples, {calib_size} held out for calibration)"
        )
    order = np.random.default_rng(seed).permutation(n)
    calib = np.sort(order[:calib_size])
    train = np.sort(order[calib_size : calib_size + (train_size or available)])
    return train, calib


def length_bucketed_batches(lengths: np.ndarray, batch_size: int, rng: np.random.Generator) -> list[np.ndarray]:
    """Shuffle, sort by length inside chunks of 50 batches, then shuffle the batches.

    Samples of similar length share a batch, so dynamic padding wastes little compute, while the
    chunking keeps the order random enough for SGD.
    """
    order = rng.permutation(len(lengths))
    chunk = batch_size * 50
    batches = []
    for start in range(0, len(order), chunk):
        part = order[start : start + chunk]
        part = part[np.argsort(lengths[part], kind="stable")]
        batches.extend(part[i : i + batch_size] for i in range(0, len(part), batch_size))
    return [batches[i] for i in rng.permutation(len(batches))]


def to_torch(batch: dict[str, np.ndarray]):
    import torch

    return {k: torch.from_numpy(v) for k, v in batch.items()}


def predict_probs(
    model: MultiExitBert,
    encoded: list,
    batch_size: int = 64,
    pooled_depths: tuple[int, ...] = (),
    progress: str | None = None,
) -> tuple[np.ndarray, dict[int, np.ndarray]]:
    """Softmax probabilities at every exit, [exits, N, K], and pooled features at ``pooled_depths``."""
    import torch
    from tqdm.auto import tqdm

    model.eval()
    lengths = np.array([len(ids) for ids, _ in encoded])
    order = np.argsort(lengths, kind="stable")  # similar lengths together: little padding
    probs = np.zeros((EXITS, len(encoded), model.config.num_labels), dtype=np.float32)
    pooled = {d: np.zeros((len(encoded), model.config.hidden_size), dtype=np.float32) for d in pooled_depths}
    with torch.inference_mode():
        for start in tqdm(range(0, len(order), batch_size), desc=progress, disable=progress is None, leave=False):
            idx = order[start : start + batch_size]
            logits, feats = model(**to_torch(pad_batch([encoded[i] for i in idx])), pooled_depths=pooled_depths)
            for k, lg in enumerate(logits):
                probs[k, idx] = torch.softmax(lg.float(), dim=-1).numpy()
            for d, f in feats.items():
                pooled[d][idx] = f.numpy()
    return probs, pooled


def _save_checkpoint(run: Path, model, optimizer, scheduler, epoch: int, dynamics: dict) -> None:
    """Write the new checkpoint beside the old one, then swap: an interruption leaves one intact."""
    import torch

    tmp = run / "checkpoint.tmp"
    shutil.rmtree(tmp, ignore_errors=True)
    model.save(tmp)
    torch.save({"optimizer": optimizer.state_dict(), "scheduler": scheduler.state_dict()}, tmp / "optimizer.pt")
    np.savez(tmp / "dynamics.npz", **dynamics)
    (tmp / "state.json").write_text(json.dumps({"epochs_done": epoch}) + "\n")
    old = run / "checkpoint"
    if old.exists():
        shutil.rmtree(old)
    tmp.rename(old)


def _check_resume_config(run: Path, cfg: TrainConfig) -> None:
    saved = json.loads((run / RUN_FILE).read_text())["config"]
    # epochs may grow on resume (train longer); anything else must match or the dynamics mean nothing
    mismatched = {k for k, v in asdict(cfg).items() if k not in ("epochs", "threads") and saved.get(k) != v}
    if mismatched:
        details = ", ".join(f"{k}: run has {saved.get(k)!r}, asked {getattr(cfg, k)!r}" for k in sorted(mismatched))
        raise RunError(f"--resume with a different configuration than {run} was started with ({details})")


class TrainingInterrupted(KeyboardInterrupt):
    """SIGTERM during training: handled as Ctrl-C (the last finished epoch stays; ``--resume`` continues)."""


@contextlib.contextmanager
def _sigterm_as_interrupt() -> Iterator[None]:
    """Turn SIGTERM (a container stop, ``kill``) into :class:`TrainingInterrupted` while training runs."""
    if threading.current_thread() is not threading.main_thread():  # signal handlers only work there
        yield
        return

    def on_sigterm(_signum: int, _frame: object) -> None:
        raise TrainingInterrupted("SIGTERM")

    previous = signal.signal(signal.SIGTERM, on_sigterm)
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, previous)


def _mark_interrupted(run: Path, why: str, log) -> None:
    """Say in run.json that training stopped early, after which epoch, and how to go on."""
    state = run / "checkpoint" / "state.json"
    epochs_done = json.loads(state.read_text())["epochs_done"] if state.is_file() else 0
    info = json.loads((run / RUN_FILE).read_text())
    info.update(status="interrupted", interrupted_by=why, epochs_done=epochs_done)
    (run / RUN_FILE).write_text(json.dumps(info, indent=2) + "\n")
    log(
        f"interrupted ({why}) after epoch {epochs_done}: {run / RUN_FILE} says status 'interrupted'; "
        f"`cartosplit train --resume --out {run}` (same other options) continues from the last finished epoch"
    )


def train(cfg: TrainConfig, resume: bool = False, log=print) -> dict:
    """Train, record dynamics, map the data. Returns the summary also written to run.json."""
    import torch
    from tqdm.auto import tqdm

    run = Path(cfg.out)
    started = time.time()
    if cfg.threads:
        torch.set_num_threads(cfg.threads)

    train_pool, dev = load_datasets(cfg)
    train_idx, calib_idx = split_indices(len(train_pool), cfg.train_size, cfg.calib_size, cfg.seed)
    train_set = train_pool.subset(train_idx)

    if resume:
        if not (run / RUN_FILE).is_file():
            raise RunError(f"--resume: {run} holds no run (no {RUN_FILE}); start without --resume")
        _check_resume_config(run, cfg)
    elif (run / RUN_FILE).exists():
        raise RunError(f"{run} already holds a run: pass --resume to continue it, or choose another --out")

    torch.manual_seed(cfg.seed)
    model = build_model(cfg.model, len(train_pool.label_names), cfg.device_split, cfg.edge_split, cfg.pooling)
    # everything above validates input (data, labels, split points, model): nothing is written before it
    run.mkdir(parents=True, exist_ok=True)
    model_path = resolve_model_path(cfg.model)
    tok_path = tokenizer_file(model_path, run / "model" / "tokenizer.json")
    tokenizer = load_tokenizer(tok_path, cfg.max_length)
    np.savez(run / "split.npz", train=train_idx, calib=calib_idx)
    info = {
        "config": asdict(cfg),
        "label_names": list(train_pool.label_names),
        "data": {
            "train": train_pool.source,
            "dev": dev.source,
            "train_samples": len(train_set),
            "calib_samples": len(calib_idx),
            "dev_samples": len(dev),
        },
        "status": "training",
    }
    if not resume:
        (run / RUN_FILE).write_text(json.dumps(info, indent=2) + "\n")
    else:  # an interrupted run trains again
        previous = json.loads((run / RUN_FILE).read_text())
        if previous.get("status") == "interrupted":
            previous["status"] = "training"
            (run / RUN_FILE).write_text(json.dumps(previous, indent=2) + "\n")

    head_params = list(model.heads.parameters())
    head_ids = {id(p) for p in head_params}
    encoder_params = [p for p in model.parameters() if id(p) not in head_ids]
    optimizer = torch.optim.AdamW(
        [{"params": encoder_params, "lr": cfg.lr}, {"params": head_params, "lr": cfg.head_lr}],
        weight_decay=cfg.weight_decay,
    )
    steps_per_epoch = math.ceil(len(train_set) / cfg.batch_size)
    total_steps = steps_per_epoch * cfg.epochs
    warmup = max(1, int(cfg.warmup_ratio * total_steps))
    scheduler = torch.optim.lr_scheduler.LambdaLR(
        optimizer, lambda s: min((s + 1) / warmup, max(0.0, (total_steps - s) / max(1, total_steps - warmup)))
    )

    gold_prob = np.full((cfg.epochs, len(train_set), EXITS), np.nan, dtype=np.float32)
    correct = np.zeros((cfg.epochs, len(train_set), EXITS), dtype=bool)
    # held-out dynamics: the calibration split's gold-label probability after every epoch (a forward
    # pass, no training on it), so groups can describe how the model treats samples it never saw
    calib_set = train_pool.subset(calib_idx)
    calib_gold = np.full((cfg.epochs, len(calib_idx), EXITS), np.nan, dtype=np.float32)
    calib_correct = np.zeros((cfg.epochs, len(calib_idx), EXITS), dtype=bool)
    first_epoch = 0
    if resume and (run / "checkpoint" / "state.json").is_file():
        ckpt = run / "checkpoint"
        from safetensors.torch import load_model

        load_model(model, str(ckpt / "model.safetensors"))
        state = torch.load(ckpt / "optimizer.pt", weights_only=True)  # weights_only: no arbitrary pickle
        optimizer.load_state_dict(state["optimizer"])
        scheduler.load_state_dict(state["scheduler"])
        first_epoch = json.loads((ckpt / "state.json").read_text())["epochs_done"]
        with np.load(ckpt / "dynamics.npz") as saved:
            done = min(first_epoch, cfg.epochs)
            gold_prob[:done], correct[:done] = saved["gold_prob"][:done], saved["correct"][:done]
            if "calib_gold_prob" in saved:  # a checkpoint from before held-out dynamics has none: left NaN
                calib_gold[:done], calib_correct[:done] = saved["calib_gold_prob"][:done], saved["calib_correct"][:done]
        log(f"resuming {run} after epoch {first_epoch}")

    encoded = encode(tokenizer, train_set.texts, train_set.text_pairs)
    calib_encoded = encode(tokenizer, calib_set.texts, calib_set.text_pairs)
    lengths = np.array([len(ids) for ids, _ in encoded])
    labels = torch.from_numpy(train_set.labels)
    weights = torch.tensor(exit_weights(model.config.exit_depths()), dtype=torch.float32)

    try:
        with _sigterm_as_interrupt():
            for epoch in range(first_epoch, cfg.epochs):
                model.train()
                torch.manual_seed(cfg.seed + 1000 + epoch)  # dropout stream per epoch: resume replays it exactly
                batches = length_bucketed_batches(lengths, cfg.batch_size, np.random.default_rng(cfg.seed + epoch))
                bar = tqdm(batches, desc=f"epoch {epoch + 1}/{cfg.epochs}", unit="batch")
                running = 0.0
                for step, idx in enumerate(bar):
                    batch = to_torch(pad_batch([encoded[i] for i in idx]))
                    logits, _ = model(**batch)
                    y = labels[idx]
                    losses = torch.stack([torch.nn.functional.cross_entropy(lg, y) for lg in logits])
                    loss = (weights * losses).sum()
                    optimizer.zero_grad(set_to_none=True)
                    loss.backward()
                    torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
                    optimizer.step()
                    scheduler.step()
                    with torch.no_grad():  # dynamics from the training pass itself, as Swayamdipta et al. record them
                        for k, lg in enumerate(logits):
                            p = torch.softmax(lg.float(), dim=-1)
                            gold_prob[epoch, idx, k] = p[torch.arange(len(idx)), y].numpy()
                            correct[epoch, idx, k] = (p.argmax(-1) == y).numpy()
                    running = 0.9 * running + 0.1 * loss.item() if step else loss.item()
                    bar.set_postfix(loss=f"{running:.3f}")
                calib_probs, _ = predict_probs(model, calib_encoded, cfg.batch_size, progress="held-out dynamics")
                calib_gold[epoch] = calib_probs[:, np.arange(len(calib_idx)), calib_set.labels].T
                calib_correct[epoch] = (calib_probs.argmax(-1) == calib_set.labels[None, :]).T
                dynamics = {"gold_prob": gold_prob, "correct": correct, "calib_gold_prob": calib_gold,
                                "calib_correct": calib_correct}  # fmt: skip
                _save_checkpoint(run, model, optimizer, scheduler, epoch + 1, dynamics)
                log(
                    f"epoch {epoch + 1}: train accuracy per exit (device/edge/final) "
                    + "/".join(f"{correct[epoch, :, k].mean():.3f}" for k in range(EXITS))
                )
    except KeyboardInterrupt as exc:  # Ctrl-C or SIGTERM: the checkpoint of the last finished epoch stays
        _mark_interrupted(run, "SIGTERM" if isinstance(exc, TrainingInterrupted) else "Ctrl-C", log)
        raise

    model.save(run / "model")
    np.savez(
        run / "dynamics.npz",
        gold_prob=gold_prob,
        correct=correct,
        sample_index=train_idx,
        calib_gold_prob=calib_gold,
        calib_correct=calib_correct,
        calib_index=calib_idx,
    )

    carto = compute_cartography(gold_prob, correct)
    groups = assign_groups(carto, cfg.grouping)
    summary = summarize_groups(groups, cfg.grouping)
    np.savez(
        run / "cartography.npz",
        confidence=carto.confidence,
        variability=carto.variability,
        correctness=carto.correctness,
        groups=groups,
    )
    name = cfg.task or Path(cfg.train_file or "own data").name
    plot_data_map(carto, groups, run / "data_map.png", title=f"{name}: {len(groups)} training samples")
    (run / "cartography.json").write_text(json.dumps(summary.to_dict(), indent=2) + "\n")

    dev_probs, _ = predict_probs(model, encode(tokenizer, dev.texts, dev.text_pairs), progress="dev")
    dev_acc = [float((dev_probs[k].argmax(-1) == dev.labels).mean()) for k in range(EXITS)]
    info.update(
        status="trained",
        groups=summary.to_dict(),
        dev_accuracy={"device": dev_acc[0], "edge": dev_acc[1], "final": dev_acc[2]},
        train_seconds=round(time.time() - started, 1),
    )
    (run / RUN_FILE).write_text(json.dumps(info, indent=2) + "\n")
    log(
        "groups easy/medium/hard: "
        + "/".join(f"{summary.shares[g]:.0%}" for g in ("easy", "medium", "hard"))
        + f"; dev accuracy device/edge/final: {dev_acc[0]:.3f}/{dev_acc[1]:.3f}/{dev_acc[2]:.3f}"
        + f"; data map: {run / 'data_map.png'}"
    )
    return info


def load_run(run: str | Path) -> tuple[dict, TrainConfig]:
    run = Path(run)
    if not (run / RUN_FILE).is_file():
        raise RunError(f"{run} is not a training run (no {RUN_FILE}); run `cartosplit train` first")
    info = json.loads((run / RUN_FILE).read_text())
    if info.get("status") not in ("trained", "calibrated"):
        raise RunError(f"{run} has not finished training (status {info.get('status')!r}); use train --resume")
    return info, TrainConfig.from_dict(info["config"])
