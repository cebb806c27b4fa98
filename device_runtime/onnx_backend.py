"""A thin, torch-free wrapper over onnxruntime's InferenceSession with positional inputs and outputs.

Memory: ``memory`` names a preset of :data:`MEMORY_PRESETS`, the SessionOptions that trade speed for resident
memory. ``"default"`` is onnxruntime's own settings; ``"low"`` (``DeviceRuntime(low_memory=True)``, ``cartosplit
run --low-memory``, serve-device's ``low_memory = true``) turns off the CPU memory arena and the memory-pattern
planner, which keep every activation buffer they ever allocated (one plan per input shape: the device graphs
see a new shape for each token count). The other presets exist to be measured one at a time
(``cartosplit bench device --memory``).

Measured on a MiniLM-shaped random int8 bundle (6 x 384, FFN 1536, vocab 30522; r=1, d=2), x86 AVX2, 1 thread,
fresh processes answering 200 inputs of 30..126 tokens, median of 5: default peaks at 99.9 MB, "low" at 94.8 MB
(-5 MB), "no-mem-pattern" 95.3, "no-arena" 98.9, with p50 per input 8.84 ms default vs 9.41 low (+6 %), 9.30
no-mem-pattern, 9.23 no-arena; "basic-optimization", "no-prepacking" and "initializers-on-device-allocator"
saved nothing (101.8, 98.4, 99.4 MB; no-prepacking +17 % slower). On short inputs (<= 30 tokens) all of them
peak within 1 MB of each other. So the default stays onnxruntime's (faster), and "low" is opt-in.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

# preset -> SessionOptions attributes, and session config entries under "config"
MEMORY_PRESETS: dict[str, dict] = {
    "default": {},
    "low": {"enable_cpu_mem_arena": False, "enable_mem_pattern": False},
    "no-arena": {"enable_cpu_mem_arena": False},
    "no-mem-pattern": {"enable_mem_pattern": False},
    "basic-optimization": {"graph_optimization_level": "ORT_ENABLE_BASIC"},
    "no-prepacking": {"config": {"session.disable_prepacking": "1"}},
    "initializers-on-device-allocator": {"config": {"session.use_device_allocator_for_initializers": "1"}},
    "low+no-prepacking": {
        "enable_cpu_mem_arena": False,
        "enable_mem_pattern": False,
        "config": {"session.disable_prepacking": "1"},
    },
}


def memory_preset(low_memory: bool | str) -> str:
    """The preset name for ``low_memory``: False -> "default", True -> "low", or a preset's own name."""
    if low_memory is True:
        return "low"
    if low_memory is False or low_memory is None:
        return "default"
    if low_memory not in MEMORY_PRESETS:
        raise ValueError(f"unknown memory preset {low_memory!r}; known: {sorted(MEMORY_PRESETS)}")
    return low_memory


def session_options(num_threads: int | None = None, memory: str = "default"):
    """onnxruntime SessionOptions for ``num_threads`` intra-op threads (None: onnxruntime's choice) and a preset."""
    import onnxruntime as ort

    options = ort.SessionOptions()
    if num_threads:
        options.intra_op_num_threads = num_threads
        options.inter_op_num_threads = 1
    for key, value in MEMORY_PRESETS[memory_preset(memory)].items():
        if key == "config":
            for entry, setting in value.items():
                options.add_session_config_entry(entry, setting)
        elif key == "graph_optimization_level":
            options.graph_optimization_level = getattr(ort.GraphOptimizationLevel, value)
        else:
            setattr(options, key, value)
    return options


class OnnxSession:
    def __init__(self, path: str | Path, num_threads: int | None = None, memory: str = "default") -> None:
        import onnxruntime as ort

        options = session_options(num_threads, memory)
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
