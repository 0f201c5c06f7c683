from __future__ import annotations

import pytest

from pipelines.prompts import (
    PromptError,
    answer_label,
    build_prompt,
    encode_prompts,
    feedback_text,
)
from pipelines.records import PerspectiveRecord
from sae.lm import load_tokenizer


@pytest.fixture(scope="module")
def tok():
    return load_tokenizer("embedded")


def _mislc(feedback: str | None = "The claim misstates a court ruling.", label: int = 1) -> PerspectiveRecord:
    options = ("No", "Yes", "Unsure")
    return PerspectiveRecord("c1", "classify", "The court banned all vaccines.", options, "a-7", label, None, feedback)


def _gqa() -> PerspectiveRecord:
    text = "Question: Do you trust the news?\nOptions: A. Yes B. No C. DK\nAnswer:"
    return PerspectiveRecord("q1", "distribution", text, ("Yes", "No", "DK"), "Kenya", None, (0.2, 0.7, 0.1))


def test_zero_shot_and_feedback_prompts_use_the_chat_template(tok) -> None:
    r = _mislc()
    zero = build_prompt(tok, "mislc", r)
    fb = build_prompt(tok, "mislc", r, "with-feedback")
    assert zero.text.startswith("<|im_start|>") and zero.text.endswith("<|im_start|>assistant\nAnswer:")
    assert "Thinking: The claim misstates a court ruling." in fb.text and "Thinking" not in zero.text
    assert fb.text.index("Claim:") < fb.text.index("Thinking:")  # classification: the rationale follows the question
    assert zero.labels == ("No", "Yes", "Unsure")
    ids = zero.token_ids(tok)
    assert tok.decode(ids[-2:]) == "Answer:" and zero.readout_index(tok) == len(ids) - 1


def test_opinion_prompts_have_a_persona_a_passage_first_and_letters(tok) -> None:
    r = _gqa()
    zero = build_prompt(tok, "globalopinionqa", r)
    fb = build_prompt(tok, "globalopinionqa", r, "with-feedback")
    assert "You are from the country of Kenya." in zero.text
    assert zero.labels == ("A", "B", "C") and "Answer:\n" not in zero.text
    assert 'Passage: Most people in Kenya answered "B. No" (70% of respondents).' in fb.text
    assert fb.text.index("Passage:") < fb.text.index("Question:")


def test_feedback_sources() -> None:
    assert feedback_text("mislc", _mislc()) == ("The claim misstates a court ruling.", "rationale")
    assert feedback_text("mislc", _mislc(), "answer") == ("This claim contains misinformation.", "answer")
    assert feedback_text("mislc", _mislc(None, label=0)) == ("This claim does not contain misinformation.", "answer")
    assert feedback_text("mislc", _mislc(None), "rationale") is None
    crehate = PerspectiveRecord("p:SG", "classify", "some post", ("No", "Yes"), "Singapore", 1)
    assert feedback_text("crehate", crehate)[0] == "People from Singapore consider this post hate speech."  # type: ignore[index]


def test_few_shot_prompts_put_solved_examples_first(tok) -> None:
    shots = [_mislc(label=0), _mislc(label=2)]
    p = build_prompt(tok, "mislc", _mislc(), "few-shot", shots=shots)
    assert p.text.count("Claim:") == 3
    assert "Answer: No<|im_end|>" in p.text and "Answer: Unsure<|im_end|>" in p.text
    assert answer_label("globalopinionqa", _gqa()) == "B"
    with pytest.raises(PromptError, match="needs at least one shot"):
        build_prompt(tok, "mislc", _mislc(), "few-shot")
    with pytest.raises(PromptError, match="no rationale"):
        build_prompt(tok, "mislc", _mislc(None), "with-feedback", feedback_source="rationale")
    with pytest.raises(PromptError, match="condition must be one of"):
        build_prompt(tok, "mislc", _mislc(), "two-shot")  # type: ignore[arg-type]


def test_after_colon_readout_is_the_token_after_the_last_colon(tok) -> None:
    p = build_prompt(tok, "mislc", _mislc(), readout="after_colon")
    ids = p.token_ids(tok)
    assert p.readout_index(tok) == len(ids) - 1  # ":" is the last token, so the rule clamps to it
    q = build_prompt(tok, "mislc", _mislc(), "with-feedback", feedback="Note: fine. Then more text here")
    q = type(q)(q.text + " Yes", q.task, q.condition, q.labels, "after_colon", q.templated)
    ids_q, pos_q = encode_prompts(tok, [q])
    assert tok.decode(ids_q[0][pos_q[0]]) == " Yes"
