"""Every relative link in README.md and docs/*.md points at a file that exists and, when it
names an #anchor, at a heading of that file (GitHub's anchor rule)."""
import re
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
PAGES = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]
LINK = re.compile(r"\[[^\]]*\]\(([^)\s]+)\)")
FENCE = re.compile(r"^```.*?^```", re.S | re.M)


def anchor(heading: str) -> str:
    """GitHub's anchor of a heading: lower case, punctuation dropped, spaces to hyphens."""
    text = re.sub(r"[^\w\- ]", "", heading.strip().lower())
    return text.replace(" ", "-")


def anchors(page: Path) -> set[str]:
    """The anchors of a page's headings (GitHub numbers repeats: -1, -2, ...)."""
    seen: dict[str, int] = {}
    out = set()
    for line in FENCE.sub("", page.read_text()).splitlines():
        if m := re.match(r"#{1,6} (.+)", line):
            a = anchor(m.group(1))
            n = seen.get(a, 0)
            seen[a] = n + 1
            out.add(a if n == 0 else f"{a}-{n}")
    return out


def links(page: Path) -> list[str]:
    """Relative link targets of a page, outside code blocks."""
    return [t for t in LINK.findall(FENCE.sub("", page.read_text()))
            if not re.match(r"[a-z]+:", t)]


def test_anchor_rule():
    assert anchor("`twostage prepare-sr` and `twostage weights`") == "twostage-prepare-sr-and-twostage-weights"
    assert anchor("Does the palm stage pay off on data it was not tuned on?") == \
        "does-the-palm-stage-pay-off-on-data-it-was-not-tuned-on"


@pytest.mark.parametrize("page", PAGES, ids=lambda p: p.name)
def test_relative_links_resolve(page):
    broken = []
    for target in links(page):
        path, _, frag = target.partition("#")
        dest = (page.parent / path).resolve() if path else page
        if not dest.exists():
            broken.append(f"{target}: no file {dest.relative_to(ROOT) if dest.is_relative_to(ROOT) else dest}")
        elif frag and dest.suffix == ".md" and frag not in anchors(dest):
            broken.append(f"{target}: no heading #{frag} in {dest.name}")
    assert not broken, f"{page.name}: " + "; ".join(broken)


def test_readme_is_a_map():
    """The README stays a map; the rest lives in docs/."""
    assert (ROOT / "README.md").stat().st_size <= 15_000


RULE_ROW = re.compile(r"^\| (?P<rule>[^|]+) \| (?P<where>.+) \|$")
CITED = re.compile(r"`(?P<file>[a-z_/]+\.py)`(?: \((?P<names>[^)]*)\))?")


def test_design_rule_table_is_true():
    """Every file the "Where each rule lives" table of docs/DESIGN.md names exists under
    twostage/, and every name it cites beside a file is defined there (class, function or
    constant; `A.b` is attribute b of A)."""
    import ast

    text = (ROOT / "docs" / "DESIGN.md").read_text()
    table = text[text.index("**Where each rule lives**"):]
    cited = 0
    for line in table.splitlines():
        row = RULE_ROW.match(line)
        if not row or row["rule"].strip() in ("rule", "---"):
            continue
        for m in CITED.finditer(row["where"]):
            path = ROOT / "twostage" / m["file"]
            assert path.is_file(), f"{line}: {m['file']} does not exist"
            tree = ast.parse(path.read_text())
            defined = {n.name: n for n in tree.body if isinstance(n, (ast.FunctionDef, ast.ClassDef))}
            defined.update({t.id: n for n in tree.body if isinstance(n, (ast.Assign, ast.AnnAssign))
                            for t in (n.targets if isinstance(n, ast.Assign) else [n.target])
                            if isinstance(t, ast.Name)})
            for name in re.findall(r"`([A-Za-z_.]+)`", m["names"] or ""):
                top, _, attr = name.partition(".")
                assert top in defined, f"{line}: {m['file']} defines no {top}"
                if attr:
                    members = {n.name for n in ast.walk(defined[top]) if isinstance(n, ast.FunctionDef)}
                    assert attr in members, f"{line}: {top} has no {attr}"
                cited += 1
    assert cited > 40
