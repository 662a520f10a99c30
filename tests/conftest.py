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
    elif model_type == "qwen3_moe":  # 8 fused experts, 2 routed per token
        cfg = T.Qwen3MoeConfig(**{**common, "intermediate_size": 96}, head_dim=16, num_experts=8,
                               num_experts_per_tok=2, moe_intermediate_size=32)
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


TEXT = "Pruning removes weights from a neural network to make it smaller. " * 40
"""Calibration text of the CLI tests."""


@pytest.fixture
def model_dir(tmp_path, tiny_tokenizer):
    """A tiny Llama checkpoint with its tokenizer, saved in ``tmp_path / "base"``."""
    path = tmp_path / "base"
    tiny_model("llama").save_pretrained(path)
    tiny_tokenizer.save_pretrained(path)
    return path


@pytest.fixture
def calib_file(tmp_path):
    """A small calibration text file."""
    path = tmp_path / "calib.txt"
    path.write_text("\n".join([TEXT] * 5))
    return path


def solver_layer(seed: int = 0, out: int = 64, inputs: int = 128, tokens: int = 512):
    """``(W, X, H)``: a random layer with correlated, unevenly scaled inputs ``X = Z @ A`` and its Hessian."""
    from hfprune.stats import HessianStats

    g = torch.Generator().manual_seed(seed)
    z = torch.randn(tokens, inputs, generator=g)
    mix = torch.randn(inputs, inputs, generator=g) / inputs**0.5 + 0.3 * torch.eye(inputs)
    x = (z @ mix) * (0.2 + 3 * torch.rand(inputs, generator=g))
    w = torch.randn(out, inputs, generator=g)
    stats = HessianStats(inputs)
    stats.add_batch(x)
    return w, x, stats.hessian()


def replay_blocks(model, ids) -> torch.Tensor:
    """The last block's output for ``ids``, replayed block by block by a LayerRunner from its captured inputs."""
    from hfprune.core.runner import LayerRunner

    runner = LayerRunner(model)
    runner.capture(ids)
    for i in range(len(runner)):
        runner.run(i, update=True)
    return runner.hidden[0]


class GraphRecorder:
    """Records, while active, whether each forward of ``module`` ran in grad mode and how many bytes
    autograd saved for a backward pass: an evaluation must show ``grad_modes`` all False and
    ``saved_bytes == 0`` (the saved activations are what an autograd graph costs in memory)."""

    def __init__(self, module):
        self.module, self.grad_modes, self.saved_bytes = module, [], 0

    def _pack(self, t):
        self.saved_bytes += t.numel() * t.element_size()
        return t

    def __enter__(self):
        self._hook = self.module.register_forward_pre_hook(lambda m, a: self.grad_modes.append(torch.is_grad_enabled()))
        self._saved = torch.autograd.graph.saved_tensors_hooks(self._pack, lambda t: t)
        self._saved.__enter__()
        return self

    def __exit__(self, *exc):
        self._saved.__exit__(*exc)
        self._hook.remove()


def accelerate_launch(launcher: str, hfprune_args: list[str], processes: int = 2, timeout: int = 300):
    """``accelerate launch <launcher> --num_processes N hfprune ...`` (one thread per process), completed."""
    import shutil
    import socket
    import subprocess
    import sys

    bin_dir = Path(sys.executable).parent
    if shutil.which("accelerate", path=str(bin_dir)) is None:
        pytest.skip("accelerate CLI not installed")
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1", "PYTHONPATH": str(REPO)}
    env.pop("WORLD_SIZE", None)
    return subprocess.run([str(bin_dir / "accelerate"), "launch", launcher, "--num_processes", str(processes),
                           "--num_machines", "1", "--num_cpu_threads_per_process", "1", "--mixed_precision", "no",
                           "--dynamo_backend", "no", "--main_process_port", str(port), str(bin_dir / "hfprune"),
                           *hfprune_args], env=env, capture_output=True, text=True, timeout=timeout)


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
