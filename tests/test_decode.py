"""The core identity of the runtime: prefill + CLP decode steps == the full forward."""

import pytest
import torch

from pltkit import PLTConfig, PLTForCausalLM

TOL = 1e-5
STEPS = 4


def tiny_model(loops, window, gate_hidden, seed=0, **kw):
    cfg = PLTConfig(vocab_size=61, hidden_size=32, intermediate_size=40, num_hidden_layers=2,
                    num_attention_heads=4, num_key_value_heads=2, head_dim=8, rope_theta=10000.0,
                    max_position_embeddings=256, eos_token_id=[2], plt_num_loops=loops,
                    plt_window_size=[window, 0], plt_gate_use_hidden_states=gate_hidden,
                    plt_emb_scale=0.707, plt_hidden_scale=0.5, **kw)
    torch.manual_seed(seed)
    model = PLTForCausalLM(cfg)
    with torch.no_grad():
        for p in model.parameters():
            p.normal_(0, 0.3)
    return model.eval()


def incremental(model, ids, prompt_len):
    """Logits for every position from prefill(prompt) then one decode step per token."""
    with torch.no_grad():
        logits, state = model.prefill(ids[:, :prompt_len])
        out = [logits]
        for t in range(prompt_len, ids.shape[1]):
            step, state = model.decode(ids[:, t], state)
            out.append(step[:, None])
    return torch.cat(out, 1), state


@pytest.mark.parametrize("gate_hidden", [True, False])
@pytest.mark.parametrize("window", [1, 3, 64])
@pytest.mark.parametrize("loops", [1, 2, 3, 4])
def test_decode_matches_full_forward(loops, window, gate_hidden):
    model = tiny_model(loops, window, gate_hidden)
    worst = 0.0
    for prompt_len in (1, 2, 5, window + 3):
        ids = torch.randint(0, 61, (2, prompt_len + STEPS), generator=torch.Generator().manual_seed(prompt_len))
        with torch.no_grad():
            full = model(ids)
        inc, state = incremental(model, ids, prompt_len)
        diff = (full - inc).abs().max().item()
        worst = max(worst, diff)
        assert diff < TOL, f"prompt {prompt_len}: max|diff| {diff:.2e}"
        assert state.pos == ids.shape[1]
        # extra loops keep a ring of `left` K/V, loop 0 the whole context
        assert state.layers[0].k.shape[2] == ids.shape[1]
        assert all(r.shape[2] == min(window, ids.shape[1]) for r in state.layers[0].ring_k)
    print(f"L={loops} window={window} hidden_gate={gate_hidden}: max|decode - full| = {worst:.2e}")


@pytest.mark.parametrize("loops", [1, 2, 3])
def test_chunked_prefill_matches_full_forward(loops):
    model = tiny_model(loops, 3, True)
    ids = torch.randint(0, 61, (2, 17), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        full = model(ids)
        state, chunks = None, []
        for a, b in ((0, 5), (5, 6), (6, 13), (13, 17)):
            logits, state = model.prefill(ids[:, a:b], state)
            chunks.append(logits)
    diff = (full - torch.cat(chunks, 1)).abs().max().item()
    print(f"L={loops}: max|chunked - full| = {diff:.2e}")
    assert diff < TOL


def test_restored_state_continues_exactly():
    """A cloned state (a cached prefix) continues like the original; it is not aliased."""
    model = tiny_model(2, 3, True)
    ids = torch.randint(0, 61, (1, 12), generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        full = model(ids)
        _, state = model.prefill(ids[:, :6])
        saved = state.clone()
        model.prefill(ids[:, 6:9], state)  # advance the original: must not touch the copy
        logits, _ = model.prefill(ids[:, 6:], saved)
    diff = (full[:, 6:] - logits).abs().max().item()
    print(f"max|restored - full| = {diff:.2e}")
    assert diff < TOL


def test_unshifted_decode_does_not_match():
    """Decoding with the shift disabled is a different model: the identity test can fail."""
    model = tiny_model(2, 3, True)
    ids = torch.randint(0, 61, (2, 9), generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        full = model(ids)
        _, state = model.prefill(ids[:, :5])
        unshifted = PLTForCausalLM(model.config.replace(plt_clp_shift=False))
        unshifted.load_state_dict(model.state_dict())
        logits, _ = unshifted.decode(ids[:, 5], state)
    diff = (full[:, 5] - logits).abs().max().item()
    print(f"unshifted decode vs shifted forward: max|diff| = {diff:.2e}")
    assert diff > 1e-2


def test_unshifted_variant_is_self_consistent():
    """plt_clp_shift=false runs loops serially per token and still matches its own forward."""
    model = tiny_model(3, 3, False, plt_clp_shift=False)
    ids = torch.randint(0, 61, (2, 9), generator=torch.Generator().manual_seed(4))
    with torch.no_grad():
        full = model(ids)
    inc, _ = incremental(model, ids, 4)
    diff = (full - inc).abs().max().item()
    print(f"unshifted: max|decode - full| = {diff:.2e}")
    assert diff < TOL


def test_reset_carry_is_detected():
    """A cache hit that restores KV but zeroes the carries gives different logits."""
    model = tiny_model(2, 3, True)
    ids = torch.randint(0, 61, (1, 8), generator=torch.Generator().manual_seed(5))
    with torch.no_grad():
        full = model(ids)
        _, state = model.prefill(ids[:, :6])
        state.carry.zero_()
        logits, _ = model.decode(ids[:, 6], state)
    diff = (full[:, 6] - logits).abs().max().item()
    print(f"zeroed carry: max|diff| = {diff:.2e}")
    assert diff > 1e-2


def test_context_limit_is_an_error():
    model = tiny_model(2, 3, True)
    with pytest.raises(ValueError, match="max_position_embeddings"):
        model(torch.zeros(1, 257, dtype=torch.long))
