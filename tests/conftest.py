"""Shared fixtures: tiny random models built from configs, and a tiny tokenizer trained here."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
import torch

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

REPO = Path(__file__).resolve().parents[1]
DATA_DIR = REPO.parent / "shared" / "data"

VOCAB = 320


def tiny_config(model_type: str, **extra):
    """A tiny random config of ``model_type`` (2 blocks, widths divisible by 8)."""
    import transformers as T

    common = dict(vocab_size=VOCAB, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                  num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=256,
                  pad_token_id=0, bos_token_id=1, eos_token_id=2)
    if model_type == "llama":
        cfg = T.LlamaConfig(**common)
    elif model_type == "mistral":
        cfg = T.MistralConfig(**common, sliding_window=16)
    elif model_type == "qwen2":
        cfg = T.Qwen2Config(**common)
    elif model_type == "qwen3":
        cfg = T.Qwen3Config(**common, head_dim=16)
    elif model_type == "gemma2":
        cfg = T.Gemma2Config(**common, head_dim=16, sliding_window=16)
    elif model_type == "gemma3_text":
        cfg = T.Gemma3TextConfig(**common, head_dim=16, sliding_window=16)
    elif model_type == "phi3":
        cfg = T.Phi3Config(**common)
    elif model_type == "phi":
        cfg = T.PhiConfig(**common)
    elif model_type == "gpt2":
        cfg = T.GPT2Config(vocab_size=VOCAB, n_embd=64, n_layer=2, n_head=4, n_positions=256,
                           bos_token_id=1, eos_token_id=2)
    elif model_type == "opt":
        cfg = T.OPTConfig(vocab_size=VOCAB, hidden_size=64, ffn_dim=128, num_hidden_layers=2,
                          num_attention_heads=4, word_embed_proj_dim=64, max_position_embeddings=256,
                          pad_token_id=0, bos_token_id=1, eos_token_id=2)
    elif model_type == "gpt_neox":
        common.pop("num_key_value_heads")
        cfg = T.GPTNeoXConfig(**common)
    else:
        raise KeyError(model_type)
    for k, v in extra.items():
        setattr(cfg, k, v)
    return cfg


def load_sharded(folder: Path) -> tuple[dict, dict]:
    """(index, {name: tensor}) of a sharded safetensors checkpoint, read through its index."""
    import json

    from safetensors import safe_open

    index = json.loads((Path(folder) / "model.safetensors.index.json").read_text())
    out = {}
    for key, fname in index["weight_map"].items():
        with safe_open(str(Path(folder) / fname), framework="pt") as fh:
            out[key] = fh.get_tensor(key)
    return index, out


def tiny_model(model_type: str, seed: int = 0, **extra):
    import transformers as T

    torch.manual_seed(seed)
    model = T.AutoModelForCausalLM.from_config(tiny_config(model_type, **extra))
    return model.eval()


@pytest.fixture(scope="session")
def tiny_tokenizer():
    """A byte-level BPE tokenizer with ``VOCAB`` entries, trained on local text in a second."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    corpus = [
        "The quick brown fox jumps over the lazy dog.",
        "Pruning removes weights from a neural network to make it smaller and faster.",
        "Calibration data is a small sample of text used to measure activations.",
    ] * 20
    tok = Tokenizer(models.BPE(unk_token=None))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=VOCAB, special_tokens=["<pad>", "<s>", "</s>"],
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False)
    tok.train_from_iterator(corpus, trainer)
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, pad_token="<pad>", bos_token="<s>", eos_token="</s>")
    assert len(fast) <= VOCAB
    return fast


@pytest.fixture
def random_ids():
    g = torch.Generator().manual_seed(123)
    return torch.randint(3, VOCAB, (4, 32), generator=g)


@pytest.fixture
def data_dir():
    if not DATA_DIR.is_dir():
        pytest.skip("../shared/data is not present")
    return DATA_DIR
