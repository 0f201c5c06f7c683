"""Task prompts, shared by every stage that puts a record in front of the model (vectors, evaluate, serve).

:func:`build_prompt` turns ``(record, condition)`` into the model's input with its chat template applied;
the assistant turn is opened with ``"Answer:"``, so the answer starts at the next token. Conditions:

- ``zero-shot``: persona (where the task has one) + the question.
- ``few-shot``: ``k`` solved examples (user question / assistant ``Answer: X`` turns) before the question.
- ``with-feedback``: the question plus the perspective's feedback — ``Thinking: ...`` after the question for
  classification tasks, ``Passage: ...`` before it for opinion questions (DESIGN §1 step 1).

Feedback (:func:`feedback_text`) is the record's own rationale where the data has one (MisLC legal
rationales, crowd-worker justifications) and otherwise a sentence built from the perspective's own answer
(GlobalOpinionQA: the country's most common answer and its share; CREHate: the country's hate/not-hate
label). Each task names what is read out (:attr:`Prompt.labels`: label words or option letters) and
:func:`option_probs` turns next-token logits into a distribution over the options.
"""

from __future__ import annotations

import re
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any, Literal

from pipelines.records import PerspectiveRecord

Condition = Literal["zero-shot", "few-shot", "with-feedback"]
CONDITIONS: tuple[str, ...] = ("zero-shot", "few-shot", "with-feedback")
ReadoutRule = Literal["last", "after_colon"]
READOUT_RULES: tuple[str, ...] = ("last", "after_colon")
FeedbackSource = Literal["auto", "rationale", "answer"]
FEEDBACK_SOURCES: tuple[str, ...] = ("auto", "rationale", "answer")
ANSWER_PREFIX = "Answer:"
LETTERS = "ABCDEFGHIJKLMNOPQRSTUVWXYZ"


class PromptError(ValueError):
    """A prompt cannot be built as asked (unknown task, missing feedback or shots, ambiguous labels)."""


def _letter_block(options: Sequence[str]) -> str:
    return "Options:\n" + "\n".join(f"{LETTERS[i]}. {o}" for i, o in enumerate(options))


def _mislc_answer(r: PerspectiveRecord) -> str:
    return {
        "No": "This claim does not contain misinformation.",
        "Yes": "This claim contains misinformation.",
        "Unsure": "It is unclear whether this claim contains misinformation.",
    }.get(r.answer, f"The answer is {r.answer}.")


def _crehate_answer(r: PerspectiveRecord) -> str:
    verdict = "consider" if r.answer == "Yes" else "do not consider"
    return f"People from {r.perspective} {verdict} this post hate speech."


def _opinion_answer(r: PerspectiveRecord) -> str:
    dist = r.distribution or ()
    i = r.options.index(r.answer)
    share = f" ({100 * dist[i]:.0f}% of respondents)" if dist else ""
    return f'Most people in {r.perspective} answered "{LETTERS[i]}. {r.answer}"{share}.'


def _truth_answer(r: PerspectiveRecord) -> str:
    return f"I think this statement is {r.answer}."


def _generic_answer(r: PerspectiveRecord) -> str:
    return f"The answer is {r.answer}."


def _gqa_question(r: PerspectiveRecord) -> str:
    # The data's text already holds "Question: ...\nOptions: A. ... \nAnswer:"; the answer prefix is ours.
    return re.sub(r"\s*Answer:\s*$", "", r.text.strip())


@dataclass(frozen=True)
class TaskSpec:
    """How one task is asked, what feedback looks like, and what is read out."""

    name: str
    question: Callable[[PerspectiveRecord], str]
    answer_sentence: Callable[[PerspectiveRecord], str]
    persona: str | None = None  # format string with {perspective}; None: the prompt names no perspective
    feedback_tag: str = "Thinking"
    feedback_first: bool = False  # opinions: the passage comes before the question
    letters: bool = False  # read out option letters instead of the option words


TASKS: dict[str, TaskSpec] = {
    "mislc": TaskSpec(
        "mislc",
        lambda r: f"Claim: {r.text}\n\nDoes this claim contain misinformation? Answer Yes, No, or Unsure.",
        _mislc_answer,
    ),
    "crehate": TaskSpec(
        "crehate",
        lambda r: f"Post: {r.text}\n\nIs this post hate speech? Answer Yes or No.",
        _crehate_answer,
        persona="You are from the country of {perspective}.",
    ),
    "globalopinionqa": TaskSpec(
        "globalopinionqa",
        _gqa_question,
        _opinion_answer,
        persona="You are from the country of {perspective}.",
        feedback_tag="Passage",
        feedback_first=True,
        letters=True,
    ),
    "crowd_truthfulness": TaskSpec(
        "crowd_truthfulness",
        lambda r: f"Statement: {r.text}\n\nHow truthful is this statement?\n{_letter_block(r.options)}",
        _truth_answer,
        persona="You describe your political views as {perspective}.",
        letters=True,
    ),
}
GENERIC = TaskSpec(
    "generic",
    lambda r: f"Question: {r.text}\n{_letter_block(r.options)}",
    _generic_answer,
    persona="Answer as someone of this perspective: {perspective}.",
    letters=True,
)


def task_spec(task: str) -> TaskSpec:
    """The spec of a built-in task; any other name (e.g. a JSONL file) gets the generic letter prompt."""
    return TASKS.get(task, GENERIC)


@dataclass(frozen=True)
class Prompt:
    """A complete model input and how to read its answer."""

    text: str
    task: str
    condition: str
    labels: tuple[str, ...]  # what is read out, one per option: label words or option letters
    readout: str = "last"
    templated: bool = True  # the chat template added any special tokens (so the tokenizer must not)

    def token_ids(self, tokenizer: Any) -> list[int]:
        return tokenizer(self.text, add_special_tokens=not self.templated)["input_ids"]

    def readout_index(self, tokenizer: Any) -> int:
        """Index (into :meth:`token_ids`) of the readout token: the last token (``last``), or the token after
        the last ``:`` of the prompt (``after_colon``, the reference rule; the last token if none follows)."""
        ids = self.token_ids(tokenizer)
        if self.readout == "last":
            return len(ids) - 1
        colon = self.text.rfind(":")
        if colon < 0:
            return len(ids) - 1
        enc = tokenizer(self.text, add_special_tokens=not self.templated, return_offsets_mapping=True)
        for i, (start, end) in enumerate(enc["offset_mapping"]):
            if start <= colon < end:
                return min(i + 1, len(ids) - 1)
        return len(ids) - 1


def labels_of(task: str, record: PerspectiveRecord) -> tuple[str, ...]:
    return tuple(LETTERS[: len(record.options)]) if task_spec(task).letters else tuple(record.options)


def answer_label(task: str, record: PerspectiveRecord) -> str:
    """What the record's perspective answers, as read out (its label word or option letter)."""
    return labels_of(task, record)[record.options.index(record.answer)]


def feedback_text(task: str, record: PerspectiveRecord, source: FeedbackSource = "auto") -> tuple[str, str] | None:
    """``(feedback, kind)`` with kind ``rationale`` or ``answer``; ``None`` when ``source="rationale"`` and
    the record has none. ``auto`` prefers the rationale."""
    if source not in FEEDBACK_SOURCES:
        raise PromptError(f"feedback source must be one of {FEEDBACK_SOURCES}, got {source!r}")
    if source in ("auto", "rationale") and record.feedback and record.feedback.strip():
        return record.feedback.strip(), "rationale"
    if source == "rationale":
        return None
    return task_spec(task).answer_sentence(record), "answer"


def _user_message(spec: TaskSpec, record: PerspectiveRecord, feedback: str | None) -> str:
    question = spec.question(record)
    if feedback is None:
        return question
    block = f"{spec.feedback_tag}: {feedback}"
    return f"{block}\n\n{question}" if spec.feedback_first else f"{question}\n\n{block}"


def _render(tokenizer: Any, system: str | None, turns: list[tuple[str, str]], user: str) -> tuple[str, bool]:
    messages: list[dict[str, str]] = []
    for question, answer in turns:
        messages += [{"role": "user", "content": question}, {"role": "assistant", "content": answer}]
    messages += [{"role": "user", "content": user}, {"role": "assistant", "content": ANSWER_PREFIX}]
    if getattr(tokenizer, "chat_template", None) is None:
        head = f"{system}\n\n" if system else ""
        body = "".join(f"{q}\n\n{a}\n\n" for q, a in turns)
        return f"{head}{body}{user}\n\n{ANSWER_PREFIX}", False
    with_system = ([{"role": "system", "content": system}] if system else []) + messages
    try:
        text = tokenizer.apply_chat_template(with_system, tokenize=False, continue_final_message=True)
    except Exception:  # templates that refuse a system role (Gemma): fold the persona into the first turn
        if not system:
            raise
        first = dict(messages[0], content=f"{system}\n\n{messages[0]['content']}")
        text = tokenizer.apply_chat_template([first, *messages[1:]], tokenize=False, continue_final_message=True)
    return text, True


def build_prompt(
    tokenizer: Any,
    task: str,
    record: PerspectiveRecord,
    condition: Condition = "zero-shot",
    *,
    shots: Sequence[PerspectiveRecord] = (),
    feedback: str | None = None,
    feedback_source: FeedbackSource = "auto",
    readout: ReadoutRule = "last",
    persona: bool | str = True,
    context: str | None = None,
) -> Prompt:
    """The prompt for ``record`` under ``condition``.

    ``few-shot`` needs ``shots`` (solved records, usually the same perspective's training records);
    ``with-feedback`` uses ``feedback`` if given, else :func:`feedback_text` of the record. ``persona``:
    ``True`` names the record's own perspective (where the task has a persona), ``False`` names none (a
    neutral prompt), a string names that perspective instead. ``context`` (e.g. a legal hate-speech
    definition) is put before the question.
    """
    if condition not in CONDITIONS:
        raise PromptError(f"condition must be one of {CONDITIONS}, got {condition!r}")
    if readout not in READOUT_RULES:
        raise PromptError(f"readout must be one of {READOUT_RULES}, got {readout!r}")
    spec = task_spec(task)
    turns: list[tuple[str, str]] = []
    if condition == "few-shot":
        if not shots:
            raise PromptError("condition 'few-shot' needs at least one shot")
        turns = [(_user_message(spec, s, None), f"{ANSWER_PREFIX} {answer_label(task, s)}") for s in shots]
    elif shots:
        raise PromptError(f"shots are only used by condition 'few-shot', not {condition!r}")
    if condition == "with-feedback" and feedback is None:
        found = feedback_text(task, record, feedback_source)
        if found is None:
            raise PromptError(f"record {record.id} has no rationale (feedback_source={feedback_source!r})")
        feedback = found[0]
    elif condition != "with-feedback" and feedback is not None:
        raise PromptError(f"feedback is only used by condition 'with-feedback', not {condition!r}")
    who = record.perspective if persona is True else (persona or None)
    system = spec.persona.format(perspective=who) if spec.persona and who else None
    user = _user_message(spec, record, feedback)
    if context:
        user = f"{context.strip()}\n\n{user}"
    text, templated = _render(tokenizer, system, turns, user)
    return Prompt(text, task, condition, labels_of(task, record), readout, templated)


def encode_prompts(tokenizer: Any, prompts: Sequence[Prompt]) -> tuple[list[list[int]], list[int]]:
    """Token ids of each prompt and the index of its readout token."""
    ids = [p.token_ids(tokenizer) for p in prompts]
    positions = [
        len(i) - 1 if p.readout == "last" else p.readout_index(tokenizer) for p, i in zip(prompts, ids, strict=True)
    ]
    return ids, positions


__all__ = [
    "CONDITIONS",
    "READOUT_RULES",
    "TASKS",
    "Prompt",
    "PromptError",
    "TaskSpec",
    "answer_label",
    "build_prompt",
    "encode_prompts",
    "feedback_text",
    "task_spec",
]
