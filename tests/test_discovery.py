"""Layout discovery and MoE experts: models without a table entry, fused 3-D experts, image-text wrappers."""

import pytest
import torch
import transformers
from torch import nn

import hfprune
from hfprune.arch import moe
from hfprune.workflows.conformance import check_model_type
from hfprune.arch.discovery import discover_spec
from hfprune.arch.tiny import tiny_config
from hfprune.arch import ARCHITECTURES, get_spec
from hfprune.solvers.masks import check_nm, prune_count

from conftest import replay_blocks

transformers.logging.set_verbosity_error()

# A dozen types the hand-written table does not know: dense decoders of several layouts, three MoE
# layouts (Qwen3-MoE: fused gate_up; gpt-oss: transposed, with biases and its own gating; DeepSeek-V3:
# dense first block, shared experts, MLA), an image-text wrapper (Gemma-3) and a BERT-style decoder.
SUBSET = ["olmo2", "granite", "starcoder2", "bloom", "gpt_neo", "falcon", "qwen3_moe", "gpt_oss", "deepseek_v3",
          "mixtral", "gemma3", "bert"]


@pytest.mark.parametrize("model_type", SUBSET)
def test_conformance_subset(model_type):
    assert model_type not in ARCHITECTURES
    result = check_model_type(model_type)
    assert result["status"] == "pass", {k: {kk: vv for kk, vv in v.items() if kk != "traceback"}
                                        for k, v in result.get("runs", {}).items()} or result
    for run in result["runs"].values():
        assert run["checked"] > 0 and run["n_off_target"] == 0 and run["reload_equal"]
        if model_type in ("qwen3_moe", "gpt_oss", "deepseek_v3", "mixtral"):
            assert run["expert_matrices"] >= 16  # every expert's slices are checked


def _tiny(model_type, seed=0, **overrides):
    torch.manual_seed(seed)
    return transformers.AutoModelForCausalLM.from_config(tiny_config(model_type, **overrides)).eval()


def _experts_modules(model):
    return [(n, m) for n, m in model.named_modules() if moe.is_fused_experts(m)]


@pytest.mark.parametrize("model_type", ["qwen3_moe", "mixtral", "gpt_oss"])
@pytest.mark.parametrize("method,kwargs", [("wanda", {"sparsity": 0.5}), ("wanda", {"pattern": "2:4"}),
                                           ("sparsegpt", {"sparsity": 0.5}),
                                           ("sparsegpt", {"pattern": "2:4", "block_size": 16})])
def test_per_expert_sparsity_exact(model_type, method, kwargs):
    model = _tiny(model_type)
    ids = torch.randint(3, 300, (4, 32))
    config = hfprune.PruningConfig.from_dict({"method": method, **kwargs})
    report = hfprune.prune(model, config=config, calibration=ids, progress=False)
    mods = _experts_modules(model)
    assert len(mods) == 2
    for _, module in mods:
        fused = moe.FusedExperts(module)
        assert fused.transposed("down_proj") == (model_type == "gpt_oss")
        for pname in fused.params:
            for e in range(fused.num_experts):
                W = fused.matrix(pname, e)  # [out, in] view of expert e
                if config.pattern == "2:4":
                    assert check_nm(W, 2, 4)
                else:
                    assert int((W == 0).sum()) == prune_count(W.numel(), config.sparsity)
    # routers stay dense; the report lists tokens per expert
    for name, p in model.named_parameters():
        if "router" in name or name.endswith("mlp.gate.weight"):
            assert (p != 0).all(), name
    assert report.experts is not None and len(report.experts["tokens"]) == 2 * 8 * 2
    assert sum(v for k, v in report.experts["tokens"].items() if k.startswith("model.layers.0.") and
               k.endswith(("gate_up_proj",))) == 4 * 32 * 2  # every token is routed to top-2 experts


def _layer0_experts_error(model_type, method):
    """Output error of layer 0's experts (on the routed calibration inputs) after pruning only experts."""
    model = _tiny(model_type, seed=1)
    # Random models have nearly isotropic features; give the experts' inputs per-feature scales (as
    # trained LLMs have), which is what activation-aware methods exploit.
    g = torch.Generator().manual_seed(0)
    for block in model.model.layers:
        block.post_attention_layernorm.weight.data = torch.exp(torch.randn(64, generator=g))
    ids = torch.randint(3, 300, (8, 32), generator=g)
    (_, experts), = [x for x in _experts_modules(model) if x[0].startswith("model.layers.0.")]
    seen = []
    handle = experts.register_forward_pre_hook(lambda m, a: seen.append(tuple(t.clone() for t in a)))
    with torch.no_grad():
        model(ids)
    handle.remove()
    with torch.no_grad():
        dense = [experts(*a) for a in seen]
    config = hfprune.PruningConfig.from_dict({"method": method, "sparsity": 0.5, "targets": [r".*experts.*"]})
    hfprune.prune(model, config=config, calibration=ids, progress=False)
    with torch.no_grad():
        return sum(float((experts(*a) - d).pow(2).sum()) for a, d in zip(seen, dense))


@pytest.mark.parametrize("model_type", ["qwen3_moe", "mixtral", "gpt_oss"])
def test_activation_aware_experts_beat_magnitude(model_type):
    errors = {m: _layer0_experts_error(model_type, m) for m in ("magnitude", "wanda", "sparsegpt")}
    assert errors["wanda"] < errors["magnitude"], errors
    assert errors["sparsegpt"] < errors["magnitude"], errors


def test_expert_calibration_all_tokens():
    model = _tiny("qwen3_moe")
    ids = torch.randint(3, 300, (2, 16))
    report = hfprune.prune(model, config=hfprune.WandaConfig(sparsity=0.5, expert_calibration="all"),
                           calibration=ids, progress=False)
    assert set(report.experts["tokens"].values()) == {2 * 16}
    assert report.experts["calibration"] == "all"
    with pytest.raises(ValueError, match="expert_calibration"):
        hfprune.WandaConfig(expert_calibration="some")


def test_experts_with_few_tokens_are_flagged():
    model = _tiny("qwen3_moe")
    report = hfprune.prune(model, config=hfprune.WandaConfig(sparsity=0.5, min_expert_tokens=10**6),
                           calibration=torch.randint(3, 300, (1, 8)), progress=False)
    assert report.experts["few_tokens"] == list(report.experts["tokens"])


def test_linearized_loop_matches_the_module_forward():
    """The per-expert loop the engine runs during calibration reproduces each experts module."""
    for model_type in ("qwen3_moe", "gpt_oss", "mixtral"):
        model = _tiny(model_type)
        ids = torch.randint(3, 300, (2, 16))
        with torch.no_grad():
            ref = model(ids).logits
            spec = get_spec(model)
            with moe.linearized(model.model.layers, spec.experts, check=False):
                got = model(ids).logits
        assert torch.allclose(got, ref, atol=1e-5), model_type


def test_image_text_model_prunes_the_language_model_only(tmp_path):
    model = _tiny("gemma3")
    vision_before = {n: p.clone() for n, p in model.named_parameters() if "vision" in n or "projector" in n}
    assert vision_before
    spec = get_spec(model)
    assert spec.layers == "model.language_model.layers"
    ids = torch.randint(3, 300, (2, 16))
    report = hfprune.prune(model, config=hfprune.WandaConfig(pattern="2:4"), calibration=ids, progress=False)
    assert report.layers and all(n.startswith("model.language_model.layers.") for n in report.layers)
    for n, p in model.named_parameters():
        if n in vision_before:
            assert torch.equal(p, vision_before[n]), n
    model.save_pretrained(tmp_path)
    reloaded = transformers.AutoModelForCausalLM.from_pretrained(tmp_path).eval()
    assert type(reloaded) is type(model)
    with torch.no_grad():
        assert torch.equal(reloaded(ids).logits, model(ids).logits)


def test_vision_tower_can_be_targeted_by_name():
    from hfprune.arch import ArchSpec

    model = _tiny("gemma3")
    model.config.model_type = "gemma3_vision_test"
    path = "model.vision_tower.encoder.layers"
    hfprune.register_architecture("gemma3_vision_test", ArchSpec(layers=path))
    try:
        report = hfprune.prune(model, config=hfprune.MagnitudeConfig(sparsity=0.5), progress=False)
    finally:
        ARCHITECTURES.pop("gemma3_vision_test")
    assert report.layers and all(n.startswith(path) for n in report.layers)
    assert report.sparsity == pytest.approx(0.5)


def test_undiscoverable_layout_names_the_candidates():
    class Net(nn.Module):
        def __init__(self):
            super().__init__()
            self.config = transformers.PretrainedConfig(num_hidden_layers=3)
            self.config.model_type = "mystery"
            self.a = nn.ModuleList([nn.Linear(4, 4) for _ in range(2)])
            self.b = nn.ModuleList([nn.Sequential(nn.Linear(4, 4)) for _ in range(2)])

    with pytest.raises(ValueError, match=r"register_architecture\('mystery', ArchSpec\(layers="):
        discover_spec(Net())
    # two candidate stacks of the configured depth: the error lists both paths
    net = Net()
    net.a = nn.ModuleList([nn.Sequential(nn.Linear(4, 4)) for _ in range(3)])
    net.b = nn.ModuleList([nn.Sequential(nn.Linear(4, 4)) for _ in range(3)])
    with pytest.raises(ValueError, match=r"candidate module lists: a \(3 x Sequential\), b \(3 x Sequential\)"):
        discover_spec(net)
    assert discover_spec(net, layers="b").layers == "b"


def test_discovered_roles_and_sizes():
    spec = get_spec(_tiny("olmo2"))
    assert spec.discovered and spec.layers == "model.layers"
    assert (spec.q, spec.k, spec.v, spec.o) == ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj",
                                                "self_attn.o_proj")
    assert (spec.gate, spec.up, spec.down) == ("mlp.gate_proj", "mlp.up_proj", "mlp.down_proj")
    assert spec.heads_attr == "num_attention_heads" and spec.kv_heads_attr == "num_key_value_heads"
    moe_spec = get_spec(_tiny("deepseek_v3"))
    assert moe_spec.experts == ("mlp.experts",)  # found in block 1 (block 0 is dense)


@pytest.mark.parametrize("model_type", ["qwen3_moe", "mixtral", "gpt_oss"])
def test_expert_pruning_8_to_6_reloads(model_type, tmp_path):
    from hfprune.structured.experts import ExpertPruningConfig, expert_importance

    model = _tiny(model_type)
    ids = torch.randint(3, 300, (4, 32))
    scores = expert_importance(model, ids)
    report = hfprune.prune(model, config=ExpertPruningConfig(num_experts=6), calibration=ids, progress=False)
    assert report.structured["experts_before"] == 8 and report.structured["experts_after"] == 6
    for key, layer in report.structured["layers"].items():
        top = torch.argsort(scores[key]["score"], descending=True, stable=True)[:6]
        assert layer["kept"] == sorted(top.tolist())  # the six most important experts by REAP score
    for _, module in _experts_modules(model):
        assert all(p.shape[0] == 6 for p in moe.FusedExperts(module).params.values())
    assert report.model_sparsity > 0
    with torch.no_grad():
        logits = model(ids).logits
    assert torch.isfinite(logits).all()
    model.save_pretrained(tmp_path)
    reloaded = transformers.AutoModelForCausalLM.from_pretrained(tmp_path).eval()
    assert moe.FusedExperts(_experts_modules(reloaded)[0][1]).num_experts == 6
    with torch.no_grad():
        assert torch.equal(reloaded(ids).logits, logits)


def test_expert_pruning_config_errors():
    from hfprune.structured.experts import ExpertPruningConfig

    with pytest.raises(ValueError, match="exactly one"):
        ExpertPruningConfig()
    cfg = ExpertPruningConfig(ratio=0.25, importance="frequency")
    assert ExpertPruningConfig.from_dict(cfg.to_dict()) == cfg
    with pytest.raises(ValueError, match=r"Unknown key\(s\) \['typo'\].*allowed keys: \['experts_ratio', 'importance', 'keep_experts'\]"):
        ExpertPruningConfig.from_dict({**cfg.to_dict(), "typo": 1})
    model = _tiny("qwen3_moe")
    with pytest.raises(ValueError, match="num_experts_per_tok"):
        hfprune.prune(model, config=ExpertPruningConfig(num_experts=1), calibration=torch.randint(3, 300, (1, 8)))
    with pytest.raises(ValueError, match="no fused MoE experts"):
        hfprune.prune(_tiny("olmo2"), config=ExpertPruningConfig(num_experts=1), calibration=torch.randint(3, 300, (1, 8)))


def _bert_like(cls_name="BertForMaskedLM"):
    cfg = transformers.BertConfig(vocab_size=320, hidden_size=64, num_hidden_layers=2, num_attention_heads=4,
                                  intermediate_size=128, max_position_embeddings=64)
    torch.manual_seed(0)
    return getattr(transformers, cls_name)(cfg).eval()


def test_encoder_with_input_dict_calibration(tmp_path):
    model = _bert_like("BertForSequenceClassification")
    batches = [{"input_ids": torch.randint(3, 300, (2, 16)), "attention_mask": torch.ones(2, 16, dtype=torch.long)}
               for _ in range(3)]
    report = hfprune.prune(model, config=hfprune.SparseGPTConfig(pattern="2:4"), calibration=batches, progress=False)
    assert get_spec(model).layers == "bert.encoder.layer"
    assert len(report.layers) == 2 * 6 and all(check_nm(model.get_submodule(n).weight, 2, 4) for n in report.layers)
    model.save_pretrained(tmp_path)
    again = transformers.AutoModelForSequenceClassification.from_pretrained(tmp_path).eval()
    with torch.no_grad():
        assert torch.equal(again(**batches[0]).logits, model(**batches[0]).logits)


def test_vision_encoder_with_a_data_loader():
    cfg = transformers.ViTConfig(image_size=32, patch_size=8, hidden_size=64, num_hidden_layers=2, num_attention_heads=4,
                                 intermediate_size=128, num_labels=3)
    torch.manual_seed(0)
    model = transformers.ViTForImageClassification(cfg).eval()
    images = torch.utils.data.TensorDataset(torch.randn(6, 3, 32, 32))
    loader = torch.utils.data.DataLoader(images, batch_size=2, collate_fn=lambda rows: {
        "pixel_values": torch.stack([r[0] for r in rows])})
    report = hfprune.prune(model, config=hfprune.WandaConfig(sparsity=0.5), calibration=loader, progress=False)
    assert get_spec(model).layers == "vit.layers"
    assert report.sparsity == pytest.approx(0.5) and len(report.layers) == 2 * 6
    with torch.no_grad():
        assert torch.isfinite(model(pixel_values=torch.randn(1, 3, 32, 32)).logits).all()


def test_encoder_decoder_prunes_both_stacks_in_turn(tmp_path):
    cfg = transformers.T5Config(vocab_size=320, d_model=64, d_kv=16, d_ff=128, num_layers=2, num_heads=4,
                                decoder_start_token_id=0)
    torch.manual_seed(0)
    model = transformers.T5ForConditionalGeneration(cfg).eval()
    spec = get_spec(model)
    assert (spec.layers, spec.stacks) == ("encoder.block", ("decoder.block",))
    ids = torch.randint(3, 300, (4, 16))
    report = hfprune.prune(model, config=hfprune.WandaConfig(sparsity=0.5), calibration=ids, progress=False)
    names = list(report.layers)
    assert any(n.startswith("encoder.block.") for n in names) and any(n.startswith("decoder.block.") for n in names)
    assert any(".EncDecAttention." in n for n in names)  # cross-attention is calibrated on the encoder output
    assert all(v["sparsity"] == pytest.approx(0.5) and "statistics" not in v for v in report.layers.values())
    assert report.sparsity == pytest.approx(0.5)
    _assert_seq2seq_reload(model, ids, tmp_path)


def _assert_seq2seq_reload(model, ids, folder):
    """The saved encoder-decoder reloads with stock transformers and gives the same logits."""
    model.save_pretrained(folder)
    again = transformers.AutoModelForSeq2SeqLM.from_pretrained(folder).eval()
    with torch.no_grad():
        assert torch.equal(again(input_ids=ids, decoder_input_ids=ids).logits,
                           model(input_ids=ids, decoder_input_ids=ids).logits)


def test_capture_keeps_state_blocks_pass_on():
    """T5 blocks pass their relative position bias on: the captured inputs of block 1 must carry it."""
    cfg = transformers.T5Config(vocab_size=320, d_model=64, d_kv=16, d_ff=128, num_layers=2, num_heads=4)
    torch.manual_seed(0)
    model = transformers.T5EncoderModel(cfg).eval()
    ids = torch.randint(3, 300, (1, 12))
    hidden = replay_blocks(model, ids)
    with torch.no_grad():
        ref = model.encoder.final_layer_norm(hidden)
        assert torch.allclose(ref, model(ids).last_hidden_state, atol=1e-5)


@pytest.mark.parametrize("model_type", ["granite", "starcoder2", "cohere", "glm4", "falcon"])
def test_structured_heads_and_mlp_on_discovered_decoders(model_type, tmp_path):
    from hfprune.structured import AutoPrunedModelForCausalLM, StructuredConfig

    model = _tiny(model_type)
    ids = torch.randint(3, 300, (2, 16))
    before = sum(p.numel() for p in model.parameters())
    report = hfprune.prune(model, config=StructuredConfig(heads_ratio=0.5, mlp_ratio=0.5, importance="magnitude"),
                           progress=False)
    assert sum(p.numel() for p in model.parameters()) < before
    with torch.no_grad():
        logits = model(ids).logits
    assert torch.isfinite(logits).all()
    model.save_pretrained(tmp_path)
    loader = transformers.AutoModelForCausalLM if report.structured["reload_with"] == "transformers" \
        else AutoPrunedModelForCausalLM
    again = loader.from_pretrained(tmp_path).eval()
    with torch.no_grad():
        assert torch.equal(again(ids).logits, logits)


def test_structured_refuses_layouts_it_cannot_shrink():
    from hfprune.structured import StructuredConfig

    model = _tiny("olmo2")  # q_norm / k_norm span all heads
    with pytest.raises(ValueError, match=r"q_norm\.weight \(64,\) .* heads_ratio=0"):
        hfprune.prune(model, config=StructuredConfig(heads_ratio=0.5, importance="magnitude"), progress=False)
    report = hfprune.prune(model, config=StructuredConfig(mlp_ratio=0.5, importance="magnitude"),
                           progress=False)  # MLP neurons are fine
    assert report.structured["params_after"] < report.structured["params_before"]
    with pytest.raises(ValueError, match="down projection|mlp_ratio=0"):
        hfprune.prune(_tiny("qwen3_moe"), config=StructuredConfig(mlp_ratio=0.5, importance="magnitude"), progress=False)


class _ExpertMLP(nn.Module):
    def __init__(self, hidden, inter):
        super().__init__()
        self.w1, self.w3, self.w2 = nn.Linear(hidden, inter, bias=False), nn.Linear(hidden, inter, bias=False), \
            nn.Linear(inter, hidden, bias=False)

    def forward(self, x):
        return self.w2(nn.functional.silu(self.w1(x)) * self.w3(x))


class _ExpertList(nn.ModuleList):
    """The per-expert nn.Linear layout of older transformers MoE models (Mixtral v4): only routed tokens
    reach an expert."""

    def forward(self, hidden, top_k_index, top_k_weights):
        out = torch.zeros_like(hidden)
        for e, expert in enumerate(self):
            token_idx, k_pos = torch.where(top_k_index == e)
            if token_idx.numel():
                out.index_add_(0, token_idx, expert(hidden[token_idx]) * top_k_weights[token_idx, k_pos, None])
        return out


def test_per_expert_linear_lists():
    model = _tiny("mixtral")
    for block in model.model.layers:
        block.mlp.experts = _ExpertList([_ExpertMLP(64, 32) for _ in range(8)])
    for block in model.model.layers:  # the router never picks expert 7
        def route(h, gate=block.mlp.gate):
            logits = nn.functional.linear(h.reshape(-1, gate.hidden_dim), gate.weight)
            logits[:, 7] = float("-inf")
            top, idx = torch.topk(torch.softmax(logits.float(), dim=-1), gate.top_k, dim=-1)
            return logits, (top / top.sum(dim=-1, keepdim=True)).to(h.dtype), idx
        block.mlp.gate.forward = route
    spec = get_spec(model)
    assert spec.experts == ("mlp.experts",)
    report = hfprune.prune(model, config=hfprune.WandaConfig(sparsity=0.5), calibration=torch.randint(3, 300, (4, 32)),
                           progress=False)
    names = [n for n in report.layers if ".experts." in n]
    assert len(names) == 2 * 8 * 3
    for n in names:
        W = model.get_submodule(n).weight
        assert int((W == 0).sum()) == prune_count(W.numel(), 0.5), n
    tokens = report.experts["tokens"]
    assert tokens["model.layers.0.mlp.experts.7.w1"] == 0
    assert report.layers["model.layers.0.mlp.experts.7.w1"]["statistics"] == "none (magnitude)"
    assert sum(v for k, v in tokens.items() if k.startswith("model.layers.0.") and k.endswith(".w1")) == 4 * 32 * 2


# --- encoder-decoders laid out as model.encoder.layers / model.decoder.layers (issue 28, item 10) ----------------

_SEQ2SEQ = dict(vocab_size=320, d_model=64, encoder_layers=2, decoder_layers=2, encoder_attention_heads=4,
                decoder_attention_heads=4, encoder_ffn_dim=128, decoder_ffn_dim=128, pad_token_id=0, bos_token_id=1,
                eos_token_id=2, decoder_start_token_id=1)


def _seq2seq(model_type):
    extra = dict(max_target_positions=64, max_source_positions=16, num_mel_bins=8) if model_type == "whisper" \
        else dict(max_position_embeddings=64)
    config = transformers.AutoConfig.for_model(model_type, **_SEQ2SEQ, **extra)
    auto = transformers.AutoModelForSpeechSeq2Seq if model_type == "whisper" else transformers.AutoModelForSeq2SeqLM
    torch.manual_seed(0)
    return auto.from_config(config).eval()


def _block_linears(model, spec):
    return {f"{stack}.{i}.{n}" for stack in (spec.layers, *spec.stacks)
            for i, block in enumerate(model.get_submodule(stack)) for n, m in block.named_modules()
            if isinstance(m, nn.Linear)}


@pytest.mark.parametrize("model_type", ["bart", "mbart", "pegasus", "marian", "blenderbot"])
def test_encoder_decoder_layouts_prune_both_stacks(model_type, tmp_path):
    model = _seq2seq(model_type)
    spec = get_spec(model)
    assert (spec.layers, spec.stacks) == ("model.encoder.layers", ("model.decoder.layers",))
    encoder, decoder = model.get_encoder(), model.get_decoder()
    seen = []  # the encoder's sparsity each time a decoder cross-attention projection reads its output

    def record(module, args):
        seen.append(float((encoder.layers[0].fc1.weight == 0).float().mean()))

    cross = decoder.layers[0].encoder_attn.k_proj
    handle = cross.register_forward_pre_hook(record)
    ids = torch.randint(3, 300, (4, 16))
    report = hfprune.prune(model, config=hfprune.WandaConfig(sparsity=0.5), calibration=ids, progress=False)
    handle.remove()
    # every linear layer of every encoder and decoder block is pruned (nothing left dense without a word)
    assert set(report.layers) == _block_linears(model, spec)
    assert all(v["sparsity"] == pytest.approx(0.5) for v in report.layers.values())
    assert (encoder.layers[1].self_attn.q_proj.weight == 0).float().mean() == pytest.approx(0.5)
    # the encoder ran first: the decoder's cross-attention was calibrated on the pruned encoder's outputs
    assert seen and all(s == pytest.approx(0.5) for s in seen)
    _assert_seq2seq_reload(model, ids, tmp_path)


def test_whisper_prunes_both_stacks_from_audio_inputs_and_refuses_token_ids():
    model = _seq2seq("whisper")
    before = {n: p.clone() for n, p in model.named_parameters()}
    with pytest.raises(ValueError, match="reads 'input_features', not token ids"):
        hfprune.prune(model, config=hfprune.WandaConfig(sparsity=0.5), calibration=torch.randint(3, 300, (2, 16)),
                      progress=False)
    assert all(torch.equal(p, before[n]) for n, p in model.named_parameters())  # refused before any work
    batches = [{"input_features": torch.randn(2, 8, 32), "decoder_input_ids": torch.randint(3, 300, (2, 8))}
               for _ in range(2)]
    report = hfprune.prune(model, config=hfprune.WandaConfig(sparsity=0.5), calibration=batches, progress=False)
    assert set(report.layers) == _block_linears(model, get_spec(model)) and report.sparsity == pytest.approx(0.5)


def test_one_stack_methods_refuse_encoder_decoders_before_work():
    from hfprune.methods.structured import StructuredConfig
    from hfprune.structured.depth import DepthPruningConfig

    model = _seq2seq("bart")
    before = {n: p.clone() for n, p in model.named_parameters()}
    for config in (StructuredConfig(heads_ratio=0.5, importance="magnitude"), DepthPruningConfig(num_blocks=1)):
        with pytest.raises(ValueError, match="one block stack.*model.encoder.layers and model.decoder.layers"):
            hfprune.prune(model, config=config, calibration=torch.randint(3, 300, (2, 16)), progress=False)
    assert all(torch.equal(p, before[n]) for n, p in model.named_parameters())


def test_convolutional_models_are_refused_before_work():
    config = transformers.ConvNextConfig(depths=[1, 1], hidden_sizes=[16, 32], num_stages=2, num_labels=3)
    torch.manual_seed(0)
    model = transformers.ConvNextForImageClassification(config).eval()
    images = [{"pixel_values": torch.randn(2, 3, 32, 32)}]
    with pytest.raises(ValueError, match=r"'convnext'\) is a convolutional network .*Conv2d.*not convolutions"):
        hfprune.prune(model, config=hfprune.WandaConfig(sparsity=0.5), calibration=images, progress=False)
