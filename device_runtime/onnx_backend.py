"""A thin, torch-free wrapper over onnxruntime's InferenceSession with positional inputs and outputs."""

from __future__ import annotations

from pathlib import Path

import numpy as np


class OnnxSession:
    def __init__(self, path: str | Path, num_threads: int | None = None) -> None:
        import onnxruntime as ort

        options = ort.SessionOptions()
        if num_threads:
            options.intra_op_num_threads = num_threads
            options.inter_op_num_threads = 1
        self.session = ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])
        self.input_names = [i.name for i in self.session.get_inputs()]
        self.output_names = [o.name for o in self.session.get_outputs()]
        self._input_types = [i.type for i in self.session.get_inputs()]

    def run(self, inputs: list[np.ndarray]) -> list[np.ndarray]:
        if len(inputs) != len(self.input_names):
            raise ValueError(f"graph takes {len(self.input_names)} inputs {self.input_names}, got {len(inputs)}")
        feed = {}
        for name, kind, value in zip(self.input_names, self._input_types, inputs, strict=True):
            dtype = np.int64 if "int64" in kind else np.float32
            feed[name] = np.ascontiguousarray(value, dtype=dtype)
        return self.session.run(self.output_names, feed)
