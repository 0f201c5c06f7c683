"""The text corpus for activation collection: documents from ``<data>/corpus`` in a fixed order.

Sources: WikiText-2 raw (test + valid, articles, WikiText tokenisation undone), the 2018 English
Wikipedia sample (articles with ≥ ``min_chars`` of body), AG News test (title + description, HTML
entity residue cleaned). A user's own corpus is any directory of ``.txt`` files (one document per
file, or per blank-line-separated block).
"""

from __future__ import annotations

import csv
import re
from collections.abc import Iterator, Sequence
from pathlib import Path

from pipelines.records import DataError

SOURCES: tuple[str, ...] = ("wikitext2", "enwiki", "ag_news")
_WIKI_DOC = re.compile(r'<doc id="(\d+)" url="[^"]*" title="([^"]*)">\n(.*?)\n</doc>', re.S)
_WT_TITLE = re.compile(r"^ = [^=].* = $")


def _wikitext_articles(path: Path) -> Iterator[str]:
    article: list[str] = []
    for line in path.read_text(encoding="utf-8").split("\n"):
        if _WT_TITLE.match(line) and article:
            yield _untokenize("\n".join(article))
            article = []
        if line.strip():
            article.append(line.strip())
    if article:
        yield _untokenize("\n".join(article))


def _untokenize(text: str) -> str:
    text = text.replace(" @-@ ", "-").replace(" @,@ ", ",").replace(" @.@ ", ".")
    text = re.sub(r" ([.,;:!?)\]'])", r"\1", text)
    return re.sub(r"([(\[]) ", r"\1", text)


def _enwiki_articles(path: Path, min_chars: int) -> Iterator[str]:
    for _id, title, body in _WIKI_DOC.findall(path.read_text(encoding="utf-8")):
        body = body.split("\n", 1)[1].strip() if "\n" in body else ""
        if len(body) >= min_chars:
            yield f"{title}\n\n{body}"


def _clean_ag(text: str) -> str:
    text = re.sub(r" ?#39;", "'", text)
    text = re.sub(r" ?quot;", '"', text)
    return text.replace("#36;", "$").replace(" amp;", " &").replace("\\", " ").strip()


def _ag_news(path: Path) -> Iterator[str]:
    with path.open(encoding="utf-8", newline="") as f:
        for lineno, row in enumerate(csv.reader(f), start=1):
            if len(row) != 3:
                raise DataError(f"{path}:{lineno}: expected 3 columns (class, title, description), got {len(row)}")
            yield f"{_clean_ag(row[1])}\n{_clean_ag(row[2])}"


def _text_dir(root: Path) -> Iterator[str]:
    for path in sorted(root.rglob("*.txt")):
        for block in re.split(r"\n\s*\n", path.read_text(encoding="utf-8")):
            if block.strip():
                yield block.strip()


def iter_documents(corpus: str | Path, sources: Sequence[str] = SOURCES, *, min_chars: int = 500) -> Iterator[str]:
    """Documents of the corpus directory (``<data>/corpus`` or a folder of ``.txt`` files), in order."""
    root = Path(corpus)
    if not root.is_dir():
        raise DataError(f"corpus directory {root} does not exist")
    known = {
        "wikitext2": root / "wikitext2_raw",
        "enwiki": root / "enwiki_wikiextractor_sample",
        "ag_news": root / "ag_news_test",
    }
    if not any(p.is_dir() for p in known.values()):
        yield from _text_dir(root)
        return
    for source in sources:
        if source not in known:
            raise DataError(f"unknown corpus source {source!r}; known: {SOURCES}")
        if source == "wikitext2":
            for name in ("wiki.test.raw", "wiki.valid.raw"):
                yield from _wikitext_articles(known[source] / name)
        elif source == "enwiki":
            for path in sorted(known[source].glob("wiki_*.txt")):
                yield from _enwiki_articles(path, min_chars)
        else:
            yield from _ag_news(known[source] / "test.csv")
