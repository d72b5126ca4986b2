"""docs/chapter.md links each of the chapter's equations to a line of code: every link must still point at it."""

import re
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
DOC = ROOT / "docs" / "chapter.md"
ROW = re.compile(r"\[(pipeline/[\w/]+\.py):(\d+)\]\(\.\./(pipeline/[\w/]+\.py)#L(\d+)\) \| `([^`]+)`")


def test_every_equation_links_to_the_line_that_computes_it():
    text = DOC.read_text()
    rows = ROW.findall(text)
    assert len(rows) >= 20
    assert len(rows) == text.count("](../pipeline/"), "a link to code that this test does not check"
    wrong = []
    for shown, line, target, anchor, code in rows:
        lines = (ROOT / target).read_text().splitlines()
        if shown != target or line != anchor or int(line) > len(lines) or code not in lines[int(line) - 1]:
            wrong.append(f"{shown}:{line} should hold {code!r}")
    assert not wrong, "\n".join(wrong)


def test_every_page_the_chapter_page_links_to_exists():
    for target in re.findall(r"\]\(((?:exercises/)?[\w/]+\.md)\)", DOC.read_text()):
        assert (DOC.parent / target).is_file(), target
