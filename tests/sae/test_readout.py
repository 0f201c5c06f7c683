from __future__ import annotations

import pytest
import torch

from sae.lm import load_tokenizer
from sae.readout import ReadoutError, label_token_ids, option_probs


@pytest.fixture(scope="module")
def tok():
    return load_tokenizer("embedded")


def test_label_readout_sums_spellings_and_rejects_ambiguous_labels(tok) -> None:
    ids = label_token_ids(tok, ("No", "Yes"))
    assert tok.encode(" Yes", add_special_tokens=False)[0] in ids[1]
    assert len(label_token_ids(tok, ("A", "B"))[0]) == 2  # "A" and " A", not the article " a"
    logits = torch.full((1, len(tok)), -30.0)
    logits[0, ids[1][0]] = 5.0
    logits[0, ids[0][0]] = 5.0 + torch.tensor(3.0).log()  # "No" 3x as likely as "Yes"
    probs, coverage = option_probs(logits, ids)
    torch.testing.assert_close(probs, torch.tensor([[0.75, 0.25]]))
    assert coverage.item() > 0.99
    with pytest.raises(ReadoutError, match="start with the same token"):
        label_token_ids(tok, ("mostly-true", "mostly-false"))
