"""Tests for cartosplit.export.data: GLUE TSV layouts, data-dir resolution, the HF fallback's errors, user files.

All fast and offline: tiny files are written under tmp_path. Only TestRealGlue reads the shared GLUE
copy, and it skips when that copy is absent.
"""

from __future__ import annotations

import os
import re
import subprocess
import sys
import types
from pathlib import Path

import numpy as np
import pytest

from cartosplit.export import data
from cartosplit.export.data import (
    ENV_DATA_DIR,
    TASKS,
    DataError,
    TaskSpec,
    TextDataset,
    load_file,
    load_glue,
    resolve_glue_dir,
    task_spec,
)

REAL_GLUE = Path(os.environ.get(ENV_DATA_DIR) or data._REPO_GLUE_DIR)


def write(path: Path, text: str, encoding: str = "utf-8") -> Path:
    """Write exactly ``text`` (no newline translation), creating parent folders."""
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(text.encode(encoding))
    return path


@pytest.fixture(autouse=True)
def _no_env_data_dir(monkeypatch: pytest.MonkeyPatch) -> None:
    # A developer's CARTOSPLIT_DATA_DIR must not leak into tests that exercise resolution.
    monkeypatch.delenv(ENV_DATA_DIR, raising=False)


# Sentences carry unbalanced double quotes on purpose, some opening a field (as in the real MRPC): with
# csv's default quoting those would swallow the following tabs and newlines and merge rows.
SST2_TSV = 'sentence\tlabel\n" it \'s a charming journey . \t1\nunflinchingly bleak " and desperate \t0\n'
COLA_TSV = (
    "gj04\t1\t\tOur friends won't buy this analysis, let alone \"the next one.\n"
    "gj04\t0\t*\tThey drank the pub.\n"
    'r-67\t1\t\tHe said "hello" twice.\n'
)
MRPC_TSV = (
    "Quality\t#1 ID\t#2 ID\t#1 String\t#2 String\n"
    '1\t702876\t702977\tAmrozi called him " the witness .\tReferring to him as " the witness " .\n'
    "0\t2108705\t2108831\tYucaipa owned Dominick 's .\tYucaipa bought Dominick 's in 1995 .\n"
    '1\t1\t2\t" A b\t" C d\n'
)
RTE_TSV = (
    "index\tsentence1\tsentence2\tlabel\n"
    "0\tNo Weapons Found in Iraq Yet.\tWeapons Found in Iraq.\tnot_entailment\n"
    '1\tA place of sorrow, "after" the Pope died.\tBenedict is "the" new leader.\tentailment\n'
)


@pytest.fixture
def glue_root(tmp_path: Path) -> Path:
    """A folder in the GLUE layout holding the tiny files above as both train and dev."""
    root = tmp_path / "glue"
    for glue_dir, body in (("SST-2", SST2_TSV), ("CoLA", COLA_TSV), ("MRPC", MRPC_TSV), ("RTE", RTE_TSV)):
        for split in ("train", "dev"):
            write(root / glue_dir / f"{split}.tsv", body)
    return root


def glue_with(tmp_path: Path, glue_dir: str, body: str, split: str = "train") -> tuple[Path, Path]:
    """A GLUE folder holding one file; returns (root, file)."""
    root = tmp_path / "glue"
    return root, write(root / glue_dir / f"{split}.tsv", body)


# --------------------------------------------------------------------------------------------------
# Tasks
# --------------------------------------------------------------------------------------------------


class TestTaskSpec:
    @pytest.mark.parametrize(
        ("alias", "name", "glue_dir"),
        [
            ("sst2", "sst2", "SST-2"),
            ("SST-2", "sst2", "SST-2"),
            ("sst-2", "sst2", "SST-2"),
            ("SST2", "sst2", "SST-2"),
            ("sst_2", "sst2", "SST-2"),
            ("cola", "cola", "CoLA"),
            ("CoLA", "cola", "CoLA"),
            ("COLA", "cola", "CoLA"),
            ("mrpc", "mrpc", "MRPC"),
            ("MRPC", "mrpc", "MRPC"),
            ("rte", "rte", "RTE"),
            ("RTE", "rte", "RTE"),
        ],
    )
    def test_aliases_resolve_to_canonical_spec(self, alias: str, name: str, glue_dir: str) -> None:
        spec = task_spec(alias)
        assert spec is TASKS[name]
        assert (spec.name, spec.glue_dir) == (name, glue_dir)

    def test_specs_carry_human_label_names_in_glue_id_order(self) -> None:
        assert TASKS["sst2"] == TaskSpec("sst2", "SST-2", ("negative", "positive"), False)
        assert TASKS["cola"] == TaskSpec("cola", "CoLA", ("unacceptable", "acceptable"), False, metric="mcc")
        assert TASKS["mrpc"] == TaskSpec("mrpc", "MRPC", ("not_equivalent", "equivalent"), True, metric="f1")
        assert TASKS["sst2"].metric == TASKS["rte"].metric == "accuracy"  # GLUE's metric for each
        assert TASKS["rte"] == TaskSpec("rte", "RTE", ("entailment", "not_entailment"), True)
        assert set(TASKS) == {"sst2", "cola", "mrpc", "rte"}

    def test_spec_is_frozen(self) -> None:
        with pytest.raises(AttributeError):
            TASKS["sst2"].name = "x"  # type: ignore[misc]

    def test_unknown_task_lists_known_tasks(self) -> None:
        with pytest.raises(DataError, match=r"unknown task 'qqp'.*sst2.*cola.*mrpc.*rte"):
            task_spec("qqp")

    def test_unknown_task_in_load_glue(self, glue_root: Path) -> None:
        with pytest.raises(DataError, match=r"unknown task 'mnli'; known tasks"):
            load_glue("mnli", data_dir=glue_root)

    def test_module_does_not_import_torch_or_transformers(self) -> None:
        # The device tier imports this module and has neither installed.
        code = "import sys, cartosplit.export.data; print(sorted({'torch', 'transformers'} & set(sys.modules)))"
        root = Path(data.__file__).resolve().parents[1]
        out = subprocess.run([sys.executable, "-c", code], cwd=root, capture_output=True, text=True, check=True)
        assert out.stdout.strip() == "[]"

    def test_data_error_is_a_value_error(self) -> None:
        with pytest.raises(ValueError, match="unknown task"):
            task_spec("nope")


# --------------------------------------------------------------------------------------------------
# GLUE TSV layouts
# --------------------------------------------------------------------------------------------------


class TestGlueLayouts:
    def test_sst2(self, glue_root: Path) -> None:
        ds = load_glue("sst2", "train", data_dir=glue_root)
        # Kept verbatim, trailing space included (GLUE's SST-2 has one on every sentence, as does HF's copy).
        assert ds.texts == ["\" it 's a charming journey . ", 'unflinchingly bleak " and desperate ']
        assert ds.text_pairs is None
        assert ds.labels.tolist() == [1, 0]
        assert ds.labels.dtype == np.int64
        assert ds.label_names == ("negative", "positive")
        assert ds.source == str(glue_root / "SST-2" / "train.tsv")
        assert len(ds) == 2

    def test_cola_headerless_four_columns(self, glue_root: Path) -> None:
        ds = load_glue("CoLA", "dev", data_dir=glue_root)
        assert ds.texts == [
            "Our friends won't buy this analysis, let alone \"the next one.",
            "They drank the pub.",
            'He said "hello" twice.',
        ]
        assert ds.text_pairs is None
        assert ds.labels.tolist() == [1, 0, 1]
        assert ds.label_names == ("unacceptable", "acceptable")

    def test_mrpc_pairs_with_unbalanced_quotes(self, glue_root: Path) -> None:
        ds = load_glue("mrpc", "train", data_dir=glue_root)
        assert len(ds) == 3  # default csv quoting would merge rows at the unbalanced quotes
        assert ds.texts == ['Amrozi called him " the witness .', "Yucaipa owned Dominick 's .", '" A b']
        assert ds.text_pairs == [
            'Referring to him as " the witness " .',
            "Yucaipa bought Dominick 's in 1995 .",
            '" C d',
        ]
        assert ds.labels.tolist() == [1, 0, 1]
        assert ds.label_names == ("not_equivalent", "equivalent")

    def test_rte_string_labels_map_to_glue_ids(self, glue_root: Path) -> None:
        ds = load_glue("RTE", "dev", data_dir=glue_root)
        assert ds.texts == ["No Weapons Found in Iraq Yet.", 'A place of sorrow, "after" the Pope died.']
        assert ds.text_pairs == ["Weapons Found in Iraq.", 'Benedict is "the" new leader.']
        assert ds.labels.tolist() == [1, 0]  # not_entailment=1, entailment=0
        assert ds.label_names == ("entailment", "not_entailment")

    @pytest.mark.parametrize("split", ["dev", "validation", "DEV", " Validation "])
    def test_dev_aliases_read_dev_tsv(self, tmp_path: Path, split: str) -> None:
        root, _ = glue_with(tmp_path, "SST-2", "sentence\tlabel\ndev row\t1\n", split="dev")
        write(root / "SST-2" / "train.tsv", "sentence\tlabel\ntrain row\t0\n")
        ds = load_glue("sst2", split, data_dir=root)
        assert ds.texts == ["dev row"]
        assert ds.source.endswith("dev.tsv")

    def test_columns_located_by_header_name(self, tmp_path: Path) -> None:
        root, _ = glue_with(tmp_path, "RTE", "label\tsentence2\tindex\tsentence1\nentailment\tB\t0\tA\n")
        ds = load_glue("rte", data_dir=root)
        assert (ds.texts, ds.text_pairs, ds.labels.tolist()) == (["A"], ["B"], [0])

    def test_crlf_bom_and_trailing_blank_line_tolerated(self, tmp_path: Path) -> None:
        root, _ = glue_with(tmp_path, "SST-2", "\ufeffsentence\tlabel\r\ngood\t1\r\nbad\t0\r\n\r\n")
        ds = load_glue("sst2", data_dir=root)
        assert ds.texts == ["good", "bad"]
        assert ds.labels.tolist() == [1, 0]

    def test_label_cell_whitespace_ignored(self, tmp_path: Path) -> None:
        root, _ = glue_with(tmp_path, "SST-2", "sentence\tlabel\ngood\t1 \n")
        assert load_glue("sst2", data_dir=root).labels.tolist() == [1]


class TestGlueErrors:
    @pytest.mark.parametrize("split", ["test", "eval", ""])
    def test_unknown_split(self, glue_root: Path, split: str) -> None:
        with pytest.raises(DataError, match=rf"unknown split {re.escape(repr(split))}; use 'train' or 'dev'"):
            load_glue("sst2", split, data_dir=glue_root)

    def test_explicit_data_dir_missing(self, tmp_path: Path) -> None:
        missing = tmp_path / "nowhere"
        with pytest.raises(DataError, match=rf"{re.escape(str(missing))}.*does not exist.*SST-2, CoLA, MRPC, RTE"):
            load_glue("sst2", data_dir=missing)

    def test_explicit_data_dir_is_a_file(self, tmp_path: Path) -> None:
        f = write(tmp_path / "file.tsv", "x")
        with pytest.raises(DataError, match="is not a directory"):
            load_glue("sst2", data_dir=f)

    def test_missing_file_in_existing_dir_names_exact_path(self, tmp_path: Path) -> None:
        root, _ = glue_with(tmp_path, "SST-2", SST2_TSV, split="train")
        expected = root / "SST-2" / "dev.tsv"
        with pytest.raises(DataError, match=re.escape(f"GLUE file not found: {expected}")) as exc:
            load_glue("sst2", "dev", data_dir=root)
        assert "folders present there: SST-2" in str(exc.value)

    def test_missing_task_folder_names_exact_path(self, glue_root: Path, tmp_path: Path) -> None:
        root = tmp_path / "empty"
        root.mkdir()
        with pytest.raises(DataError, match=re.escape(str(root / "MRPC" / "train.tsv"))):
            load_glue("mrpc", data_dir=root)

    def test_pointing_at_task_folder_itself_hints_parent(self, glue_root: Path) -> None:
        with pytest.raises(DataError, match="pass its parent folder"):
            load_glue("sst2", data_dir=glue_root / "SST-2")

    @pytest.mark.parametrize("glue_dir", ["SST-2", "CoLA", "MRPC", "RTE"])
    def test_empty_file(self, tmp_path: Path, glue_dir: str) -> None:
        root, path = glue_with(tmp_path, glue_dir, "")
        with pytest.raises(DataError, match=rf"{re.escape(str(path))} is empty"):
            load_glue(glue_dir, data_dir=root)

    def test_header_only(self, tmp_path: Path) -> None:
        root, path = glue_with(tmp_path, "SST-2", "sentence\tlabel\n")
        with pytest.raises(DataError, match=rf"{re.escape(str(path))} has a header but no data rows"):
            load_glue("sst2", data_dir=root)

    def test_row_with_too_few_columns(self, tmp_path: Path) -> None:
        root, path = glue_with(tmp_path, "SST-2", "sentence\tlabel\ngood\t1\ntruncated row\n")
        with pytest.raises(
            DataError, match=rf"{re.escape(str(path))}:3: row has 1 tab-separated columns, expected 2 \(truncated"
        ):
            load_glue("sst2", data_dir=root)

    def test_cola_row_with_too_few_columns(self, tmp_path: Path) -> None:
        root, path = glue_with(tmp_path, "CoLA", "gj04\t1\t\tFine.\ngj04\t1\tNo original label column.\n")
        with pytest.raises(DataError, match=rf"{re.escape(str(path))}:2: row has 3 .* expected 4"):
            load_glue("cola", data_dir=root)

    def test_row_with_tab_inside_sentence(self, tmp_path: Path) -> None:
        root, path = glue_with(tmp_path, "MRPC", MRPC_TSV + "1\t3\t4\tone\ttwo\tthree\n")
        with pytest.raises(DataError, match=rf"{re.escape(str(path))}:5: .*a tab inside a sentence"):
            load_glue("mrpc", data_dir=root)

    def test_unknown_numeric_label(self, tmp_path: Path) -> None:
        root, path = glue_with(tmp_path, "SST-2", "sentence\tlabel\ngood\t1\nhuh\t2\n")
        with pytest.raises(DataError, match=rf"{re.escape(str(path))}:3: label '2' is not one of \['0', '1'\]"):
            load_glue("sst2", data_dir=root)

    def test_unknown_rte_label(self, tmp_path: Path) -> None:
        root, path = glue_with(tmp_path, "RTE", "index\tsentence1\tsentence2\tlabel\n0\ta\tb\tneutral\n")
        expected = rf"{re.escape(str(path))}:2: label 'neutral' is not one of \['entailment', 'not_entailment'\]"
        with pytest.raises(DataError, match=expected):
            load_glue("rte", data_dir=root)

    def test_headerless_sst2_reports_missing_header_columns(self, tmp_path: Path) -> None:
        root, path = glue_with(tmp_path, "SST-2", "good\t1\nbad\t0\n")
        with pytest.raises(DataError, match=rf"{re.escape(str(path))}:1: header .* lacks column\(s\) \['sentence'"):
            load_glue("sst2", data_dir=root)

    def test_cola_with_a_header_row_is_refused(self, tmp_path: Path) -> None:
        root, _ = glue_with(tmp_path, "CoLA", "source\tlabel\toriginal\tsentence\ngj04\t1\t\tFine.\n")
        with pytest.raises(DataError, match=r":1: label 'label' is not one of"):
            load_glue("cola", data_dir=root)

    def test_empty_sentence(self, tmp_path: Path) -> None:
        root, path = glue_with(tmp_path, "SST-2", "sentence\tlabel\n \t1\n")
        with pytest.raises(DataError, match=rf"{re.escape(str(path))}:2: empty sentence"):
            load_glue("sst2", data_dir=root)

    def test_not_utf8(self, tmp_path: Path) -> None:
        root, path = glue_with(tmp_path, "SST-2", "sentence\tlabel\ncaf\u00e9\t1\n")
        path.write_bytes(path.read_bytes().replace("é".encode(), b"\xe9"))
        with pytest.raises(DataError, match=rf"{re.escape(str(path))}: not valid UTF-8"):
            load_glue("sst2", data_dir=root)


# --------------------------------------------------------------------------------------------------
# Where GLUE is looked for
# --------------------------------------------------------------------------------------------------


class TestResolveGlueDir:
    @pytest.fixture
    def nowhere(self, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
        """Neither conventional location exists: cwd is an empty folder, the repo-relative one is absent."""
        cwd = tmp_path / "cwd"
        cwd.mkdir()
        monkeypatch.chdir(cwd)
        monkeypatch.setattr(data, "_REPO_GLUE_DIR", tmp_path / "no-repo-glue")
        return cwd

    def test_explicit_dir_wins_over_env(self, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
        (tmp_path / "a").mkdir()
        (tmp_path / "b").mkdir()
        monkeypatch.setenv(ENV_DATA_DIR, str(tmp_path / "b"))
        assert resolve_glue_dir(tmp_path / "a") == tmp_path / "a"
        assert resolve_glue_dir(str(tmp_path / "a")) == tmp_path / "a"

    def test_env_used_without_explicit_dir(self, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
        monkeypatch.setenv(ENV_DATA_DIR, str(tmp_path))
        assert resolve_glue_dir() == tmp_path

    def test_env_pointing_nowhere_is_an_error(self, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
        monkeypatch.setenv(ENV_DATA_DIR, str(tmp_path / "typo"))
        with pytest.raises(DataError, match=rf"{ENV_DATA_DIR}=.*typo.* is not an existing directory"):
            resolve_glue_dir()

    def test_blank_env_is_ignored(self, nowhere: Path, monkeypatch: pytest.MonkeyPatch) -> None:
        monkeypatch.setenv(ENV_DATA_DIR, "  ")
        assert resolve_glue_dir() is None

    def test_shared_dir_relative_to_cwd(self, nowhere: Path, tmp_path: Path) -> None:
        shared = tmp_path / "shared" / "data" / "glue"
        shared.mkdir(parents=True)
        assert resolve_glue_dir() == shared.resolve()

    def test_shared_dir_next_to_repo(self, nowhere: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
        repo_glue = tmp_path / "repo-glue"
        repo_glue.mkdir()
        monkeypatch.setattr(data, "_REPO_GLUE_DIR", repo_glue)
        assert resolve_glue_dir() == repo_glue.resolve()

    def test_cwd_location_beats_repo_location(
        self, nowhere: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
    ) -> None:
        shared = tmp_path / "shared" / "data" / "glue"
        shared.mkdir(parents=True)
        (tmp_path / "repo-glue").mkdir()
        monkeypatch.setattr(data, "_REPO_GLUE_DIR", tmp_path / "repo-glue")
        assert resolve_glue_dir() == shared.resolve()

    def test_nothing_found_gives_none(self, nowhere: Path) -> None:
        assert resolve_glue_dir() is None

    def test_load_glue_uses_env_dir(self, glue_root: Path, monkeypatch: pytest.MonkeyPatch) -> None:
        monkeypatch.setenv(ENV_DATA_DIR, str(glue_root))
        assert load_glue("rte", "dev").source == str(glue_root / "RTE" / "dev.tsv")


# --------------------------------------------------------------------------------------------------
# Hugging Face fallback (never touches the network: `datasets` is blocked or faked)
# --------------------------------------------------------------------------------------------------


class TestHuggingFaceFallback:
    @pytest.fixture(autouse=True)
    def _no_local_dir(self, monkeypatch: pytest.MonkeyPatch) -> None:
        monkeypatch.setattr(data, "resolve_glue_dir", lambda data_dir=None: None)

    def test_without_datasets_package_says_how_to_fix(self, monkeypatch: pytest.MonkeyPatch) -> None:
        monkeypatch.setitem(sys.modules, "datasets", None)  # makes `import datasets` raise ImportError
        with pytest.raises(DataError, match=r"no local GLUE data found for SST-2.*not installed") as exc:
            load_glue("sst2")
        msg = str(exc.value)
        assert "--data-dir" in msg
        assert "train.tsv" in msg and "dev.tsv" in msg
        assert "SST-2, CoLA, MRPC, RTE" in msg
        assert ENV_DATA_DIR in msg
        assert "pip install datasets" in msg and "internet" in msg

    def test_download_failure_says_how_to_fix(self, monkeypatch: pytest.MonkeyPatch) -> None:
        def load_dataset(*args: object, **kwargs: object) -> object:
            raise ConnectionError("hub unreachable")

        monkeypatch.setitem(sys.modules, "datasets", types.SimpleNamespace(load_dataset=load_dataset))
        with pytest.raises(
            DataError, match=r"downloading glue/cola .*failed \(ConnectionError: hub unreachable\)"
        ) as exc:
            load_glue("CoLA", "dev")
        assert "--data-dir" in str(exc.value) and ENV_DATA_DIR in str(exc.value)

    def test_hf_columns_converted(self, monkeypatch: pytest.MonkeyPatch) -> None:
        calls: list[tuple[tuple[object, ...], dict[str, object]]] = []

        def load_dataset(*args: object, **kwargs: object) -> dict[str, list[object]]:
            calls.append((args, kwargs))
            return {"sentence1": ["p1", "p2"], "sentence2": ["h1", "h2"], "label": [1, 0], "idx": [0, 1]}

        monkeypatch.setitem(sys.modules, "datasets", types.SimpleNamespace(load_dataset=load_dataset))
        ds = load_glue("rte", "dev")
        assert calls == [(("glue", "rte"), {"split": "validation"})]
        assert (ds.texts, ds.text_pairs, ds.labels.tolist()) == (["p1", "p2"], ["h1", "h2"], [1, 0])
        assert ds.label_names == ("entailment", "not_entailment")
        assert ds.source == "huggingface datasets glue/rte [validation]"

    def test_hf_hidden_labels_rejected(self, monkeypatch: pytest.MonkeyPatch) -> None:
        fake = types.SimpleNamespace(load_dataset=lambda *a, **k: {"sentence": ["x"], "label": [-1]})
        monkeypatch.setitem(sys.modules, "datasets", fake)
        with pytest.raises(DataError, match=r"labels must lie in 0..1"):
            load_glue("sst2", "train")


# --------------------------------------------------------------------------------------------------
# TextDataset
# --------------------------------------------------------------------------------------------------


def make_ds(pairs: bool = True) -> TextDataset:
    return TextDataset(
        texts=["a", "b", "c", "d"],
        text_pairs=["A", "B", "C", "D"] if pairs else None,
        labels=np.array([0, 1, 1, 0]),
        label_names=("no", "yes"),
        source="mem",
    )


class TestTextDataset:
    def test_subset_keeps_given_order_and_repeats(self) -> None:
        ds = make_ds()
        sub = ds.subset([3, 0, 3])
        assert sub.texts == ["d", "a", "d"]
        assert sub.text_pairs == ["D", "A", "D"]
        assert sub.labels.tolist() == [0, 0, 0]
        assert sub.labels.dtype == np.int64
        assert (sub.label_names, sub.source) == (("no", "yes"), "mem")
        assert len(sub) == 3
        assert ds.texts == ["a", "b", "c", "d"]  # original untouched

    def test_subset_is_a_copy(self) -> None:
        ds = make_ds()
        sub = ds.subset(np.array([1, 2]))
        sub.labels[0] = 0
        assert ds.labels[1] == 1

    def test_subset_without_pairs_and_empty(self) -> None:
        ds = make_ds(pairs=False)
        assert ds.subset(np.array([2], dtype=np.int32)).text_pairs is None
        empty = ds.subset([])
        assert len(empty) == 0 and empty.labels.dtype == np.int64

    def test_subset_refuses_boolean_mask(self) -> None:
        with pytest.raises(DataError, match=r"not a boolean mask; use np.flatnonzero"):
            make_ds().subset(np.array([True, False, True, False]))

    @pytest.mark.parametrize("bad", [[4], [-1], [0, 7]])
    def test_subset_refuses_out_of_range(self, bad: list[int]) -> None:
        with pytest.raises(DataError, match=r"indices must lie in 0..3"):
            make_ds().subset(bad)

    def test_subset_refuses_non_integers(self) -> None:
        with pytest.raises(DataError, match=r"integer indices, got dtype float64"):
            make_ds().subset([0.0, 1.0])

    def test_constructor_checks_lengths(self) -> None:
        with pytest.raises(DataError, match=r"mem: 2 texts but 1 labels"):
            TextDataset(["a", "b"], None, np.array([0]), ("x",), "mem")
        with pytest.raises(DataError, match=r"mem: 1 texts but 2 text pairs"):
            TextDataset(["a"], ["A", "B"], np.array([0]), ("x",), "mem")

    def test_constructor_checks_label_range_and_dtype(self) -> None:
        with pytest.raises(DataError, match=r"labels must lie in 0..1"):
            TextDataset(["a"], None, np.array([2]), ("x", "y"), "mem")
        with pytest.raises(DataError, match=r"1-D integer array, got dtype float64"):
            TextDataset(["a"], None, np.array([0.5]), ("x", "y"), "mem")

    def test_constructor_coerces_labels_to_int64(self) -> None:
        ds = TextDataset(["a"], None, [1], ["x", "y"], "mem")  # type: ignore[arg-type]
        assert ds.labels.dtype == np.int64 and ds.label_names == ("x", "y")


# --------------------------------------------------------------------------------------------------
# User files
# --------------------------------------------------------------------------------------------------


class TestLoadFileFormats:
    def test_csv_int_labels(self, tmp_path: Path) -> None:
        p = write(tmp_path / "d.csv", 'text,label\n"great, really",1\n"he said ""no""",0\nplain "quote,1\n')
        ds = load_file(p)
        assert ds.texts == ["great, really", 'he said "no"', 'plain "quote']
        assert ds.text_pairs is None
        assert ds.labels.tolist() == [1, 0, 1]
        assert ds.label_names == ("0", "1")
        assert ds.source == str(p)

    def test_csv_string_labels_get_sorted_names(self, tmp_path: Path) -> None:
        p = write(tmp_path / "d.csv", "label,text\npositive,good\nnegative,bad\npositive,fine\n")
        ds = load_file(p)
        assert ds.label_names == ("negative", "positive")
        assert ds.labels.tolist() == [1, 0, 1]

    def test_csv_string_labels_through_label_names(self, tmp_path: Path) -> None:
        p = write(tmp_path / "d.csv", "text,label\ngood,pos\nbad,neg\n")
        ds = load_file(p, label_names=["pos", "neg"])
        assert ds.label_names == ("pos", "neg")
        assert ds.labels.tolist() == [0, 1]

    def test_csv_pairs_bom_and_extra_columns(self, tmp_path: Path) -> None:
        p = write(tmp_path / "d.CSV", "\ufeffid,text,text_pair,label\n7,a,b,1\n8,c,d,0\n")
        ds = load_file(p)
        assert (ds.texts, ds.text_pairs, ds.labels.tolist()) == (["a", "c"], ["b", "d"], [1, 0])

    def test_csv_int_labels_with_label_names(self, tmp_path: Path) -> None:
        p = write(tmp_path / "d.csv", "text,label\na,2\nb,0\n")
        ds = load_file(p, label_names=("x", "y", "z"))
        assert ds.labels.tolist() == [2, 0] and ds.label_names == ("x", "y", "z")

    def test_jsonl_int_labels_and_blank_lines(self, tmp_path: Path) -> None:
        p = write(
            tmp_path / "d.jsonl",
            '{"text": "caf\\u00e9 \\"ok\\"", "label": 2}\n\n{"text": "b", "label": 0, "id": 5}\n',
        )
        ds = load_file(p)
        assert ds.texts == ['café "ok"', "b"]
        assert ds.labels.tolist() == [2, 0]
        assert ds.label_names == ("0", "1", "2")  # ids 0..max, even when an id is unused

    def test_jsonl_string_labels_and_pairs(self, tmp_path: Path) -> None:
        p = write(
            tmp_path / "d.jsonl",
            '{"text": "a", "text_pair": "A", "label": "yes"}\n{"text": "b", "text_pair": "B", "label": "no"}\n',
        )
        ds = load_file(p)
        assert ds.text_pairs == ["A", "B"]
        assert ds.label_names == ("no", "yes") and ds.labels.tolist() == [1, 0]
        mapped = load_file(p, label_names=("yes", "no"))
        assert mapped.labels.tolist() == [0, 1]

    def test_json_extension_is_json_lines(self, tmp_path: Path) -> None:
        p = write(tmp_path / "d.json", '{"text": "a", "label": "1"}\n{"text": "b", "label": 0}\n')
        ds = load_file(p)
        assert ds.labels.tolist() == [1, 0]  # "1" is an integer id, like a CSV cell


class TestLoadFileErrors:
    def test_missing_file(self, tmp_path: Path) -> None:
        p = tmp_path / "nope.csv"
        with pytest.raises(DataError, match=rf"data file not found: {re.escape(str(p))}"):
            load_file(p)

    def test_directory(self, tmp_path: Path) -> None:
        with pytest.raises(DataError, match=r"is not a file"):
            load_file(tmp_path)

    @pytest.mark.parametrize("name", ["d.txt", "d.tsv", "d"])
    def test_unknown_extension(self, tmp_path: Path, name: str) -> None:
        p = write(tmp_path / name, "text,label\na,1\n")
        with pytest.raises(DataError, match=rf"{re.escape(str(p))}: unsupported file extension.*\.csv.*\.jsonl"):
            load_file(p)

    @pytest.mark.parametrize(("name", "body"), [("d.csv", ""), ("d.csv", "\n\n"), ("d.jsonl", ""), ("d.json", "\n \n")])
    def test_empty_file(self, tmp_path: Path, name: str, body: str) -> None:
        p = write(tmp_path / name, body)
        with pytest.raises(DataError, match=rf"{re.escape(str(p))} (is empty|has no data rows)"):
            load_file(p)

    def test_csv_header_only(self, tmp_path: Path) -> None:
        p = write(tmp_path / "d.csv", "text,label\n")
        with pytest.raises(DataError, match=rf"{re.escape(str(p))} has no data rows"):
            load_file(p)

    @pytest.mark.parametrize(("header", "missing"), [("sentence,label", "'text'"), ("text,y", "'label'")])
    def test_csv_missing_column(self, tmp_path: Path, header: str, missing: str) -> None:
        p = write(tmp_path / "d.csv", f"{header}\na,1\n")
        with pytest.raises(DataError, match=rf"{re.escape(str(p))}: line 1: header .* lacks column\(s\) \[{missing}\]"):
            load_file(p)

    @pytest.mark.parametrize("field", ["text", "label"])
    def test_jsonl_missing_field(self, tmp_path: Path, field: str) -> None:
        row = {"text": '"a"', "label": "1"}
        del row[field]
        body = '{"text": "ok", "label": 0}\n{' + ", ".join(f'"{k}": {v}' for k, v in row.items()) + "}\n"
        p = write(tmp_path / "d.jsonl", body)
        with pytest.raises(DataError, match=rf"{re.escape(str(p))}: line 2: missing field '{field}'"):
            load_file(p)

    def test_malformed_json_line(self, tmp_path: Path) -> None:
        p = write(tmp_path / "d.jsonl", '{"text": "a", "label": 0}\n{"text": "b", "label": 0\n')
        with pytest.raises(DataError, match=rf"{re.escape(str(p))}: line 2: malformed JSON"):
            load_file(p)

    def test_json_array_gets_a_hint(self, tmp_path: Path) -> None:
        p = write(tmp_path / "d.json", '[\n{"text": "a", "label": 0}\n]\n')
        with pytest.raises(DataError, match=r"line 1: malformed JSON.*looks like a JSON array"):
            load_file(p)

    def test_json_line_not_an_object(self, tmp_path: Path) -> None:
        p = write(tmp_path / "d.jsonl", '["a", 0]\n')
        with pytest.raises(DataError, match=r"line 1: expected a JSON object .* got list"):
            load_file(p)

    def test_csv_empty_text(self, tmp_path: Path) -> None:
        p = write(tmp_path / "d.csv", "text,label\na,0\n   ,1\n")
        with pytest.raises(DataError, match=rf"{re.escape(str(p))}: line 3: empty text"):
            load_file(p)

    def test_jsonl_empty_text(self, tmp_path: Path) -> None:
        p = write(tmp_path / "d.jsonl", '{"text": "", "label": 0}\n')
        with pytest.raises(DataError, match=r"line 1: empty text"):
            load_file(p)

    def test_unknown_string_label(self, tmp_path: Path) -> None:
        p = write(tmp_path / "d.csv", "text,label\na,pos\nb,maybe\n")
        with pytest.raises(DataError, match=rf"{re.escape(str(p))}: line 3: unknown label 'maybe'; label_names are"):
            load_file(p, label_names=("neg", "pos"))

    def test_int_label_out_of_range_for_label_names(self, tmp_path: Path) -> None:
        p = write(tmp_path / "d.jsonl", '{"text": "a", "label": 2}\n')
        with pytest.raises(DataError, match=r"line 1: label id 2 is out of range 0..1"):
            load_file(p, label_names=("neg", "pos"))

    def test_jsonl_text_pair_on_some_rows_only(self, tmp_path: Path) -> None:
        p = write(
            tmp_path / "d.jsonl",
            '{"text": "a", "text_pair": "A", "label": 0}\n{"text": "b", "text_pair": "B", "label": 1}\n'
            '{"text": "c", "label": 1}\n',
        )
        with pytest.raises(DataError, match=r"line 3 lacks text_pair but line 1 has it; .*every row or on none"):
            load_file(p)

    def test_csv_text_pair_on_some_rows_only(self, tmp_path: Path) -> None:
        p = write(tmp_path / "d.csv", "text,text_pair,label\na,,0\nb,B,1\n")
        with pytest.raises(DataError, match=r"line 3 has text_pair but line 2 lacks it"):
            load_file(p)

    def test_mixed_int_and_string_labels(self, tmp_path: Path) -> None:
        p = write(tmp_path / "d.csv", "text,label\na,0\nb,pos\n")
        with pytest.raises(DataError, match=r"mixes integer label ids \(line 2: 0\) and label names \(line 3: 'pos'\)"):
            load_file(p)

    def test_negative_label(self, tmp_path: Path) -> None:
        p = write(tmp_path / "d.csv", "text,label\na,0\nb,-1\n")
        with pytest.raises(DataError, match=r"line 3: label id -1 is negative"):
            load_file(p)

    @pytest.mark.parametrize("label", ["true", "1.5", "[1]"])
    def test_jsonl_label_of_wrong_type(self, tmp_path: Path, label: str) -> None:
        p = write(tmp_path / "d.jsonl", f'{{"text": "a", "label": {label}}}\n')
        with pytest.raises(DataError, match=r"line 1: label must be an integer id or a string name"):
            load_file(p)

    def test_jsonl_text_not_a_string(self, tmp_path: Path) -> None:
        p = write(tmp_path / "d.jsonl", '{"text": 5, "label": 0}\n')
        with pytest.raises(DataError, match=r"line 1: 'text' must be a string, got 5"):
            load_file(p)

    def test_csv_empty_label(self, tmp_path: Path) -> None:
        p = write(tmp_path / "d.csv", "text,label\na, \n")
        with pytest.raises(DataError, match=r"line 2: empty label"):
            load_file(p)

    def test_csv_row_with_wrong_field_count(self, tmp_path: Path) -> None:
        p = write(tmp_path / "d.csv", "text,label\nhello, world,1\n")
        with pytest.raises(DataError, match=r"line 2: row has 3 fields but the header has 2; quote fields"):
            load_file(p)

    def test_csv_line_numbers_count_multiline_fields(self, tmp_path: Path) -> None:
        p = write(tmp_path / "d.csv", 'text,label\n"two\nlines",0\n,1\n')
        with pytest.raises(DataError, match=r"line 4: empty text"):
            load_file(p)

    @pytest.mark.parametrize(
        ("names", "match"),
        [("ab", "not the string 'ab'"), ((), "label_names is empty"), (("a", "a"), "duplicates")],
    )
    def test_bad_label_names(self, tmp_path: Path, names: object, match: str) -> None:
        p = write(tmp_path / "d.csv", "text,label\na,0\n")
        with pytest.raises(DataError, match=match):
            load_file(p, label_names=names)  # type: ignore[arg-type]


# --------------------------------------------------------------------------------------------------
# The real GLUE copy (skipped when absent)
# --------------------------------------------------------------------------------------------------


@pytest.mark.skipif(
    not (REAL_GLUE / "SST-2" / "train.tsv").is_file(),
    reason=f"GLUE data not found at {REAL_GLUE}; pass --data-dir or set {ENV_DATA_DIR}",
)
class TestRealGlue:
    @pytest.mark.parametrize(
        ("task", "split", "rows"),
        [
            ("sst2", "train", 67349),
            ("sst2", "dev", 872),
            ("cola", "train", 8551),
            ("cola", "dev", 1043),
            ("mrpc", "train", 3668),
            ("mrpc", "dev", 408),
            ("rte", "train", 2490),
            ("rte", "dev", 277),
        ],
    )
    def test_row_counts_and_label_sets(self, task: str, split: str, rows: int) -> None:
        ds = load_glue(task, split, data_dir=REAL_GLUE)
        spec = TASKS[task]
        assert len(ds) == rows
        assert set(ds.labels.tolist()) == {0, 1}
        assert ds.label_names == spec.label_names
        assert (ds.text_pairs is not None) == spec.is_pair
        assert all(t.strip() for t in ds.texts)

    def test_quotes_survive_in_mrpc(self) -> None:
        ds = load_glue("mrpc", "train", data_dir=REAL_GLUE)
        assert ds.texts[0].startswith("Amrozi accused his brother") and '" the witness "' in ds.texts[0]
        assert ds.text_pairs is not None and sum('"' in t for t in ds.texts + ds.text_pairs) > 100
