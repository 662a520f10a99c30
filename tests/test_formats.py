"""hfprune-sparse checkpoints: save, reload with plain from_pretrained, sizes, quantization."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import torch
from safetensors import safe_open

import hfprune  # noqa: F401
import hfprune.formats as formats
from hfprune.formats import compress_weight, decompress_weight, load_sparse, save_sparse, sizes_report
from hfprune.solvers.masks import check_nm, nm_mask, row_mask

CFG = dict(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
           num_key_value_heads=2, vocab_size=256)
# Linear weights of the config above: per layer q 64x64, k/v 32x64, o 64x64, gate/up 128x64, down 64x128.
LINEAR_PARAMS = 2 * (4096 + 2048 + 2048 + 4096 + 8192 + 8192 + 8192)
LINEAR_ROWS = 2 * (64 + 32 + 32 + 64 + 128 + 128 + 64)


def _linears(model):
    return {n: m for n, m in model.named_modules() if isinstance(m, torch.nn.Linear) and "lm_head" not in n}


def make_model(pattern: str, dtype=torch.float32, seed=0):
    from transformers import AutoModelForCausalLM, LlamaConfig

    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(LlamaConfig(**CFG)).to(dtype).eval()
    with torch.no_grad():
        for module in _linears(model).values():
            w = module.weight
            mask = nm_mask(w.abs(), 2, 4) if pattern == "2:4" else row_mask(w.abs(), 0.5)
            w[mask] = 0
    model.config.pruning_config = {"method": "magnitude", "pattern": pattern, "sparsity": 0.5,
                                   "calibration": None, "hfprune_version": "0.1.0"}
    return model


def _plain_reload(path):
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(path).eval()


def _assert_identical(a, b):
    sa, sb = a.state_dict(), b.state_dict()
    assert sa.keys() == sb.keys()
    for key in sa:
        assert sa[key].dtype == sb[key].dtype, key
        assert torch.equal(sa[key], sb[key]), key
    x = torch.randint(0, CFG["vocab_size"], (2, 9))
    with torch.no_grad():
        assert torch.equal(a(x).logits, b(x).logits)


def _files(path):
    return sorted(p.name for p in path.iterdir())


@pytest.mark.parametrize("pattern", ["unstructured", "2:4"])
def test_roundtrip_bit_identical(tmp_path, pattern):
    model = make_model(pattern)
    info = save_sparse(model, tmp_path / "sparse")
    expected = "nm" if pattern == "2:4" else "bitmask"
    assert set(info["encodings"].values()) == {expected}
    assert len(info["encodings"]) == 14  # 7 linears x 2 layers, lm_head excluded
    cfg = json.loads((tmp_path / "sparse" / "config.json").read_text())
    assert cfg["quantization_config"]["quant_method"] == "hfprune-sparse"
    assert cfg["quantization_config"]["pattern"] == pattern
    assert cfg["pruning_config"]["pattern"] == pattern
    reloaded = _plain_reload(tmp_path / "sparse")
    _assert_identical(model, reloaded)
    # the reloaded model is an ordinary dense model that carries the pruning description
    assert getattr(reloaded.config, "quantization_config", None) is None
    assert not getattr(reloaded, "is_quantized", False)
    assert reloaded.config.pruning_config["pattern"] == pattern
    # and it saves back as a normal dense checkpoint
    reloaded.save_pretrained(tmp_path / "dense_again")
    assert "quantization_config" not in json.loads((tmp_path / "dense_again" / "config.json").read_text())


def test_bf16_and_explicit_loader(tmp_path):
    model = make_model("2:4", dtype=torch.bfloat16)
    save_sparse(model, tmp_path / "s")
    reloaded = load_sparse(tmp_path / "s")
    assert reloaded.dtype == torch.bfloat16
    # compare with the dense checkpoint loaded the same way (a model cast with .to(bf16) keeps
    # non-persistent buffers such as rotary inv_freq in another precision)
    model.save_pretrained(tmp_path / "d")
    _assert_identical(_plain_reload(tmp_path / "d"), reloaded.eval())


def test_load_decodes_on_one_thread_and_restores_the_count(tmp_path, monkeypatch):
    """The thread count is switched once per load, not per weight, and restored after it."""
    import hfprune.formats.sparse as sparse

    save_sparse(make_model("2:4"), tmp_path / "s")
    seen, decode = [], sparse.decompress_weight
    monkeypatch.setattr(sparse, "decompress_weight", lambda *a, **k: seen.append(torch.get_num_threads()) or decode(*a, **k))
    threads = torch.get_num_threads()
    torch.set_num_threads(2)
    try:
        _plain_reload(tmp_path / "s")
        assert seen and set(seen) == {1} and torch.get_num_threads() == 2
        # a load that fails half way through still restores it (load_sparse's finally)
        monkeypatch.setattr(sparse, "decompress_weight", lambda *a, **k: 1 / 0)
        with pytest.raises(RuntimeError, match="conversion"):
            load_sparse(tmp_path / "s")
        assert torch.get_num_threads() == 2
    finally:
        torch.set_num_threads(threads)


@pytest.mark.parametrize("pattern", ["unstructured", "2:4"])
def test_sizes(tmp_path, pattern):
    model = make_model(pattern)
    model.save_pretrained(tmp_path / "dense")
    save_sparse(model, tmp_path / "sparse")
    save_sparse(model, tmp_path / "int4", bits=4)
    dense, sparse, int4 = (sizes_report(tmp_path / d) for d in ("dense", "sparse", "int4"))
    dense_linear = LINEAR_PARAMS * 4
    sparse_linear = sum(v for k, v in sparse["by_kind"].items() if k != "dense")
    # fp32 values of the kept half (16 bits/weight) + 1 bit/weight (bitmask) or, for 2:4, one of 6
    # patterns per group of 4 packed 3 groups per byte
    if pattern == "2:4":
        index = sum(math.ceil(m.weight.numel() / 4 / 3) for m in _linears(model).values())
    else:
        index = LINEAR_PARAMS // 8
    expected = LINEAR_PARAMS // 2 * 4 + index + 14 * 2 * 8
    assert sparse_linear == expected
    assert sparse_linear <= 0.6 * dense_linear          # 0.53x
    # int4: 4 bits per kept value + index/bitmask + one fp32 scale per row
    int4_linear = sum(v for k, v in int4["by_kind"].items() if k != "dense")
    assert int4_linear == LINEAR_PARAMS // 4 + index + LINEAR_ROWS * 4 + 14 * 2 * 8
    assert int4_linear <= 0.12 * dense_linear
    # whole checkpoints (embeddings are stored as is in every variant)
    assert sparse["weights_bytes"] < dense["weights_bytes"] - 0.45 * dense_linear
    assert int4["weights_bytes"] < sparse["weights_bytes"]


@pytest.mark.parametrize("bits,pattern,group_size", [(8, "2:4", None), (4, "2:4", 32), (4, "unstructured", None),
                                                     (8, "unstructured", 16)])
def test_quantized_reload_within_step(tmp_path, bits, pattern, group_size):
    model = make_model(pattern)
    save_sparse(model, tmp_path / "q", bits=bits, group_size=group_size)
    reloaded = _plain_reload(tmp_path / "q")
    qmax = 2 ** (bits - 1) - 1
    orig, new = _linears(model), _linears(reloaded)
    for name, module in orig.items():
        w, w2 = module.weight, new[name].weight
        assert w2.dtype == w.dtype
        assert bool((w2[w == 0] == 0).all()), name             # pruned weights stay exactly zero
        rows, cols = w.shape
        gs = group_size or cols
        step = w.abs().view(rows, cols // gs, gs).amax(-1) / qmax       # quantization step per group
        err = (w - w2).abs().view(rows, cols // gs, gs).amax(-1)
        assert bool((err <= step / 2 * (1 + 1e-4) + 1e-12).all()), name
        if pattern == "2:4":
            assert check_nm(w2, 2, 4)
    # other tensors untouched
    assert torch.equal(model.model.embed_tokens.weight, reloaded.model.embed_tokens.weight)
    x = torch.randint(0, CFG["vocab_size"], (1, 8))
    with torch.no_grad():
        diff = (model(x).logits - reloaded(x).logits).abs().max().item()
    assert diff < (0.05 if bits == 8 else 0.5)


def test_weights_on_grid_are_stored_exactly(tmp_path):
    """Weights already on an int4 grid (e.g. SparseGPT joint quantization) reload bit-identically."""
    model = make_model("2:4", dtype=torch.bfloat16)
    torch.manual_seed(1)
    with torch.no_grad():
        for module in _linears(model).values():
            w = module.weight
            rows, cols = w.shape
            scale = torch.rand(rows, cols // 32, 1) * 0.02 + 0.001
            q = torch.randint(-8, 8, (rows, cols // 32, 32)).float()
            q[(w == 0).view(rows, cols // 32, 32)] = 0
            # absmax on a level below 7 in some groups: detection must not assume absmax -> qmax
            q[: rows // 2] = q[: rows // 2].clamp(-5, 5)
            w.copy_((q * scale).view(rows, cols).to(w.dtype))
    save_sparse(model, tmp_path / "grid", bits=4, group_size=32)
    model.save_pretrained(tmp_path / "dense")
    _assert_identical(_plain_reload(tmp_path / "dense"), _plain_reload(tmp_path / "grid"))


def test_grid_the_detection_cannot_find_is_used_when_the_method_gives_it():
    """A group holding only the levels -8 and 3 of step s: no search from the values finds s (the
    smallest gap 3s puts the absmax on level 8/3), so without the method's grid the group is rounded
    to absmax/7 and 3s changes; with it (what SparseGPT/ADMM return) it is stored exactly."""
    from hfprune.solvers.quant import quantize

    s = 2.0 ** -7
    w = torch.tensor([[-8 * s, 3 * s, 0.0, 0.0], [2 * s, -5 * s, 7 * s, 0.0]], dtype=torch.float32)
    q0, scale0, exact0 = quantize(w, 4, 4)
    assert exact0 == 1 and not torch.equal(q0[0].float() * scale0[0], w[0])
    grid = torch.full((2, 1), s)
    q, scale, exact = quantize(w, 4, 4, grid=grid)
    assert exact == 2 and torch.equal((q.float() * scale), w)
    assert q[0].tolist() == [-8, 3, 0, 0]
    with pytest.raises(ValueError, match="does not match"):
        quantize(w, 4, 2, grid=grid)


@pytest.mark.parametrize("method,fmt,group_size", [("sparsegpt", "sparse", 32), ("admm", "sparse", None),
                                                   ("sparsegpt", "compressed-tensors", 32)])
def test_joint_quantization_grid_travels_from_prune_to_save(tmp_path, monkeypatch, method, fmt, group_size):
    """SparseGPT / ADMM with bits return the grid of every layer in the record; save_pretrained stores
    the integers on it, so the reload is bit-identical, and the record's JSON stays tensor-free."""
    from hfprune.formats import codec, compressed_tensors
    from hfprune.solvers.quant import quantize

    given = []

    def spy(w, bits, group_size, grid=None):
        given.append(grid is not None)
        return quantize(w, bits, group_size, grid=grid)

    monkeypatch.setattr(codec, "quantize", spy)
    monkeypatch.setattr(compressed_tensors, "quantize", spy)
    from transformers import AutoModelForCausalLM, LlamaConfig

    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(LlamaConfig(**CFG)).eval()
    config = hfprune.SparseGPTConfig if method == "sparsegpt" else hfprune.ADMMConfig
    calib = torch.randint(0, 256, (4, 32), generator=torch.Generator().manual_seed(0))
    report = hfprune.prune(model, None, config(pattern="2:4", bits=4, group_size=group_size), calibration=calib,
                           progress=False)
    linears = _linears(model)
    assert set(report.quant_scales) == set(report.layers) == set(linears)
    for name, scale in report.quant_scales.items():
        w = linears[name].weight.detach()
        groups = w.shape[1] // (group_size or w.shape[1])
        assert scale.shape == (w.shape[0], groups) and scale.dtype == torch.float32
        q = torch.round(w.view(w.shape[0], groups, -1) / scale[..., None])
        assert torch.equal((q * scale[..., None]).view_as(w), w) and bool(((q >= -8) & (q <= 7)).all())
    assert "quant_scales" not in json.loads(report.to_json())
    assert report.scales_for(4, group_size) and not report.scales_for(8, group_size)
    hfprune.save_pretrained(model, tmp_path / "q", format=fmt, bits=4, group_size=group_size, report=report)
    if fmt == "sparse":
        reloaded = _linears(AutoModelForCausalLM.from_pretrained(tmp_path / "q", dtype=torch.float32))
        stored = {name: module.weight for name, module in reloaded.items()}
    else:  # compressed-tensors: dequantize the packed integers (loading needs the compressed-tensors package)
        from safetensors.torch import load_file

        from hfprune.formats.compressed_tensors import unpack_int32

        tensors = load_file(str(tmp_path / "q" / "model.safetensors"))
        stored = {name: unpack_int32(tensors[f"{name}.weight_packed"], 4, w.shape[1]).float()
                  * tensors[f"{name}.weight_scale"].float().repeat_interleave(group_size, 1)
                  for name, w in ((n, m.weight) for n, m in linears.items())}
    assert len(given) == len(linears) and all(given)  # every layer was stored on the grid its method used
    for name, module in linears.items():
        assert torch.equal(stored[name], module.weight), name


def test_grid_of_a_layer_reshaped_since_is_not_used(tmp_path):
    """SparseGPT int4, then structured pruning halves the MLP: the first record's grids no longer fit
    gate/up/down; saving with that record still works (the grid is found from the values)."""
    from transformers import AutoModelForCausalLM, LlamaConfig

    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(LlamaConfig(**CFG)).eval()
    ids = torch.randint(0, 256, (4, 32), generator=torch.Generator().manual_seed(0))
    report = hfprune.prune(model, None, hfprune.SparseGPTConfig(sparsity=0.5, bits=4, group_size=32), calibration=ids,
                           progress=False)
    hfprune.prune(model, config=hfprune.StructuredConfig(mlp_ratio=0.5), calibration=ids, progress=False)
    assert report.quant_scales["model.layers.0.mlp.up_proj"].shape[0] == 128
    assert model.model.layers[0].mlp.up_proj.weight.shape[0] == 64
    hfprune.save_pretrained(model, tmp_path / "q", format="sparse", bits=4, group_size=32, report=report)
    reloaded = _linears(_plain_reload(tmp_path / "q"))
    for name, module in _linears(model).items():
        assert reloaded[name].weight.shape == module.weight.shape, name
    q = reloaded["model.layers.0.self_attn.q_proj"].weight  # not reshaped: stored on SparseGPT's grid, exactly
    assert torch.equal(q, model.model.layers[0].self_attn.q_proj.weight)


def test_sharded_save_has_index_and_reloads(tmp_path):
    model = make_model("2:4")
    info = save_sparse(model, tmp_path / "sh", max_shard_size="100KB")
    assert len(info["files"]) > 1
    index = json.loads((tmp_path / "sh" / "model.safetensors.index.json").read_text())
    names = set()
    total = 0
    for fname in info["files"]:
        with safe_open(str(tmp_path / "sh" / fname), "pt") as fh:
            for key in fh.keys():
                assert index["weight_map"][key] == fname
                t = fh.get_tensor(key)
                total += t.numel() * t.element_size()
                names.add(key)
    assert names == set(index["weight_map"])
    assert index["metadata"]["total_size"] == total
    # companions of one module stay in one shard
    prefix = "model.layers.0.mlp.down_proj."
    assert len({index["weight_map"][prefix + s] for s in ("weight_values", "weight_nm_code", "weight_shape")}) == 1
    _assert_identical(model, _plain_reload(tmp_path / "sh"))


def test_no_pickle_files(tmp_path):
    model = make_model("unstructured")
    save_sparse(model, tmp_path / "a", bits=8, max_shard_size="50KB")
    formats.save_compressed_tensors(model, tmp_path / "b", bits=4, group_size=32)
    for d in ("a", "b"):
        for p in (tmp_path / d).rglob("*"):
            assert p.suffix in (".safetensors", ".json"), p
            head = p.read_bytes()[:2]
            assert head != b"\x80\x04" and head != b"PK", p  # pickle protocol / torch zip


@pytest.mark.parametrize("n,m", [(2, 4), (1, 4), (4, 8), (2, 8), (8, 16)])
def test_nm_codec(n, m):
    torch.manual_seed(n * 100 + m)
    w = torch.randn(6, 48)
    w[nm_mask(w.abs(), n, m)] = 0
    w[0, :m] = 0                 # a group with fewer than n non-zeros
    w[1, m: 2 * m] = 0
    w[1, m] = 1.5
    enc = compress_weight(w, pattern=f"{n}:{m}")
    # combinatorial code where C(M, N) <= 256, else one index per kept value
    assert ("weight_nm_code" in enc) == (math.comb(m, n) <= 256)
    assert torch.equal(decompress_weight(enc, pattern=f"{n}:{m}"), w)
    if (n, m) == (2, 4):
        # 6 patterns per group of 4: 3 groups per byte, i.e. 2.67 bits per group (1.33 per kept value)
        assert enc["weight_nm_code"].numel() == math.ceil(w.numel() // 4 / 3)
    if (n, m) == (8, 16):
        assert enc["weight_nm_index"].numel() == w.numel() // 2 * 4 // 8


def test_bitmask_codec_edge_cases():
    w = torch.zeros(3, 13)       # width not a multiple of 8
    w[0, 0] = 1.0
    w[2, 12] = -2.0
    enc = compress_weight(w)
    assert enc["weight_bitmask"].dtype == torch.uint8 and enc["weight_bitmask"].numel() == (39 + 7) // 8
    assert torch.equal(decompress_weight(enc), w)
    dense = torch.randn(8, 16)   # no sparsity: kept as is
    assert list(compress_weight(dense)) == ["weight"]
    q = compress_weight(dense, bits=8)   # dense layers are still quantized when bits is set
    assert q["weight_values"].dtype == torch.int8
    assert (decompress_weight(q) - dense).abs().max() <= dense.abs().max() / 127 / 2 + 1e-6


def test_compressed_tensors_pack_quantized(tmp_path):
    from safetensors.torch import load_file

    from hfprune.formats.compressed_tensors import pack_int32, unpack_int32

    # layout: value + 8, 8 nibbles per int32, least significant first
    q = torch.tensor([[-8, -7, 0, 1, 2, 3, 4, 7, 5]], dtype=torch.int32)
    packed = pack_int32(q, 4)
    assert packed.dtype == torch.int32 and packed.shape == (1, 2)
    expect0 = sum((v + 8) << (4 * i) for i, v in enumerate([-8, -7, 0, 1, 2, 3, 4, 7]))
    assert packed[0, 0].item() == expect0 - 2**32 and packed[0, 1].item() == 13
    assert torch.equal(unpack_int32(packed, 4, 9), q)

    model = make_model("2:4", dtype=torch.bfloat16)
    out = tmp_path / "ct"
    formats.save_compressed_tensors(model, out, bits=4, group_size=32)
    cfg = json.loads((out / "config.json").read_text())
    qc = cfg["quantization_config"]
    assert qc["quant_method"] == "compressed-tensors" and qc["format"] == "pack-quantized"
    assert qc["quantization_status"] == "compressed" and qc["ignore"] == ["lm_head"]
    wargs = qc["config_groups"]["group_0"]["weights"]
    assert (wargs["num_bits"], wargs["strategy"], wargs["group_size"], wargs["symmetric"]) == (4, "group", 32, True)
    tensors = load_file(str(out / "model.safetensors"))
    prefix = "model.layers.1.mlp.down_proj."
    w = model.model.layers[1].mlp.down_proj.weight
    assert tensors[prefix + "weight_packed"].shape == (64, 128 // 8)
    assert tensors[prefix + "weight_scale"].shape == (64, 4)
    assert tensors[prefix + "weight_shape"].tolist() == [64, 128]
    deq = unpack_int32(tensors[prefix + "weight_packed"], 4, 128).float() * \
        tensors[prefix + "weight_scale"].float().repeat_interleave(32, 1)
    assert bool((deq[w == 0] == 0).all())
    assert (deq - w.float()).abs().max() <= w.abs().max().float() / 7 * 0.51 + 1e-3


@pytest.mark.parametrize("pattern", ["unstructured", "2:4", "4:8", "8:16"])
@pytest.mark.parametrize("bits,group_size", [(None, None), (8, None), (4, 16)])
@pytest.mark.parametrize("chunk", [1, 5, None])
def test_decoder_matches_the_stored_weight_across_slices(monkeypatch, pattern, bits, group_size, chunk):
    """The vectorised decoder (byte tables, one gather per slice) gives the exact weight, whatever the
    slice size: slice edges inside a row, a last partial byte, groups with fewer than N non-zeros."""
    from hfprune.formats import codec

    if chunk is not None:
        monkeypatch.setattr(codec, "_CHUNK_BYTES", chunk)
    torch.manual_seed(len(pattern) * 10 + (bits or 0))
    w = torch.randn(13, 48)
    if pattern == "unstructured":
        w[torch.rand_like(w) < 0.55] = 0
    else:
        n, m = (int(x) for x in pattern.split(":"))
        w[nm_mask(w.abs(), n, m)] = 0
        w[3, :m] = 0                     # a group with no kept value at all
    enc = compress_weight(w, pattern=None if pattern == "unstructured" else pattern, bits=bits,
                          group_size=group_size, force=True)
    out = decompress_weight(enc, pattern=pattern, group_size=group_size)
    if bits is None:
        assert torch.equal(out, w)
        assert torch.equal(decompress_weight(enc, pattern=pattern, dtype=torch.bfloat16), w.bfloat16())
    else:
        q, scale, _ = codec.quantize(w, bits, group_size)
        group = group_size or w.shape[1]
        expected = torch.where(w != 0, q.float() * scale[:, torch.arange(w.shape[1]) // group], 0.0)
        assert torch.equal(out, expected)


_STOCK_LOAD = """
import sys, torch
from transformers import AutoModelForCausalLM
try:
    model = AutoModelForCausalLM.from_pretrained(sys.argv[1]).eval()
except Exception as exc:
    print("RAISED", type(exc).__name__, exc)
    sys.exit(3)
assert "hfprune" not in sys.modules
with torch.no_grad():
    torch.save(model(torch.arange(3, 20)[None]).logits, sys.argv[2])
"""


def _run(code, *args, cwd, hfprune_path=False):
    import os
    import subprocess
    import sys

    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}  # no hfprune on the path for the stock load
    if hfprune_path:
        env["PYTHONPATH"] = str(Path(formats.__file__).parents[2])  # this checkout's hfprune
    return subprocess.run([sys.executable, "-c", code, *map(str, args)], cwd=cwd, env=env, capture_output=True,
                          text=True, timeout=300)


@pytest.mark.parametrize("pattern", ["unstructured", "2:4"])
def test_stock_transformers_without_hfprune_refuses_a_sparse_checkpoint(tmp_path, pattern):
    """A process that never imports hfprune must not get random weights: it raises, naming hfprune and how to
    load the checkpoint; with hfprune the same folder still loads the exact weights."""
    model = make_model(pattern)
    save_sparse(model, tmp_path / "s")
    proc = _run(_STOCK_LOAD, tmp_path / "s", tmp_path / "logits.pt", cwd=tmp_path)
    out = proc.stdout + proc.stderr
    assert proc.returncode == 3, out
    assert "RAISED ValueError" in out and "pip install hfprune" in out and "import hfprune" in out, out
    assert not (tmp_path / "logits.pt").exists()
    # with hfprune imported: the exact model, whose config no longer carries the guard
    reloaded = _plain_reload(tmp_path / "s")
    _assert_identical(model, reloaded)
    assert getattr(reloaded.config, "transformers_weights", None) is None
    # saved back with stock save_pretrained, it is an ordinary dense checkpoint that stock transformers loads
    reloaded.save_pretrained(tmp_path / "dense_again")
    proc = _run(_STOCK_LOAD, tmp_path / "dense_again", tmp_path / "logits.pt", cwd=tmp_path)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    with torch.no_grad():
        assert torch.equal(torch.load(tmp_path / "logits.pt"), model(torch.arange(3, 20)[None]).logits)


def test_a_sparse_checkpoint_loads_in_a_fresh_process_with_import_hfprune(tmp_path):
    model = make_model("unstructured")
    save_sparse(model, tmp_path / "s")
    code = "import hfprune\n" + _STOCK_LOAD.replace('assert "hfprune" not in sys.modules', "")
    proc = _run(code, tmp_path / "s", tmp_path / "logits.pt", cwd=tmp_path, hfprune_path=True)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    with torch.no_grad():
        assert torch.equal(torch.load(tmp_path / "logits.pt"), model(torch.arange(3, 20)[None]).logits)
