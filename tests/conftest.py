import os

import pytest

os.environ.setdefault("HF_HUB_OFFLINE", "1")  # no hub here or in CI: fail fast instead of retrying
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
if os.environ.get("PYTEST_XDIST_WORKER"):  # several test processes share the cores: one thread each, or they wait
    os.environ.setdefault("OMP_NUM_THREADS", "1")  # on each other; set before torch is imported, and for subprocesses


@pytest.fixture(scope="session")
def embedded_tokenizer():
    from lora_kit import load_tokenizer

    return load_tokenizer("embedded")
