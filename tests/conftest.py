"""Test-wide settings: nothing in the test suite may reach the network."""

import os

# Set before transformers / huggingface_hub are imported by any test module: they read it at import.
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
