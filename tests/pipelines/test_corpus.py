from __future__ import annotations

from pathlib import Path

import pytest

from pipelines.corpus import iter_documents
from pipelines.records import DataError


def test_corpus_has_over_a_million_tokens(data_root: Path) -> None:
    from sae.lm import load_tokenizer

    docs = list(iter_documents(data_root / "corpus"))
    assert len(docs) > 8000
    assert not any("@-@" in d or " #39;" in d for d in docs)  # WikiText and AG News residue undone
    tokenizer = load_tokenizer("embedded")
    n_tokens = sum(len(ids) for ids in tokenizer(docs, add_special_tokens=False)["input_ids"])
    assert n_tokens > 1_000_000


def test_sources_can_be_chosen_and_are_ordered(data_root: Path) -> None:
    ag = list(iter_documents(data_root / "corpus", ["ag_news"]))
    assert len(ag) == 7600
    assert ag == list(iter_documents(data_root / "corpus", ["ag_news"]))
    with pytest.raises(DataError, match="unknown corpus source"):
        list(iter_documents(data_root / "corpus", ["books"]))


def test_a_folder_of_text_files_is_a_corpus(tmp_path: Path) -> None:
    (tmp_path / "a.txt").write_text("first doc\n\nsecond doc\n")
    (tmp_path / "b.txt").write_text("third doc")
    assert list(iter_documents(tmp_path)) == ["first doc", "second doc", "third doc"]
    with pytest.raises(DataError, match="does not exist"):
        list(iter_documents(tmp_path / "nope"))
