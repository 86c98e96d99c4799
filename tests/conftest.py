"""Shared fixtures: tiny models built by the tests, the real small model and data: ../shared/data (or
SWEEPER_SHARED_DATA) where it is, else the payload the project ships in demo/data (same layout, files cut short:
demo/README.md)."""
from __future__ import annotations

import os
import shutil
from pathlib import Path

import pytest

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

REPO = Path(__file__).resolve().parents[1]
DEMO_DATA = REPO / "demo" / "data"
_FULL_DATA = Path(os.environ.get("SWEEPER_SHARED_DATA", REPO.parent / "shared" / "data"))
# the full files when present (a workspace), else the shipped slices (a bare clone); either way every test that
# needs llama-4m, WikiText-2, PIQA or GSM8K runs
FULL = _FULL_DATA.is_dir() and any(_FULL_DATA.iterdir())
SHARED_DATA = _FULL_DATA if FULL else DEMO_DATA
REAL_MODEL = SHARED_DATA / "models" / "llama-4m"


def build_tiny_llama(path: Path, seed: int = 0, hidden: int = 128, layers: int = 2) -> Path:
    """A random-weight Llama with the byte-level BPE tokenizer of llama-4m (tokenizer files only)."""
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM

    torch.manual_seed(seed)
    cfg = AutoConfig.for_model(
        "llama", vocab_size=4096, hidden_size=hidden, intermediate_size=hidden * 4, num_hidden_layers=layers,
        num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=1024, tie_word_embeddings=False,
        bos_token_id=1, eos_token_id=2, pad_token_id=2,
    )
    model = AutoModelForCausalLM.from_config(cfg, dtype=torch.float32)
    path.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(path)
    for f in ("tokenizer.json", "tokenizer_config.json"):
        shutil.copy(REAL_MODEL / f, path / f)
    return path


@pytest.fixture(scope="session")
def tiny_model(tmp_path_factory) -> Path:
    return build_tiny_llama(tmp_path_factory.mktemp("models") / "tiny-llama")


@pytest.fixture(scope="session")
def real_model() -> Path:
    if not (REAL_MODEL / "config.json").is_file():
        pytest.skip(f"{REAL_MODEL / 'config.json'} not present")
    return REAL_MODEL


@pytest.fixture(scope="session")
def shared_data() -> Path:
    if not SHARED_DATA.is_dir():
        pytest.skip(f"{SHARED_DATA} not present")
    return SHARED_DATA


@pytest.fixture(scope="module")
def two_node_cluster():
    """A two-node Ray cluster whose worker node sees neither this machine's /tmp nor ``cluster.results_root``
    (tests/cluster_harness.py); skipped, saying why, where the worker node's mount namespace cannot be made."""
    from cluster_harness import TwoNodeCluster, namespace_unavailable

    why = namespace_unavailable()
    if why:
        pytest.skip(f"two-node cluster harness unavailable: {why}")
    with TwoNodeCluster() as cluster:
        yield cluster
