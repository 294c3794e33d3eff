import os

import pytest

# The Triton interpreter must be on before any @triton.jit runs (CPU-only tests of the kernels).
os.environ.setdefault("TRITON_INTERPRET", "1")
os.environ.setdefault("DS_ACCELERATOR", "cpu")
os.environ.setdefault("WANDB_MODE", "offline")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("HF_HUB_OFFLINE", "1")


@pytest.fixture(scope="session")
def tokenizer_path(tmp_path_factory) -> str:
    """A small SentencePiece model (vocab 600) trained on the embedded corpus, shared by the data tests."""
    from data_pipeline.testing import embedded_sample
    from data_pipeline.tokenizer import train_sentencepiece

    return train_sentencepiece(embedded_sample(60), str(tmp_path_factory.mktemp("tok") / "sp"), 600)
