"""Outputs-unchanged check: prune tiny random models with every method, save each with
``hfprune.save_pretrained`` and print the sha256 of its safetensors.

Run it before and after a refactor on the same machine; the printed hashes must be identical.

    python scripts/check_outputs.py [--only NAME ...] [--keep DIR]

The models are built from configs (like tests/conftest.py), so no download is needed.
"""

from __future__ import annotations

import argparse
import hashlib
import os
import sys
import tempfile
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import torch  # noqa: E402
import transformers as T  # noqa: E402

import hfprune  # noqa: E402

VOCAB = 320


def llama(seed: int = 0):
    torch.manual_seed(seed)
    cfg = T.LlamaConfig(vocab_size=VOCAB, hidden_size=64, intermediate_size=128, num_hidden_layers=4,
                        num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=256,
                        pad_token_id=0, bos_token_id=1, eos_token_id=2)
    return T.AutoModelForCausalLM.from_config(cfg, dtype=torch.float32).eval()


def qwen3_moe(seed: int = 0):
    torch.manual_seed(seed)
    cfg = T.AutoConfig.for_model("qwen3_moe", vocab_size=VOCAB, hidden_size=64, intermediate_size=96,
                                 num_attention_heads=4, num_key_value_heads=2, head_dim=16, num_hidden_layers=4,
                                 num_experts=8, num_experts_per_tok=2, moe_intermediate_size=32,
                                 max_position_embeddings=256, pad_token_id=0, bos_token_id=1, eos_token_id=2)
    return T.AutoModelForCausalLM.from_config(cfg, dtype=torch.float32).eval()


def calibration():
    return torch.randint(3, VOCAB, (8, 32), generator=torch.Generator().manual_seed(1))


# name -> (model builder, config, save kwargs)
CASES = {
    "magnitude-50": (llama, lambda: hfprune.MagnitudeConfig(sparsity=0.5), {}),
    "wanda-50": (llama, lambda: hfprune.WandaConfig(sparsity=0.5), {}),
    "wanda-2:4": (llama, lambda: hfprune.WandaConfig(pattern="2:4"), {}),
    "sparsegpt-50": (llama, lambda: hfprune.SparseGPTConfig(sparsity=0.5, block_size=16), {}),
    "sparsegpt-2:4": (llama, lambda: hfprune.SparseGPTConfig(pattern="2:4", block_size=16), {}),
    "admm-2:4": (llama, lambda: hfprune.ADMMConfig(pattern="2:4"), {}),
    "obs-heads+mlp": (llama, lambda: hfprune.StructuredConfig(heads_ratio=0.5, mlp_ratio=0.25), {}),
    "depth-1": (llama, lambda: hfprune.DepthPruningConfig(num_blocks=1), {}),
    "hidden-48": (llama, lambda: hfprune.HiddenPruningConfig(keep_hidden=48), {}),
    "experts-8to6": (qwen3_moe, lambda: hfprune.ExpertPruningConfig(num_experts=6), {}),
    "sparsegpt-50-int4": (llama, lambda: hfprune.SparseGPTConfig(sparsity=0.5, block_size=16, bits=4, group_size=32),
                          {"format": "compressed-tensors", "bits": 4, "group_size": 32}),
    "wanda-2:4-moe": (qwen3_moe, lambda: hfprune.WandaConfig(pattern="2:4"), {}),
}


def run_case(name: str, out_dir: Path) -> list[tuple[str, str]]:
    build, make_config, save_kw = CASES[name]
    model = build()
    report = hfprune.prune(model, None, make_config(), calibration(), progress=False)
    folder = out_dir / name.replace(":", "_")
    hfprune.save_pretrained(model, folder, report=report, **save_kw)
    rows = []
    for path in sorted(folder.glob("*.safetensors")):
        rows.append((path.name, hashlib.sha256(path.read_bytes()).hexdigest()))
    return rows


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--only", nargs="+", choices=list(CASES), help="Run only these cases.")
    parser.add_argument("--keep", help="Save the checkpoints under this folder (default: a temporary one).")
    args = parser.parse_args(argv)
    torch.set_num_threads(1)
    with tempfile.TemporaryDirectory() as tmp:
        out_dir = Path(args.keep or tmp)
        for name in args.only or CASES:
            try:
                rows = run_case(name, out_dir)
            except Exception as err:  # noqa: BLE001 - a failing case is reported, the others still run
                print(f"{name:20s} ERROR {type(err).__name__}: {err}")
                continue
            for fname, digest in rows:
                print(f"{name:20s} {fname} {digest}")
            sys.stdout.flush()
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
