import os

import pytest

os.environ.setdefault("HF_HUB_OFFLINE", "1")  # no hub here or in CI: fail fast instead of retrying
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")


@pytest.fixture(scope="session")
def embedded_tokenizer():
    from lora_kit import load_tokenizer

    return load_tokenizer("embedded")
