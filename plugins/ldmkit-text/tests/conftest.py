"""The text encoders load from local folders only; make any attempt at the network fail loudly."""

import os

# set before transformers / huggingface_hub are imported by the test modules
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
