from __future__ import annotations

import pytest
import torch

from sae.lm import load_tokenizer
from sae.readout import NO_LABEL, ReadoutError, label_token_ids, option_probs, top1_label


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


def test_top1_readout_maps_the_argmax_token_to_the_label_it_spells(tok) -> None:
    """The reference's readout: the single most likely token, through the labels' spellings; a top-1 token
    that spells no label (here " the", the likeliest by far) is NO_LABEL even where the label mass says Yes."""
    ids = label_token_ids(tok, ("No", "Yes"))
    logits = torch.full((3, len(tok)), -30.0)
    logits[0, ids[1][1]] = 4.0  # the second spelling of Yes
    logits[1, ids[0][0]] = 4.0
    the = tok.encode(" the", add_special_tokens=False)[0]
    logits[2, the] = 9.0
    logits[2, ids[1][0]] = 4.0
    assert top1_label(logits, ids) == [1, 0, NO_LABEL]
    assert option_probs(logits, ids)[0][2].argmax().item() == 1
