"""The README and docs/ stay honest: links resolve, make targets exist, the README stays short.

Fast and without TensorFlow: it reads Markdown files and the Makefile only.
"""

import re
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
README = ROOT / "README.md"
DOCS = sorted((ROOT / "docs").glob("*.md"))
PAGES = [README, *DOCS]
README_MAX_LINES = 250

FENCE = re.compile(r"^\s*(```|~~~)")
# An inline code span: backticks, then anything up to as many backticks, within one paragraph.
INLINE_CODE = re.compile(r"(`+)((?:(?!\n[ \t]*\n)[\s\S])+?)\1(?!`)")
# [text](target) and ![alt](target), the text possibly over several lines; the target ends at whitespace or ")".
LINK = re.compile(r"!?\[(?:[^\]\[]|\[[^\]]*\])*\]\(\s*<?([^)\s>]+)>?(?:\s+\"[^\"]*\")?\s*\)")
HEADING = re.compile(r"^(#{1,6})\s+(.*?)\s*#*\s*$")
MAKE = re.compile(r"(?<![\w./-])make\s+(?:-\S+\s+)*([A-Za-z][\w.-]*)")
MAKE_RULE = re.compile(r"^([A-Za-z0-9_.-]+(?:\s+[A-Za-z0-9_.-]+)*)\s*:(?!=)")


def relative(path):
    """A path as the messages name it: relative to the repository (a file elsewhere: as it is)."""
    try:
        return path.resolve().relative_to(ROOT).as_posix()
    except ValueError:
        return path.as_posix()


def split_markdown(path):
    """(prose, code) of a Markdown file: the prose is its text with fenced blocks blanked (lines kept, so offsets
    still give line numbers); the code is (line number, text) of each code block line and inline code span."""
    prose, code, inside = [], [], False
    for number, line in enumerate(path.read_text(encoding="utf-8").splitlines(), 1):
        if FENCE.match(line):
            inside = not inside
            prose.append("")
        elif inside:
            prose.append("")
            code.append((number, line))
        else:
            prose.append(line)
    text = "\n".join(prose)
    for match in INLINE_CODE.finditer(text):
        code.append((line_of(text, match.start()), match.group(2)))
    # Inline code is not prose: blank it, keeping its line breaks.
    text = INLINE_CODE.sub(lambda match: re.sub(r"[^\n]", " ", match.group(0)), text)
    return text, sorted(code)


def line_of(text, offset):
    return text.count("\n", 0, offset) + 1


def code_in(path):
    """(line number, code) of every code block line and every inline code span of a Markdown file."""
    return split_markdown(path)[1]


def slug(heading):
    """GitHub's anchor for a heading: its text lowercased, punctuation but '-' and '_' dropped, spaces to '-'."""
    text = re.sub(r"!?\[([^\]]*)\]\([^)]*\)", r"\1", heading)  # a link's text stays, its target goes
    text = text.replace("`", "").replace("*", "").lower().strip()
    text = re.sub(r"[^\w\- ]", "", text)
    return text.replace(" ", "-")


def anchors(path):
    """Every heading's anchor in a Markdown file, with GitHub's -1, -2 suffixes for repeated headings."""
    seen = {}
    found = set()
    inside = False
    for line in path.read_text(encoding="utf-8").splitlines():
        if FENCE.match(line):
            inside = not inside
            continue
        match = None if inside else HEADING.match(line)
        if not match:
            continue
        base = slug(match.group(2))
        count = seen.get(base, 0)
        seen[base] = count + 1
        found.add(base if count == 0 else f"{base}-{count}")
    return found


def links(path):
    """(line number, target) of every link and image outside code of a Markdown file."""
    text = split_markdown(path)[0]
    for match in LINK.finditer(text):
        yield line_of(text, match.start()), match.group(1)


def broken_links(path):
    problems = []
    for number, target in links(path):
        if re.match(r"^[a-z][a-z0-9+.-]*:", target, re.I):  # http(s), mailto: not checked here
            continue
        file_part, _, anchor = target.partition("#")
        linked = (path.parent / file_part).resolve() if file_part else path
        where = f"{relative(path)}:{number}"
        if not linked.exists():
            problems.append(f"{where}: link to {target!r}: {file_part!r} does not exist")
            continue
        if anchor:
            if linked.suffix != ".md" or linked.is_dir():
                problems.append(f"{where}: link to {target!r}: an anchor into a file that is not Markdown")
            elif anchor not in anchors(linked):
                problems.append(
                    f"{where}: link to {target!r}: {relative(linked)} has no heading whose anchor is "
                    f"#{anchor} (its anchors: {', '.join(sorted(anchors(linked)))})"
                )
    return problems


def makefile_targets():
    targets = set()
    for line in (ROOT / "Makefile").read_text(encoding="utf-8").splitlines():
        match = MAKE_RULE.match(line)
        if match:
            targets.update(name for name in match.group(1).split() if not name.startswith("."))
    return targets


@pytest.mark.parametrize("path", PAGES, ids=relative)
def test_every_relative_link_points_at_a_file_and_heading_that_exist(path):
    problems = broken_links(path)
    assert not problems, "broken links:\n" + "\n".join(problems)


@pytest.mark.parametrize("path", PAGES, ids=relative)
def test_every_make_target_written_in_the_docs_is_in_the_makefile(path):
    targets = makefile_targets()
    problems = [
        f"{relative(path)}:{number}: `make {target}` is not a target of the Makefile"
        for number, code in code_in(path)
        for target in MAKE.findall(code)
        if target not in targets
    ]
    assert not problems, "\n".join(problems)


def test_readme_is_short():
    count = len(README.read_text(encoding="utf-8").splitlines())
    assert count <= README_MAX_LINES, (
        f"README.md: {count} lines, more than {README_MAX_LINES}: move detail to a page in docs/ and link it"
    )


def test_every_docs_page_is_linked_from_the_readme():
    linked = {
        (README.parent / target.partition("#")[0]).resolve() for _, target in links(README) if target.partition("#")[0]
    }
    problems = [f"README.md: no link to {relative(page)}" for page in DOCS if page.resolve() not in linked]
    assert not problems, "\n".join(problems)


def test_the_checks_catch_what_they_should(tmp_path):
    """The checker itself: a broken file link, a wrong anchor and an unknown make target are found."""
    (tmp_path / "other.md").write_text("# Other page\n\n## When a run is blocked\n")
    page = tmp_path / "page.md"
    page.write_text(
        "# Page: one (two)\n\n[ok](other.md#when-a-run-is-blocked) [ok](#page-one-two)\n"
        "[gone](missing.md) [anchor](other.md#nowhere)\n\n```\nmake no-such-target\n```\n"
        "[skipped](https://example.com/x#y) `[not a link](nowhere.md)`\n"
    )
    problems = broken_links(page)
    assert len(problems) == 2, problems
    assert problems[0].startswith(f"{page}:4: link to 'missing.md'"), problems
    assert problems[1].startswith(f"{page}:4: link to 'other.md#nowhere'"), problems
    assert [target for _, code in code_in(page) for target in MAKE.findall(code)] == ["no-such-target"]
    assert slug("Presence by year, and small spans") == "presence-by-year-and-small-spans"
    assert (
        slug("Tuning: TFX's Tuner locally, Vertex AI Vizier in the cloud")
        == "tuning-tfxs-tuner-locally-vertex-ai-vizier-in-the-cloud"
    )
    assert slug("`make bench`: a_b") == "make-bench-a_b"
