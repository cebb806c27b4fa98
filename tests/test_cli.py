import json
import subprocess
import sys

import pytest

from cartosplit.cli import build_parser, main
from tests.conftest import write_csv

NO_TORCH = "import sys; sys.modules['torch'] = None; sys.modules['transformers'] = None; "


def _run_python(code: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)


@pytest.mark.parametrize(
    "command", ["train", "calibrate", "export", "inspect", "run", "serve-edge", "serve-cloud", "serve-device", "demo"]
)
def test_every_subcommand_explains_itself(command, capsys):
    with pytest.raises(SystemExit) as exit_info:
        main([command, "--help"])
    assert exit_info.value.code == 0
    text = capsys.readouterr().out
    assert f"usage: cartosplit {command}" in text and len(text) > 300


def test_help_and_clear_error_without_torch():
    done = _run_python(NO_TORCH + "from cartosplit.cli import main; main(['--help'])")
    assert done.returncode == 0 and "calibrate" in done.stdout
    done = _run_python(
        NO_TORCH + "from cartosplit.cli import main; raise SystemExit(main(['train', '--task', 'sst2']))"
    )
    assert done.returncode == 2
    assert "cartosplit train needs the export extra" in done.stderr and "pip install torch==2.13.0" in done.stderr


def test_a_device_install_without_the_server_extra_still_runs_the_cli():
    blocked = "sys.modules['prometheus_client'] = None; sys.modules['grpc_health'] = None; "
    done = _run_python(NO_TORCH + blocked + "from cartosplit.cli import main; main(['run', '--help'])")
    assert done.returncode == 0 and "--bundle" in done.stdout
    done = _run_python(
        NO_TORCH + blocked + "from cartosplit.cli import main; raise SystemExit(main(['serve-edge', '--port', '1']))"
    )
    assert done.returncode == 2 and "pip install 'cartosplit[server]'" in done.stderr
    assert len(done.stderr.strip().splitlines()) == 1, done.stderr  # one line, no traceback


def _tiny_args(tiny_model, synthetic_files, out):
    return [
        "--model", str(tiny_model), "--train-file", str(synthetic_files[0]), "--dev-file", str(synthetic_files[1]),
        "--train-size", "200", "--calib-size", "100", "--epochs", "2", "--device-split", "1", "--edge-split", "2",
        "--max-length", "32", "--threads", "1", "--out", str(out),
    ]  # fmt: skip


def test_train_then_calibrate_from_the_command_line(tmp_path, tiny_model, synthetic_files, capsys):
    out = tmp_path / "run"
    assert main(["train", *_tiny_args(tiny_model, synthetic_files, out)]) == 0
    reward = ["--objective", "reward", "--beta", "0.5"]
    assert main(["calibrate", "--run", str(out), "--router", "mlp", *reward]) == 2  # a reward has no guarantee
    assert "--guarantee none" in capsys.readouterr().err
    assert main(["calibrate", "--run", str(out), "--router", "mlp", *reward, "--guarantee", "none"]) == 0
    printed = capsys.readouterr().out
    assert "dimec-dc (mlp@0)" in printed and "cascade (max-softmax)" in printed and "all-cloud" in printed
    assert (out / "calibration.json").is_file() and (out / "data_map.png").is_file()
    # a user's own files are labelled as such, never as SST-2 (the default GLUE task)
    run = json.loads((out / "run.json").read_text())
    assert run["config"]["task"] is None, run["config"]
    calibration = json.loads((out / "calibration.json").read_text())
    assert calibration["task"] is None and calibration["data_files"] == [str(p) for p in synthetic_files]


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["train", "--task", "qnli"], "unknown task"),
        (["train", "--task", "sst2", "--data-dir", "/nonexistent/glue"], "/nonexistent/glue"),
        (["calibrate", "--run", "/nonexistent/run"], "not a training run"),
    ],
)
def test_bad_input_gives_a_clear_error_and_exit_code_2(args, message, capsys):
    assert main(args) == 2
    err = capsys.readouterr().err
    assert err.startswith(f"cartosplit {args[0]}: error:") and message.lower() in err.lower()


def test_bad_split_and_bad_files_are_reported(tmp_path, tiny_model, synthetic_files, capsys):
    args = _tiny_args(tiny_model, synthetic_files, tmp_path / "a")
    assert main(["train", *args, "--device-split", "3"]) == 2
    assert "split points" in capsys.readouterr().err
    assert not (tmp_path / "a").exists()  # nothing half-made is left behind
    empty = tmp_path / "empty.csv"
    empty.write_text("")
    bad = _tiny_args(tiny_model, (empty, synthetic_files[1]), tmp_path / "b")
    assert main(["train", *bad]) == 2
    assert "empty.csv" in capsys.readouterr().err
    unknown = write_csv(tmp_path / "dev.csv", [("good film", "positive"), ("a plot", "neutral")])
    bad = _tiny_args(tiny_model, (synthetic_files[0], unknown), tmp_path / "c")
    assert main(["train", *bad]) == 2
    assert "neutral" in capsys.readouterr().err


def test_numbers_are_validated_by_the_parser(capsys):
    with pytest.raises(SystemExit) as exit_info:
        build_parser("train").parse_args(["train", "--epochs", "0"])
    assert exit_info.value.code == 2
    assert "positive integer" in capsys.readouterr().err


def test_run_answers_every_line_around_unreadable_json(bundle, tmp_path, capsys):
    source = tmp_path / "in.txt"
    lines = [
        "a fine film",
        '{"text": "\\ud800"}',  # a lone surrogate: valid JSON, not text (the tokenizer raised TypeError)
        '{"text": "ok", "text_pair": "\\udfff"}',
        "{" + '"text": ' + "[" * 100_000 + "]" * 100_000 + "}",  # RecursionError in the parser
        '{"text": "a", "x": 1' + "1" * 5000 + "}",  # ValueError: over Python's digit limit
        "another good one",
    ]
    source.write_text("\n".join(lines) + "\n")
    out = tmp_path / "out.jsonl"
    assert main(["run", "--bundle", str(bundle), "--input", str(source), "--output", str(out)]) == 1
    assert "4 of 6 inputs had errors" in capsys.readouterr().err
    rows = [json.loads(line) for line in out.read_text().splitlines()]
    assert [r["index"] for r in rows] == list(range(6))
    assert "label" in rows[0] and "label" in rows[5]
    errors = [r.get("error", "") for r in rows]
    assert errors[1] == 'line 2: "text" holds a lone surrogate (U+D800 at character 0), not Unicode text'
    assert errors[2].startswith('line 3: "text_pair" holds a lone surrogate')
    assert errors[3] == "line 4 is JSON nested too deeply to read"
    assert errors[4] == "line 5 holds a number of more than 4300 digits"
