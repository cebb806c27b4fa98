"""Short CI versions of the load test and the server fuzzer (benchmarks/load.py, benchmarks/fuzz_server.py).

Real server subprocesses (the CLI) on loopback, the tiny bundle: seconds, not minutes. The long runs and
their figures are in benchmarks/results/README.md.
"""

from __future__ import annotations

from pathlib import Path

import pytest

from cartosplit.benchmarks.fuzz_server import WEIGHTS, Target, make_task, run_fuzz
from cartosplit.benchmarks.load import run_load
from cartosplit.device_runtime.bundle import load_bundle

# words the tiny bundle's tokenizer knows (tests/conftest.py), so inputs are not all [UNK]
SENTENCES = ["the movie was very good", "a boring film", "this plot is awful", "the actors are superb", "it is dull"]


def quiet(*_: object) -> None:
    pass


@pytest.fixture(scope="module")
def fuzz_report(bundle: Path) -> dict:
    # a 1 MiB message limit keeps the over- and under-the-limit messages cheap
    return run_fuzz(bundle, messages=500, tiers=("cloud",), workers=2, max_message_mb=1.0, log=quiet)


def test_load_with_forced_offload_through_edge_and_cloud(bundle: Path) -> None:
    report = run_load(bundle, clients=4, seconds=3, force_offload=True, texts=SENTENCES, warmup_s=1, log=quiet)
    assert report["errors"] == 0, report["error_samples"]
    assert report["answers"] > 0 and report["throughput_per_s"] > 0
    assert report["missing_labels"] == 0
    # forced offload: every answer comes from the cloud through the edge, or (never here) degraded
    assert set(report["share_by_route"]) <= {"cloud_via_edge"} or report["degraded"] > 0
    for name in ("cloud", "edge"):
        assert report["final"][name]["alive"] and report["final"][name]["ok"], report["final"][name]
    # what the servers counted matches: each answer is one edge request forwarded to the cloud
    assert report["server_metrics"]["edge"]["requests"]["OK"] >= report["answers"]
    assert report["server_metrics"]["edge"]["forwarded"] >= report["answers"]


def test_fuzzed_cloud_never_answers_internal_and_keeps_serving(fuzz_report: dict) -> None:
    assert fuzz_report["malformed_messages"] >= 500
    assert fuzz_report["unknown_or_internal_from_servicer"] == 0
    assert fuzz_report["server_error_events"]["cloud"] == []
    assert fuzz_report["final"]["cloud"]["alive"] and fuzz_report["final"]["cloud"]["ok"], fuzz_report["final"]
    codes = fuzz_report["status_by_server"]["cloud"]
    assert codes.get("INVALID_ARGUMENT", 0) > 0 and codes.get("OK", 0) > 0  # refusals and answers both exercised


def test_fuzzed_cloud_refuses_every_malformed_request(fuzz_report: dict) -> None:
    # a malformed request answered OK, a valid one refused, a lost stream reply, an OK reply with NaN
    # probabilities (the bug this fuzzer found, fixed by refusing activations beyond +-1e4): holes in validation
    assert fuzz_report["problems"] == []


def test_generation_is_deterministic_and_covers_every_kind(bundle: Path) -> None:
    target = Target.from_bundle(load_bundle(bundle), max_message_bytes=1 << 20)
    first = [make_task(7, i, target, ("cloud", "edge")) for i in range(400)]
    again = [make_task(7, i, target, ("cloud", "edge")) for i in range(400)]
    assert [t.case.data for t in first] == [t.case.data for t in again]
    assert {t.case.category for t in first} == set(WEIGHTS)
    assert {t.server for t in first} == {"cloud", "edge"} and {t.rpc for t in first} == {"unary", "stream"}
    assert all(t.case.expected for t in first)
