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

from common.config import ConfigError
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


def letter_block(options: Sequence[str]) -> str:
    return "Options:\n" + "\n".join(f"{LETTERS[i]}. {o}" for i, o in enumerate(options))


def _generic_answer(r: PerspectiveRecord) -> str:
    return f"The answer is {r.answer}."


_PLACEHOLDER = re.compile(r"{(\w*)}")


def _fields(template: str) -> set[str]:
    return set(_PLACEHOLDER.findall(template))


@dataclass(frozen=True)
class PromptSpec:
    """How a task's records are asked, what feedback looks like, and what is read out.

    ``question`` turns a record into the question text; ``answer_sentence`` states the perspective's own
    answer (the feedback of records without a rationale). ``persona`` is a format string with
    ``{perspective}`` (``None``: the prompt names no perspective); ``feedback_tag`` labels the feedback block
    (``Thinking: ...`` after the question, or before it when ``feedback_first``); ``letters`` reads out
    option letters instead of the option words (robust when two labels share their first token).
    """

    name: str
    question: Callable[[PerspectiveRecord], str]
    answer_sentence: Callable[[PerspectiveRecord], str] = _generic_answer
    persona: str | None = None
    feedback_tag: str = "Thinking"
    feedback_first: bool = False
    letters: bool = False
    feedback_template: str | None = None  # a template with {feedback}; default "{feedback_tag}: {feedback}"


GENERIC_QUESTION = {
    "classify": "{text}\n\nOptions:\n{options}\n\nAnswer with the letter of the option that applies.",
    "distribution": "{text}\n\nOptions:\n{options}\n\nAnswer with the letter of the option you would choose.",
}
GENERIC_PERSONA = "Answer as someone of this perspective: {perspective}."
TEMPLATE_FIELDS = {  # template key -> (placeholders it must hold, placeholders it may hold)
    "question": ({"text", "options"}, {"text", "options"}),
    "feedback": ({"feedback"}, {"feedback"}),
    "persona": ({"perspective"}, {"perspective"}),
}


def check_template(key: str, template: Any, where: str) -> str:
    """``template`` if it is a string holding the placeholders ``key`` needs and no others; raises
    :class:`ConfigError` naming ``where`` and the placeholder otherwise."""
    if key not in TEMPLATE_FIELDS:
        raise ConfigError(f"{where}: unknown template {key!r}; templates: {sorted(TEMPLATE_FIELDS)}")
    if not isinstance(template, str) or not template.strip():
        raise ConfigError(f"{where}.{key}: must be a non-empty string")
    required, allowed = TEMPLATE_FIELDS[key]
    found = _fields(template)
    missing = sorted(required - found)
    if missing:
        raise ConfigError(f"{where}.{key}: the template has no placeholder {{{missing[0]}}} (needs {sorted(required)})")
    extra = sorted(found - allowed)
    if extra:
        raise ConfigError(f"{where}.{key}: unknown placeholder {{{extra[0]}}} (allowed: {sorted(allowed)})")
    return template


def generic_spec(name: str, kind: str, templates: dict[str, str] | None = None) -> PromptSpec:
    """The prompt of a user's task (any JSONL): the question with lettered options and a persona, each
    overridable by a template (``question`` with ``{text}`` and ``{options}``, ``feedback`` with
    ``{feedback}``, ``persona`` with ``{perspective}``; see :func:`check_template`)."""
    templates = dict(templates or {})
    for key, value in templates.items():
        check_template(key, value, f"templates.{name}")
    question = templates.get("question", GENERIC_QUESTION[kind])

    def ask(r: PerspectiveRecord) -> str:
        return question.format(text=r.text, options=letter_block(r.options).removeprefix("Options:\n"))

    return PromptSpec(
        name, ask, persona=templates.get("persona", GENERIC_PERSONA), letters=True,
        feedback_template=templates.get("feedback"),
    )  # fmt: skip


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


def labels_of(spec: PromptSpec, record: PerspectiveRecord) -> tuple[str, ...]:
    """What is read out for ``record``, one per option: option letters or the option words."""
    return tuple(LETTERS[: len(record.options)]) if spec.letters else tuple(record.options)


def answer_label(spec: PromptSpec, record: PerspectiveRecord) -> str:
    """What the record's perspective answers, as read out (its label word or option letter)."""
    return labels_of(spec, record)[record.options.index(record.answer)]


def feedback_text(
    spec: PromptSpec, record: PerspectiveRecord, source: FeedbackSource = "auto"
) -> tuple[str, str] | None:
    """``(feedback, kind)`` with kind ``rationale`` or ``answer``; ``None`` when ``source="rationale"`` and
    the record has none. ``auto`` prefers the rationale."""
    if source not in FEEDBACK_SOURCES:
        raise PromptError(f"feedback source must be one of {FEEDBACK_SOURCES}, got {source!r}")
    if source in ("auto", "rationale") and record.feedback and record.feedback.strip():
        return record.feedback.strip(), "rationale"
    if source == "rationale":
        return None
    return spec.answer_sentence(record), "answer"


def _user_message(spec: PromptSpec, record: PerspectiveRecord, feedback: str | None) -> str:
    question = spec.question(record)
    if feedback is None:
        return question
    if spec.feedback_template is not None:
        block = spec.feedback_template.format(feedback=feedback)
    else:
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
    spec: PromptSpec,
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
    turns: list[tuple[str, str]] = []
    if condition == "few-shot":
        if not shots:
            raise PromptError("condition 'few-shot' needs at least one shot")
        turns = [(_user_message(spec, s, None), f"{ANSWER_PREFIX} {answer_label(spec, s)}") for s in shots]
    elif shots:
        raise PromptError(f"shots are only used by condition 'few-shot', not {condition!r}")
    if condition == "with-feedback" and feedback is None:
        found = feedback_text(spec, record, feedback_source)
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
    return Prompt(text, spec.name, condition, labels_of(spec, record), readout, templated)


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
    "Prompt",
    "PromptError",
    "PromptSpec",
    "answer_label",
    "build_prompt",
    "check_template",
    "encode_prompts",
    "feedback_text",
    "generic_spec",
    "letter_block",
]
