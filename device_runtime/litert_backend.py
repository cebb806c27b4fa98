"""Run a fixed-shape TFLite slice (from ``cartosplit.export.tflite``) with LiteRT: numpy only, no torch.

TFLite slices have FIXED shapes (litert-torch cannot lower a dynamic sequence length), so one file
exists per sequence-length bucket: pick the bucket with ``bucket_for``, pad every input to it with ``pad_to``
(both in ``cartosplit.device_runtime.buckets``; a zero attention mask hides the padding, so logits do not
change) and cut the hidden state back if needed.

Input/output mapping. litert-torch writes one signature (``serving_default``) whose inputs are named
``args_0, args_1, ...`` in the torch ``forward`` argument order and whose outputs are named
``output_0, output_1, ...`` in the order of the returned tuple. The raw tensor lists of the
interpreter (``get_input_details`` / ``get_output_details``) are NOT guaranteed to follow that order
(the output tensor indices come out of the graph in any order), so this module maps by signature
name, sorting the names by their numeric suffix (``args_10`` after ``args_9``, not after ``args_1``).
A model whose names do not follow that pattern is rejected rather than guessed at.
"""

from __future__ import annotations

import re
import threading
from collections.abc import Sequence
from pathlib import Path

import numpy as np

try:  # ai-edge-litert: numpy 2, x86_64 and aarch64 wheels
    from ai_edge_litert.interpreter import Interpreter, OpResolverType
except ImportError:  # pragma: no cover - the older standalone runtime (numpy<2 only)
    try:
        from tflite_runtime.interpreter import Interpreter, OpResolverType
    except ImportError:
        Interpreter = OpResolverType = None

# memory preset -> Interpreter options. "default": the builtin ops with the XNNPACK delegate LiteRT applies by
# default (it repacks the weights for its kernels: a second copy of them); "no-xnnpack": the builtin kernels
# alone. Measured (`cartosplit bench device --memory`, a MiniLM-shaped int8 bundle, x86, 1 thread, 100 inputs
# up to 128 tokens): no-xnnpack peaks 11 MB lower (76 vs 87 MB) but answers 3x slower (55 vs 18 ms p50), so
# ``low_memory=True`` ("low") keeps the default here; name "no-xnnpack" to take that trade.
MEMORY_PRESETS: dict[str, dict] = {
    "default": {},
    "no-xnnpack": {"experimental_op_resolver_type": "BUILTIN_WITHOUT_DEFAULT_DELEGATES"},
}
MEMORY_PRESETS["low"] = MEMORY_PRESETS["default"]


def memory_preset(low_memory: bool | str) -> str:
    """The preset name for ``low_memory``: False -> "default", True -> "low"; onnxruntime's preset names map to
    "default" here (they set onnxruntime options only), LiteRT's own names are taken as they are."""
    if low_memory is True:
        return "low"
    if low_memory in MEMORY_PRESETS:
        return low_memory
    return "default"


def _interpreter_options(memory: str) -> dict:
    options = {}
    for key, value in MEMORY_PRESETS[memory_preset(memory)].items():
        if key == "experimental_op_resolver_type":
            value = getattr(OpResolverType, value)
        options[key] = value
    return options


_INPUT_NAME = re.compile(r"args_(\d+)")
_OUTPUT_NAME = re.compile(r"output_(\d+)")


def _ordered(names: Sequence[str], pattern: re.Pattern, what: str, path: Path) -> list[str]:
    numbered = {}
    for name in names:
        match = pattern.fullmatch(name)
        if match is None:
            raise ValueError(
                f"{path}: {what} {name!r} is not named like litert-torch names them ({pattern.pattern}); "
                "cannot tell the torch order"
            )
        numbered[int(match.group(1))] = name
    if sorted(numbered) != list(range(len(names))):
        raise ValueError(f"{path}: {what}s {sorted(names)} are not numbered 0..{len(names) - 1}")
    return [numbered[i] for i in range(len(names))]


class LiteRTSession:
    """One fixed-shape TFLite model: inputs and outputs as lists, in the torch module's order."""

    def __init__(self, path: str | Path, num_threads: int | None = None, memory: str = "default") -> None:
        if Interpreter is None:
            raise ImportError("no TFLite runtime: pip install ai-edge-litert (or tflite-runtime on numpy<2 platforms)")
        self.path = Path(path)
        if not self.path.is_file():
            raise FileNotFoundError(f"TFLite model {self.path} does not exist")
        if num_threads is not None and num_threads < 1:
            raise ValueError(f"num_threads must be >= 1 or None, got {num_threads}")
        self._interpreter = Interpreter(
            model_path=str(self.path), num_threads=num_threads, **_interpreter_options(memory)
        )
        signatures = self._interpreter.get_signature_list()
        if len(signatures) != 1:
            raise ValueError(f"{self.path}: expected one signature, found {sorted(signatures)}")
        (self.signature,) = signatures
        self._runner = self._interpreter.get_signature_runner(self.signature)
        in_details = self._runner.get_input_details()
        out_details = self._runner.get_output_details()
        self.input_names = _ordered(list(in_details), _INPUT_NAME, "input", self.path)
        self.output_names = _ordered(list(out_details), _OUTPUT_NAME, "output", self.path)
        self.input_shapes: list[tuple[int, ...]] = [
            tuple(int(d) for d in in_details[n]["shape"]) for n in self.input_names
        ]
        self.input_dtypes: list[np.dtype] = [np.dtype(in_details[n]["dtype"]) for n in self.input_names]
        self.output_shapes: list[tuple[int, ...]] = [
            tuple(int(d) for d in out_details[n]["shape"]) for n in self.output_names
        ]
        # an interpreter is not safe to call from two threads at once
        self._lock = threading.Lock()

    def __repr__(self) -> str:
        ins = ", ".join(
            f"{np.dtype(t).name}{list(s)}" for s, t in zip(self.input_shapes, self.input_dtypes, strict=True)
        )
        return f"LiteRTSession({str(self.path)!r}, inputs=[{ins}], outputs={[list(s) for s in self.output_shapes]})"

    def _prepare(self, index: int, value) -> np.ndarray:
        array = np.asarray(value)
        expected, dtype = self.input_shapes[index], self.input_dtypes[index]
        if array.shape != expected:
            raise ValueError(
                f"input {index} of {self.path.name} has shape {list(array.shape)}, but this model takes exactly "
                f"{list(expected)} (fixed shapes: pad to the bucket with pad_to, or use the model of another bucket)"
            )
        if np.issubdtype(dtype, np.integer):
            if not (np.issubdtype(array.dtype, np.integer) or array.dtype == np.bool_):
                raise ValueError(f"input {index} of {self.path.name} takes integers ({dtype.name}), got {array.dtype}")
            info = np.iinfo(dtype)
            if array.size and (array.min() < info.min or array.max() > info.max):
                raise ValueError(f"input {index} of {self.path.name} has values outside {dtype.name}")
        elif np.issubdtype(dtype, np.floating) and not np.issubdtype(array.dtype, np.number):
            raise ValueError(f"input {index} of {self.path.name} takes {dtype.name}, got {array.dtype}")
        return np.ascontiguousarray(array, dtype=dtype)

    def run(self, inputs: Sequence[np.ndarray]) -> list[np.ndarray]:
        """Outputs (fresh arrays) in the torch module's order; inputs are cast to the model's dtypes."""
        if isinstance(inputs, np.ndarray) or len(inputs) != len(self.input_names):
            count = 1 if isinstance(inputs, np.ndarray) else len(inputs)
            raise ValueError(f"{self.path.name} takes {len(self.input_names)} inputs, got {count}")
        feed = {
            name: self._prepare(i, value) for i, (name, value) in enumerate(zip(self.input_names, inputs, strict=True))
        }
        with self._lock:
            outputs = self._runner(**feed)
        return [np.array(outputs[name]) for name in self.output_names]

    __call__ = run
