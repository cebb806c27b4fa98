"""``cartosplit run``'s inputs and scoring: CSV/TSV tables with a header, strict JSON keys, the pair check
against the model (and serve-device's 400), labels and the summary, the all-cloud comparison.

The tiny ``bundle`` with no edge or cloud answers everything on the device; ``--compare-all-cloud`` runs
against a real cloud server. Expected answers come from a DeviceRuntime called directly, so a misread
input (a header answered as a text, a label inside a text) shows as a different answer.
"""

from __future__ import annotations

import csv
import http.client
import io
import json
import math
import subprocess
import sys
import threading

import numpy as np
import pytest

import cartosplit.device_runtime.runtime as runtime_module
from cartosplit.cli import main
from cartosplit.device_runtime import scoring
from cartosplit.device_runtime.input_formats import InputFormatError, table_columns
from cartosplit.device_runtime.runtime import DeviceRuntime
from cartosplit.device_runtime.service import DeviceService, RequestError, parse_classify_request, parse_config
from cartosplit.serving.process import start_servers, stop_servers
from tests.conftest import synthetic_rows

TEXTS = ["the movie was very good", "boring plot, dull actors", 'a "quoted film', "superb"]


@pytest.fixture(scope="module")
def reference(bundle):
    """What the kit answers, called directly: the answers a correctly read input must get."""
    with DeviceRuntime(bundle) as rt:
        yield rt


@pytest.fixture
def patch_model(monkeypatch):
    """Set fields of bundle.manifest.model (text_pairs, task) in the bundle `cartosplit run` loads."""

    def patch(**fields):
        real = runtime_module.load_bundle

        def load(folder, verify=True):
            bundle = real(folder, verify)
            for name, value in fields.items():
                setattr(bundle.manifest.model, name, value)
            return bundle

        monkeypatch.setattr(runtime_module, "load_bundle", load)

    return patch


@pytest.fixture
def model_trained_on(patch_model):
    """Set bundle.manifest.model.text_pairs (True, False or None) of the bundle `cartosplit run` loads."""
    return lambda text_pairs: patch_model(text_pairs=text_pairs)


def _run(bundle, tmp_path, *args: str) -> tuple[int, list[dict]]:
    out = tmp_path / "out.jsonl"
    out.unlink(missing_ok=True)  # a refused run must leave no answer: not one from the run before
    code = main(["run", "--bundle", str(bundle), "--output", str(out), *args])
    rows = [json.loads(line) for line in out.read_text().splitlines()] if out.exists() else []
    return code, rows


def _expected(reference, texts, pairs=None) -> list[str]:
    return [p.label for p in reference.predict(texts, pairs)]


# --- tables -----------------------------------------------------------------------------------------------


def test_csv_header_names_the_columns_and_is_never_answered(bundle, reference, tmp_path):
    source = tmp_path / "mine.csv"
    with source.open("w", newline="", encoding="utf-8-sig") as f:  # a BOM, as Excel writes
        writer = csv.writer(f)
        writer.writerow(["id", "sentence", "label"])
        writer.writerows([[f"s{i}", text, "positive" if i % 2 else "0"] for i, text in enumerate(TEXTS)])
    code, rows = _run(bundle, tmp_path, "--input", str(source))
    assert code == 0
    assert [r["index"] for r in rows] == [0, 1, 2, 3] and [r["id"] for r in rows] == ["s0", "s1", "s2", "s3"]
    assert [r["label"] for r in rows] == _expected(reference, TEXTS)  # the cell, comma and quote included
    assert [r["label_given"] for r in rows] == ["negative", "positive", "negative", "positive"]


def test_tsv_reads_qnli_question_and_sentence_as_a_pair(bundle, reference, tmp_path, model_trained_on):
    model_trained_on(True)
    questions = ["is the film good?", 'what did "critics say', "was it dull?"]
    sentences = ["the movie was very good", "superb actors", "a boring plot"]
    source = tmp_path / "qnli.tsv"
    lines = ["index\tquestion\tsentence\tlabel"]
    lines += [f"{i}\t{q}\t{s}\t{i % 2}" for i, (q, s) in enumerate(zip(questions, sentences, strict=True))]
    source.write_text("\n".join(lines) + "\n\n")  # a trailing blank line is no input
    code, rows = _run(bundle, tmp_path, "--input", str(source))
    assert code == 0 and [r["id"] for r in rows] == ["0", "1", "2"]
    assert [r["label"] for r in rows] == _expected(reference, questions, sentences)
    # the same file from stdin needs its format named: auto sees a header line and refuses it
    code, rows = _run(bundle, tmp_path, "--input-format", "tsv", "--input", str(source))
    assert code == 0 and len(rows) == 3


@pytest.mark.parametrize(
    ("header", "message"),
    [
        ("text,pair,label", "unknown column(s) ['pair'] in header ['text', 'pair', 'label']; accepted: the text in"),
        ("review,label", "header ['review', 'label'] names no text column; accepted: the text in text, sentence"),
        ("text,text", "column(s) ['text'] named twice"),
    ],
)
def test_unknown_or_missing_table_columns_exit_2_before_any_answer(bundle, tmp_path, capsys, header, message):
    source = tmp_path / "mine.csv"
    source.write_text(f"{header}\ngood film,a plot,1\n")
    assert _run(bundle, tmp_path, "--input", str(source)) == (2, [])  # no output line at all
    err = capsys.readouterr().err
    assert f"cartosplit run: error: {source}: line 1: " in err and message in err, err


def test_table_column_rules():
    assert table_columns(["question", "sentence", "label"], "x").pair_name == "sentence"  # QNLI
    assert table_columns(["sentence", "label"], "x").pair is None  # SST-2
    c = table_columns(["Quality", "#1 ID", "#2 ID", "#1 String", "#2 String"], "x")  # MRPC as GLUE ships it
    assert (c.text, c.pair, c.label) == (3, 4, 0)
    with pytest.raises(InputFormatError, match=r"more than one label or id column"):
        table_columns(["text", "label", "Quality"], "x")
    with pytest.raises(InputFormatError, match="is it comma-separated"):
        table_columns(["text,label"], "x", tsv=True)


def test_a_bad_row_costs_only_itself(bundle, tmp_path):
    source = tmp_path / "rows.tsv"
    source.write_bytes(b"text\tlabel\ngood film\t1\ntoo\tmany\tfields\n\xff bad bytes\t0\nsad plot\tmaybe\ndull\t0\n")
    code, rows = _run(bundle, tmp_path, "--input", str(source))
    assert code == 1 and [r["index"] for r in rows] == [0, 1, 2, 3, 4]
    errors = [r.get("error", "") for r in rows]
    assert "label" in rows[0] and "label" in rows[4]
    assert errors[1] == "line 3: 3 tab-separated fields, the header has 2 (a tab inside a text?)"
    assert errors[2] == "line 4: not UTF-8 (byte 0xff)"
    assert errors[3].startswith("line 5: unknown label 'maybe'; this model's labels are negative, positive")


def test_a_header_line_in_text_input_is_refused_unless_text_is_asked(bundle, tmp_path, capsys):
    source = tmp_path / "texts.txt"
    source.write_text("sentence\tlabel\ngood film\t1\n")
    code, rows = _run(bundle, tmp_path, "--input", str(source))
    assert code == 2 and rows == []
    err = capsys.readouterr().err
    assert "line 1 looks like a table's header row ('sentence\\tlabel')" in err and "--input-format tsv" in err
    code, rows = _run(bundle, tmp_path, "--input", str(source), "--input-format", "text")
    assert code == 0 and len(rows) == 2  # asked for: every line a text
    source.write_text("text,label\n")
    assert _run(bundle, tmp_path, "--input", str(source))[0] == 2
    assert "--input-format csv" in capsys.readouterr().err


# --- JSON lines -------------------------------------------------------------------------------------------


def test_unknown_json_key_is_that_lines_error_and_the_others_are_answered(bundle, reference, tmp_path):
    source = tmp_path / "in.jsonl"
    lines = [
        {"text": "good film", "pair": "the plot"},
        {"text": "a dull plot", "id": 7},
        {"txt": "oops"},
        {"text": "nice", "labels": 1, "Id": 3},
    ]
    source.write_text("\n".join(json.dumps(x) for x in lines) + "\n")
    code, rows = _run(bundle, tmp_path, "--input", str(source), "--input-format", "jsonl")
    assert code == 1 and [r["index"] for r in rows] == [0, 1, 2, 3]
    assert rows[0]["error"] == (
        'line 1: unknown key "pair" (did you mean "text_pair"?); a JSON line takes text, text_pair, label, id'
    )
    assert rows[1]["label"] == _expected(reference, ["a dull plot"])[0] and rows[1]["id"] == 7
    assert rows[2]["error"].startswith('line 3: a JSON line needs a "text" string; unknown key "txt" (did you mean')
    assert 'unknown keys "labels" (did you mean "label"?), "Id" (did you mean "id"?)' in rows[3]["error"]


def test_jsonl_format_takes_no_plain_lines(bundle, tmp_path):
    source = tmp_path / "in.txt"
    source.write_text('good film\n{"text": "a plot"}\n["a list"]\n')
    code, rows = _run(bundle, tmp_path, "--input", str(source), "--input-format", "jsonl")
    assert code == 1 and "label" in rows[1]
    assert rows[0]["error"].startswith("line 1 is not JSON")
    assert rows[2]["error"] == 'line 3: a JSON line must be an object {"text": ...}, not a list'


# --- pairs ------------------------------------------------------------------------------------------------


def test_a_pair_model_refuses_a_lone_text_and_a_single_text_model_a_pair(bundle, tmp_path, model_trained_on):
    source = tmp_path / "in.txt"
    source.write_text('{"text": "good", "text_pair": "the plot"}\n{"text": "good"}\njust a text\n')
    model_trained_on(True)
    code, rows = _run(bundle, tmp_path, "--input", str(source))
    assert code == 1 and "label" in rows[0]
    assert rows[1]["error"] == 'line 2: this model was trained on text pairs: give "text_pair" too'
    assert rows[2]["error"].startswith('line 3: this model was trained on text pairs: give "text_pair" (a JSON line')
    model_trained_on(False)
    code, rows = _run(bundle, tmp_path, "--input", str(source))
    assert rows[0]["error"] == 'line 1: this model was trained on single texts: drop "text_pair"'
    assert "label" in rows[1] and "label" in rows[2]
    model_trained_on(None)  # an old bundle: nothing known, nothing checked
    assert _run(bundle, tmp_path, "--input", str(source))[0] == 0


def test_a_table_without_the_pair_column_a_pair_model_needs_exits_2(bundle, tmp_path, model_trained_on, capsys):
    model_trained_on(True)
    source = tmp_path / "single.csv"
    source.write_text("sentence,label\ngood film,1\n")
    assert _run(bundle, tmp_path, "--input", str(source)) == (2, [])
    assert "this model was trained on text pairs: give a pair column" in capsys.readouterr().err


def test_serve_device_refuses_the_wrong_kind_of_input_with_400(bundle):
    config = parse_config(f'bundle = "{bundle}"\nthreads = 1\n[listen]\nport = 0\n')
    with pytest.raises(RequestError) as error:
        parse_classify_request(b'{"texts": ["a"]}', config, text_pairs=True)
    assert (error.value.status, error.value.message) == (
        400,
        'this model was trained on text pairs: give "text_pairs" too',
    )
    with pytest.raises(RequestError, match='single texts: drop "text_pairs"'):
        parse_classify_request(b'{"texts": ["a"], "text_pairs": ["b"]}', config, text_pairs=False)
    assert parse_classify_request(b'{"texts": ["a"], "text_pairs": ["b"]}', config) == (["a"], ["b"])

    runtime = DeviceRuntime(bundle, threads=1)
    runtime.bundle.manifest.model.text_pairs = True
    service = DeviceService(config, runtime)  # the live path: do_POST reads the runtime's bundle
    thread = threading.Thread(target=service.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True)
    thread.start()
    try:
        lone = _post(service, {"texts": ["good film"]})
        pair = _post(service, {"texts": ["good film"], "text_pairs": ["the plot"]})
    finally:
        service.shutdown()
        service.server_close()
        runtime.close()
    assert lone == (400, {"error": 'this model was trained on text pairs: give "text_pairs" too'})
    assert pair[0] == 200 and len(pair[1]["predictions"]) == 1


def _post(service, payload) -> tuple[int, dict]:
    connection = http.client.HTTPConnection("127.0.0.1", service.server_address[1], timeout=30)
    try:
        connection.request("POST", "/v1/classify", json.dumps(payload).encode(), {"Content-Type": "application/json"})
        response = connection.getresponse()
        return response.status, json.loads(response.read())
    finally:
        connection.close()


# --- labels and the summary -------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def labelled():
    rows = synthetic_rows(60, seed=11, noise=0.1)  # a little noise: the kit is not always right
    return [t for t, _ in rows], [label for _, label in rows]


def test_labels_file_and_label_field_give_the_summary_a_direct_computation_gives(
    bundle, reference, tmp_path, labelled, capsys, patch_model
):
    patch_model(task=None)  # own data: accuracy, and F1 for two labels (the tiny bundle says sst2)
    texts, names = labelled
    source, labels_file = tmp_path / "texts.txt", tmp_path / "labels.txt"
    source.write_text("\n\n".join(texts) + "\n")  # blank lines: no input, no label
    labels_file.write_text("\n".join(names) + "\n")
    summary_file = tmp_path / "summary.json"
    code, rows = _run(
        bundle, tmp_path, "--input", str(source), "--labels", str(labels_file), "--summary", str(summary_file)
    )
    assert code == 0
    err = capsys.readouterr().err
    summary = json.loads(summary_file.read_text())

    predicted = _expected(reference, texts)
    assert [r["label"] for r in rows] == predicted and [r["label_given"] for r in rows] == names
    ids = {"negative": 0, "positive": 1}
    y, p = np.array([ids[n] for n in names]), np.array([ids[n] for n in predicted])
    tp, fp, fn = int(((p == 1) & (y == 1)).sum()), int(((p == 1) & (y == 0)).sum()), int(((p == 0) & (y == 1)).sum())
    assert summary["labelled"] == summary["inputs"] == 60 and summary["errors"] == 0
    assert summary["task"] is None and summary["metrics"] == ["accuracy", "f1"]  # own data, two labels
    assert summary["kit"]["accuracy"]["value"] == pytest.approx((p == y).mean())
    assert summary["kit"]["f1"]["value"] == pytest.approx(2 * tp / (2 * tp + fp + fn))
    for metric in summary["kit"].values():
        low, high = metric["ci"]
        assert low <= metric["value"] <= high and high - low < 0.5
    assert summary["tiers"]["device"]["share"] == 1.0  # no servers: the device answers all
    assert f"60 labelled inputs: accuracy {summary['kit']['accuracy']['value']:.4f}" in err

    # the same labels as JSON fields, names and ids mixed: the same numbers
    jsonl = tmp_path / "labelled.jsonl"
    jsonl.write_text(
        "".join(
            json.dumps({"text": t, "label": n if i % 2 else ids[n]}) + "\n"
            for i, (t, n) in enumerate(zip(texts, names, strict=True))
        )
    )
    code, _ = _run(bundle, tmp_path, "--input", str(jsonl), "--summary", str(summary_file))
    assert code == 0 and json.loads(summary_file.read_text())["kit"] == summary["kit"]


def test_label_problems(bundle, tmp_path, capsys, monkeypatch):
    source, labels_file = tmp_path / "texts.txt", tmp_path / "labels.txt"
    source.write_text("good film\nbad film\n")
    labels_file.write_text("positive\n")
    assert _run(bundle, tmp_path, "--input", str(source), "--labels", str(labels_file)) == (2, [])
    assert f"--labels {labels_file} holds 1 labels but {source} holds 2 inputs" in capsys.readouterr().err
    labels_file.write_text("positive\n7\n")
    code, rows = _run(bundle, tmp_path, "--input", str(source), "--labels", str(labels_file))
    assert code == 1 and rows[0]["label_given"] == "positive"
    assert (
        rows[1]["error"]
        == "line 2: label id 7 is out of range; this model's labels are negative, positive (or their ids 0..1)"
    )
    # stdin cannot be counted before it is read: the mismatch is found at its end, and nothing is scored
    monkeypatch.setattr(sys, "stdin", io.TextIOWrapper(io.BytesIO(b"good film\n")))
    summary = tmp_path / "summary.json"
    code, rows = _run(bundle, tmp_path, "--labels", str(labels_file), "--summary", str(summary))
    assert code == 2 and len(rows) == 1 and not summary.exists()
    assert "holds 2 labels for 1 inputs; no summary" in capsys.readouterr().err
    table = tmp_path / "t.csv"
    table.write_text("text,label\ngood,1\n")
    assert _run(bundle, tmp_path, "--input", str(table), "--labels", str(labels_file)) == (2, [])
    assert "--labels FILE is for text lines" in capsys.readouterr().err
    assert main(["run", "--bundle", str(bundle), "--input", str(source), "--compare-all-cloud"]) == 2
    assert "--compare-all-cloud needs --cloud" in capsys.readouterr().err


# --- metrics ----------------------------------------------------------------------------------------------


def test_metrics_by_hand():
    # tp tp fp fn tn tn: accuracy 4/6, F1 = 2*2/(2*2+1+1) = 2/3, MCC = (2*2-1*1)/sqrt(3*3*3*3) = 1/3
    pred, gold = [1, 1, 1, 0, 0, 0], [1, 1, 0, 1, 0, 0]
    assert scoring.accuracy(pred, gold) == pytest.approx(4 / 6)
    assert scoring.f1(pred, gold) == pytest.approx(2 / 3)
    assert scoring.mcc(pred, gold) == pytest.approx(1 / 3)
    # tp fn fn tn tn tn tn tn: F1 = 2/(2+0+2) = 1/2, MCC = (1*5-0*2)/sqrt(1*3*5*7)
    pred, gold = [1, 0, 0, 0, 0, 0, 0, 0], [1, 1, 1, 0, 0, 0, 0, 0]
    assert scoring.f1(pred, gold) == pytest.approx(0.5)
    assert scoring.mcc(pred, gold) == pytest.approx(5 / math.sqrt(105))
    # one class only: MCC is undefined (0 by convention); F1 is 1 if that class is the positive one, else 0
    ones, zeros = [1, 1, 1, 1], [0, 0, 0, 0]
    assert (scoring.mcc(ones, ones), scoring.f1(ones, ones), scoring.accuracy(ones, ones)) == (0.0, 1.0, 1.0)
    assert (scoring.mcc(zeros, zeros), scoring.f1(zeros, zeros)) == (0.0, 0.0)
    assert scoring.mcc(ones, zeros) == 0.0 and scoring.f1(ones, zeros) == 0.0


def test_task_metrics():
    assert scoring.metrics_for("cola", 2) == scoring.metrics_for("CoLA", 2) == ("accuracy", "mcc")
    assert scoring.metrics_for("mrpc", 2) == ("accuracy", "f1")
    assert scoring.metrics_for("sst2", 2) == scoring.metrics_for("rte", 2) == ("accuracy",)
    assert scoring.metrics_for(None, 2) == ("accuracy", "f1") and scoring.metrics_for(None, 3) == ("accuracy",)


def test_bootstrap_intervals_are_seeded_paired_and_independent_of_chunking(monkeypatch):
    rng = np.random.default_rng(3)
    y = rng.integers(0, 2, 300)
    kit = np.where(rng.random(300) < 0.85, y, 1 - y)
    cloud = np.where(rng.random(300) < 0.9, y, 1 - y)
    boot = scoring.Bootstrap(resamples=500)
    first = scoring.interval("mcc", kit, y, boot)
    assert first == scoring.interval("mcc", kit, y, boot)  # seeded: the same numbers on a rerun
    assert first["value"] == scoring.mcc(kit, y) and first["ci"][0] < first["value"] < first["ci"][1]
    monkeypatch.setattr(scoring, "_CHUNK_ELEMENTS", 1000)  # 3 resamples per chunk: the same stream of draws
    assert scoring.interval("mcc", kit, y, boot) == first
    assert scoring.interval("accuracy", y, y, boot) == {"value": 1.0, "ci": [1.0, 1.0]}
    same = scoring.paired_difference("f1", kit, kit, y, boot)
    assert same == {"value": 0.0, "ci": [0.0, 0.0]}
    diff = scoring.paired_difference("accuracy", kit, cloud, y, boot)
    assert diff["value"] == pytest.approx(scoring.accuracy(kit, y) - scoring.accuracy(cloud, y))
    # paired: narrower than the two intervals' spread would say
    a, c = scoring.interval("accuracy", kit, y, boot), scoring.interval("accuracy", cloud, y, boot)
    assert diff["ci"][1] - diff["ci"][0] < (a["ci"][1] - a["ci"][0]) + (c["ci"][1] - c["ci"][0])


def test_summarise_by_hand():
    book = scoring.ScoreBook()
    for label, kit, tier, cloud in [(1, 1, "device", 1), (0, 1, "edge", 0), (None, 0, "device", 1), (1, 1, "cloud", 1)]:
        book.add(label, kit, tier, cloud)
    summary = scoring.summarise(book, "mrpc", ["not_equivalent", "equivalent"], scoring.Bootstrap(resamples=50))
    assert summary["labelled"] == 3 and summary["metrics"] == ["accuracy", "f1"]
    assert summary["positive_label"] == "equivalent"
    assert summary["kit"]["accuracy"]["value"] == pytest.approx(2 / 3) and summary["kit"]["f1"]["value"] == 0.8
    assert summary["tiers"]["device"] == {"share": pytest.approx(1 / 3), "answered": 1, "accuracy": 1.0}
    cloud = summary["all_cloud"]
    assert cloud["compared"] == 4 and cloud["agreement"]["value"] == 0.5  # over every compared input
    assert cloud["labelled"] == 3 and cloud["metrics"]["accuracy"]["value"] == 1.0
    assert cloud["difference"]["accuracy"]["value"] == pytest.approx(-1 / 3)
    assert any("kit - all-cloud accuracy -0.3333" in line for line in scoring.describe(summary))


# --- all-cloud ----------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def cloud(bundle):
    servers = start_servers(bundle, tiers=("cloud",))
    yield servers["cloud"].address
    stop_servers(servers)


def test_compare_all_cloud_reports_agreement_and_the_paired_difference(bundle, tmp_path, cloud, labelled, capsys):
    texts, names = labelled
    source = tmp_path / "labelled.jsonl"
    source.write_text(
        "".join(json.dumps({"text": t, "label": n}) + "\n" for t, n in zip(texts[:30], names[:30], strict=True))
    )
    summary_file = tmp_path / "summary.json"
    args = ["--cloud", cloud, "--compare-all-cloud", "--summary", str(summary_file)]
    code, rows = _run(bundle, tmp_path, "--input", str(source), *args)
    assert code == 0, capsys.readouterr().err
    summary = json.loads(summary_file.read_text())["all_cloud"]
    kit = np.array([r["label"] for r in rows])
    all_cloud = np.array([r["all_cloud_label"] for r in rows])
    given = np.array([r["label_given"] for r in rows])
    assert summary["compared"] == summary["labelled"] == 30 and summary["failed"] == 0
    assert summary["agreement"]["value"] == pytest.approx((kit == all_cloud).mean())
    assert summary["metrics"]["accuracy"]["value"] == pytest.approx((all_cloud == given).mean())
    assert summary["difference"]["accuracy"]["value"] == pytest.approx(
        (kit == given).mean() - (all_cloud == given).mean()
    )
    assert "all-cloud on 30 inputs: agreement" in capsys.readouterr().err

    plain = tmp_path / "plain.txt"
    plain.write_text("\n".join(texts[:5]) + "\n")
    code, rows = _run(bundle, tmp_path, "--input", str(plain), *args)
    summary = json.loads(summary_file.read_text())
    assert code == 0 and "kit" not in summary and summary["labelled"] == 0
    assert summary["all_cloud"]["compared"] == 5 and "metrics" not in summary["all_cloud"]
    assert summary["all_cloud"]["agreement"]["value"] == np.mean([r["label"] == r["all_cloud_label"] for r in rows])


# --- the installed command ------------------------------------------------------------------------------------


def test_run_scores_a_tsv_as_a_subprocess_without_torch(bundle, reference, tmp_path, labelled):
    texts, names = labelled
    source = tmp_path / "dev.tsv"
    source.write_text("sentence\tlabel\n" + "".join(f"{t}\t{n}\n" for t, n in zip(texts[:10], names[:10], strict=True)))
    out, summary_file = tmp_path / "out.jsonl", tmp_path / "summary.json"
    argv = [
        "run",
        "--bundle",
        str(bundle),
        "--input",
        str(source),
        "--output",
        str(out),
        "--summary",
        str(summary_file),
    ]
    code = (
        "import sys; sys.modules['torch'] = None; sys.modules['transformers'] = None\n"
        f"from cartosplit.cli import main; sys.exit(main({argv!r}))"
    )
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    rows = [json.loads(line) for line in out.read_text().splitlines()]
    assert [r["label"] for r in rows] == _expected(reference, texts[:10])
    summary = json.loads(summary_file.read_text())
    predicted = np.array([r["label"] for r in rows])
    assert summary["kit"]["accuracy"]["value"] == pytest.approx((predicted == np.array(names[:10])).mean())
    assert "10 labelled inputs: accuracy" in done.stderr
