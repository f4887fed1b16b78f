"""The front page and the docs match the code: every reference from code or docs to a section of
the README or of a doc resolves to a heading that exists, every local Markdown link to a file
that exists, and the README stays within 250 lines.

The reference forms in use (searched for across the repository):
    README "Section"          README, "Section"         the README's "Section"
    docs/usage.md §4          [usage.md](usage.md) §4   docs/evaluation.md, "Section"
A quoted name matches a heading equal to it, or one that continues it after ':', ' (' or ' —'
("Long runs" → "Long runs: a pod job left alone for days"); §N matches a heading numbered N.
References may wrap over lines (comment markers and indentation are read through).
"""
import os
import re

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SCANNED = ("cacl_jax", "configs", "benchmarks", "launch", "docs", "tests", "README.md")
SUFFIXES = (".py", ".md", ".sh", ".sbatch", ".txt", ".toml")

QUOTED = re.compile(r"\b(README|[A-Za-z_]+\.md)(?:'s)?,?\s+\"([^\"\n]{2,80})\"")
NUMBERED = re.compile(r"\b(README|[A-Za-z_]+\.md)\)?,?\s+§\s?(\d+)")
LINK = re.compile(r"\]\(([^)\s#]+)(?:#[^)]*)?\)")


def scanned_files() -> list[str]:
  out = []
  for top in SCANNED:
    path = os.path.join(ROOT, top)
    if os.path.isfile(path):
      out.append(path)
      continue
    for folder, _, names in os.walk(path):
      out += [os.path.join(folder, n) for n in names if n.endswith(SUFFIXES)]
  return sorted(set(out) - {os.path.abspath(__file__)})   # this file's docstring shows the forms


def joined(text: str) -> str:
  """The text with line breaks (and the comment markers / indentation after them) as spaces."""
  return re.sub(r"[ \t]*\n[ \t]*(?:#+(?!#)[ \t]*)?", " ", text)


def headings(path: str) -> list[str]:
  """The Markdown headings of `path` outside code fences, without their '#' marks."""
  out, fenced = [], False
  with open(path, encoding="utf-8") as f:
    for line in f:
      if line.startswith("```"):
        fenced = not fenced
      elif not fenced and re.match(r"#{1,6} ", line):
        out.append(line.lstrip("#").strip())
  return out


def target(name: str, source: str) -> str | None:
  """The doc a reference names: README → README.md; X.md → docs/X.md (or beside `source`)."""
  if name == "README":
    return os.path.join(ROOT, "README.md")
  for candidate in (os.path.join(ROOT, "docs", name), os.path.join(os.path.dirname(source), name),
                    os.path.join(ROOT, name)):
    if os.path.isfile(candidate):
      return candidate
  return None


def has_section(doc: str, section: str) -> bool:
  section = section.strip().lower()
  for heading in headings(doc):
    h = heading.lower()
    h_plain = re.sub(r"^\d+\.\s*", "", h)
    for text in (h, h_plain):
      if text == section or any(text.startswith(section + sep) for sep in (":", " (", " —")):
        return True
  return False


def has_number(doc: str, number: str) -> bool:
  return any(re.match(rf"§?{number}[.\s]", h) for h in headings(doc))


def references() -> list[tuple[str, str, str, str]]:
  """(source file, doc name, 'quoted' | 'numbered', section) for every reference found."""
  found = []
  for path in scanned_files():
    with open(path, encoding="utf-8") as f:
      text = joined(f.read())
    rel = os.path.relpath(path, ROOT)
    found += [(rel, doc, "quoted", s) for doc, s in QUOTED.findall(text)]
    found += [(rel, doc, "numbered", n) for doc, n in NUMBERED.findall(text)]
  return found


def test_the_scan_finds_the_reference_forms_in_use():
  # Guards the patterns themselves: known references of each form are found.
  found = {(src, doc, kind, s) for src, doc, kind, s in references()}
  assert ("tests/conftest.py", "README", "quoted", "Tests") in found
  assert ("cacl_jax/data/prepare.py", "usage.md", "numbered", "1") in found
  assert any(s == "Dense retrieval protocol (Hummingbird)" for _, _, _, s in found)
  assert any(src.startswith("configs/") and s == "What the demo shows" for src, _, _, s in found)
  assert len(found) > 50


def test_every_section_reference_resolves():
  broken = []
  for src, doc, kind, section in references():
    path = target(doc, os.path.join(ROOT, src))
    if path is None:
      broken.append(f"{src}: {doc} (no such file)")
    elif not (has_section(path, section) if kind == "quoted" else has_number(path, section)):
      broken.append(f"{src}: {doc} {'§' if kind == 'numbered' else ''}{section!r}")
  assert not broken, "references to missing sections:\n" + "\n".join(sorted(set(broken)))


def test_every_local_markdown_link_resolves():
  broken = []
  for path in scanned_files():
    if not path.endswith(".md"):
      continue
    with open(path, encoding="utf-8") as f:
      text = f.read()
    for link in LINK.findall(text):
      if re.match(r"[a-z]+:", link):           # http:, https:, mailto:
        continue
      if not os.path.exists(os.path.join(os.path.dirname(path), link)):
        broken.append(f"{os.path.relpath(path, ROOT)}: {link}")
  assert not broken, "links to missing files:\n" + "\n".join(broken)


@pytest.mark.parametrize("heading, expected", [("4. The interface (what users' scripts rely on)", True),
                                               ("Long runs: a pod job", True),
                                               ("Long runsx", False)])
def test_heading_matching(tmp_path, heading, expected):
  doc = tmp_path / "x.md"
  doc.write_text(f"# Title\n\n```\n# Long runsx\n```\n\n## {heading}\n")
  name = "The interface (what users' scripts rely on)" if heading[0] == "4" else "Long runs"
  assert has_section(str(doc), name) == expected
  assert has_number(str(doc), "4") == heading.startswith("4.")


def test_the_readme_is_at_most_250_lines():
  with open(os.path.join(ROOT, "README.md"), encoding="utf-8") as f:
    assert len(f.read().splitlines()) <= 250
