"""Shared fixtures: a small synthetic corpus, a tiny tokenizer and a micro base model, built once
per test session through the public CLI."""

import json
import os
import random
import subprocess
import sys
from pathlib import Path

import pytest

from chatsmith.cli import main

REPO = Path(__file__).resolve().parents[1]
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

WORDS = ("the king queen said to of and a in that is was he she it for on with as his her by at "
         "from this be have not are but all they one two three four five six seven eight nine ten "
         "love war peace time world house river light night day sea land heart mind name good "
         "great little old new first last long").split()


def synthetic_docs(n: int, seed: int = 0) -> list[str]:
    rng = random.Random(seed)
    docs = []
    for i in range(n):
        sents = []
        for _ in range(rng.randint(3, 12)):
            w = [rng.choice(WORDS) for _ in range(rng.randint(4, 14))]
            sents.append(" ".join(w).capitalize() + rng.choice([".", ".", "!", "?"]))
        if i % 7 == 0:
            sents.append("春眠不觉晓，处处闻啼鸟。夜来风雨声，花落知多少。")
        if i % 5 == 0:
            sents.append(f"In {1800 + i} there were {rng.randint(2, 999)} ships.")
        docs.append(" ".join(sents))
    return docs


def cli(*args) -> int:
    return main([str(a) for a in args])


def cli_subprocess(*args, timeout=300, **kw) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "chatsmith", *map(str, args)], capture_output=True,
                          text=True, timeout=timeout, cwd=kw.pop("cwd", REPO), **kw)


@pytest.fixture(scope="session")
def corpus_dir(tmp_path_factory) -> Path:
    d = tmp_path_factory.mktemp("corpus")
    raw = d / "raw.jsonl"
    raw.write_text("".join(json.dumps({"text": t}) + "\n" for t in synthetic_docs(400)))
    assert cli("data", "build", "--input", raw, "--out", d / "built", "--val-fraction", "0.05") == 0
    return d / "built"


@pytest.fixture(scope="session")
def tokenizer_dir(corpus_dir, tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("tok")
    assert cli("tokenizer", "train", "--input", corpus_dir, "--vocab-size", 512, "--out", out) == 0
    return out


PRETRAIN_FLAGS = ["--preset", "micro", "--batch-size", 8, "--seq-len", 32, "--eval-every", 10,
                  "--eval-batches", 2, "--log-every", 1, "--warmup-steps", 5, "--lr", "3e-3"]


@pytest.fixture(scope="session")
def base_model(corpus_dir, tokenizer_dir, tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("base") / "model"
    assert cli("pretrain", "--input", corpus_dir, "--tokenizer", tokenizer_dir, "--out", out,
               "--max-steps", 60, "--save-every", 20, *PRETRAIN_FLAGS) == 0
    return out


def pytest_report_header(config):
    """Say which OpenAI OpenAPI document the API responses are validated against."""
    from openapi_schema import SPEC, SUBSET

    if SPEC.exists():
        return f"OpenAI OpenAPI document: {SPEC} (the full official document)"
    if SUBSET.exists():
        return (f"OpenAI OpenAPI document: {SPEC} not found; using the extract {SUBSET} "
                f"(the same schemas, unchanged)")
    return f"OpenAI OpenAPI document: neither {SPEC} nor {SUBSET}: the schema checks skip"


@pytest.fixture(scope="module")
def one_torch_thread():
    """One intra-op thread for a module of tiny models: they gain nothing from a second thread, and
    on a busy 2-core machine a second OpenMP thread spin-waits and makes each step many times slower."""
    import torch

    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


@pytest.fixture(scope="session")
def encoder_dir(tmp_path_factory) -> Path:
    """A tiny random BERT-style encoder (2 layers, d=32, 24 positions) with a WordPiece tokenizer
    trained on the synthetic docs: for serving embeddings."""
    import torch

    from chatsmith.checkpoint import save_checkpoint
    from chatsmith.model.encoder import Encoder, EncoderConfig
    from chatsmith.wordpiece import EncoderTokenizer, train_wordpiece

    d = tmp_path_factory.mktemp("encoder")
    train_wordpiece(iter(synthetic_docs(150)), 250).save(d / "tok")
    tok = EncoderTokenizer.load(d / "tok")
    torch.manual_seed(0)
    m = Encoder(EncoderConfig(vocab_size=(tok.vocab_size + 63) // 64 * 64, n_layer=2, n_head=2, d_model=32,
                              max_seq_len=24))
    save_checkpoint(d / "enc", m, tokenizer_dir=d / "tok")
    return d / "enc"
