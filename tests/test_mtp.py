"""Multi-Token Prediction: loading, the embedding-first concat, and agreement with transformers' MtpModel."""

import sys

import torch

import nanoseek
from nanoseek.config import ModelConfig
from nanoseek.model.transformer import Transformer
import procs
from tiny import randomize_


def _v3_with_mtp(tmp_path, hf_checkpoint):
    """A V3 checkpoint that holds MTP tensors (transformers cannot write them; nanoseek can)."""
    directory, _ = hf_checkpoint("deepseek_v3")
    config = ModelConfig.from_pretrained(directory).replace(num_nextn_predict_layers=1)
    model = Transformer(config)
    randomize_(model, seed=5)
    return nanoseek.save_model(model, tmp_path / "mtp"), model


def test_mtp_layers_are_saved_as_extra_layers_and_reload(tmp_path, hf_checkpoint):
    from safetensors import safe_open

    out, model = _v3_with_mtp(tmp_path, hf_checkpoint)
    L = model.config.num_hidden_layers
    keys = set(safe_open(str(out / "model.safetensors"), "pt").keys())
    for suffix in ("enorm.weight", "hnorm.weight", "eh_proj.weight", "shared_head.norm.weight",
                   "shared_head.head.weight", "embed_tokens.weight", "self_attn.kv_b_proj.weight",
                   "mlp.experts.0.gate_proj.weight", "mlp.gate.e_score_correction_bias"):
        assert f"model.layers.{L}.{suffix}" in keys
    reloaded = nanoseek.load_model(out)
    assert len(reloaded.mtp) == 1 and reloaded.mtp_note is None
    for (n1, p1), (n2, p2) in zip(model.state_dict().items(), reloaded.state_dict().items()):
        assert n1 == n2 and torch.equal(p1, p2), n1


@torch.no_grad()
def test_mtp_matches_transformers_mtp_model(tmp_path, hf_checkpoint):
    import transformers
    from transformers.modeling_layers import MtpModel

    out, _ = _v3_with_mtp(tmp_path, hf_checkpoint)
    ours = nanoseek.load_model(out)
    main = transformers.AutoModelForCausalLM.from_pretrained(out, dtype=torch.float32).eval()
    reference = MtpModel(main, 1).eval()
    # Copy our MTP weights into transformers' module, which names them layers.0.{enorm,...,mtp_block,post_norm}.
    mtp = ours.mtp[0]
    ref_layer = reference.layers[0]
    ref_layer.enorm.weight.copy_(mtp.enorm.weight)
    ref_layer.hnorm.weight.copy_(mtp.hnorm.weight)
    ref_layer.eh_proj.weight.copy_(mtp.eh_proj.weight)
    ref_layer.post_norm.weight.copy_(mtp.shared_head_norm.weight)
    missing, unexpected = ref_layer.mtp_block.load_state_dict(mtp.block.state_dict(), strict=False)
    assert not unexpected and not missing

    ids = torch.randint(2, ours.config.vocab_size, (2, 13), generator=torch.Generator().manual_seed(0))
    hidden = ours.hidden_states(ids)  # final (normed) hidden states, what vLLM and transformers feed MTP
    assert (hidden - main.model(ids).last_hidden_state).abs().max() < 1e-4
    ours_logits = ours.mtp_logits(hidden, ids)[0]  # row i predicts token i+2
    T = ids.shape[1]
    positions = torch.arange(1, T).expand(2, T - 1)
    ref_hidden = reference.forward_layer(0, hidden[:, : T - 1], positions, None, input_ids=ids[:, 1:])
    ref_logits = main.lm_head(ref_hidden)
    assert (ours_logits - ref_logits).abs().max().item() < 1e-4


@torch.no_grad()
def test_mtp_concat_puts_the_embedding_half_first():
    """Hand-built case: eh_proj = [identity | 0] reads only the embedding half, so the MTP output must ignore
    the hidden state and change with the next token. Swapping the halves would invert both properties."""
    config = ModelConfig(model_type="deepseek_v3", vocab_size=32, hidden_size=16, intermediate_size=32,
                         num_hidden_layers=1, num_attention_heads=2, kv_lora_rank=8, qk_nope_head_dim=4,
                         qk_rope_head_dim=4, v_head_dim=4, num_nextn_predict_layers=1)
    model = Transformer(config)
    randomize_(model)
    H = config.hidden_size
    model.mtp[0].eh_proj.weight.copy_(torch.cat((torch.eye(H), torch.zeros(H, H)), dim=1))
    ids = torch.tensor([[3, 5, 7, 9]])
    h1 = torch.randn(1, 4, H)
    h2 = torch.randn(1, 4, H)
    a = model.mtp_logits(h1, ids)[0]
    b = model.mtp_logits(h2, ids)[0]
    assert torch.allclose(a, b)
    c = model.mtp_logits(h1, torch.tensor([[3, 6, 8, 10]]))[0]
    assert not torch.allclose(a, c)
    # And by hand: with the hidden half zeroed the block input is exactly enorm(embed(next token)).
    mtp = model.mtp[0]
    x = mtp.enorm(model.model.embed_tokens(ids[:, 1:]))
    expected = model.lm_head(mtp.shared_head_norm(mtp.block(x, model.rotary(torch.arange(3).expand(1, 3)))))
    assert torch.allclose(a, expected, atol=1e-6)


def test_checkpoint_without_mtp_tensors_loads_with_mtp_off_and_inspect_says_so(hf_checkpoint):
    directory, _ = hf_checkpoint("deepseek_v3")
    assert ModelConfig.from_pretrained(directory).num_nextn_predict_layers == 1  # what transformers writes
    model = nanoseek.load_model(directory)
    assert len(model.mtp) == 0 and "no MTP tensors" in model.mtp_note
    r = procs.run([sys.executable, "-m", "nanoseek.cli", "inspect", str(directory)], capture_output=True,
                       text=True, check=True)
    assert "no MTP tensors" in r.stdout and "MTP is off" in r.stdout
