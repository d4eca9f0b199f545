"""The documentation's promises about itself: references resolve, nothing points outside the repository, the
README stays a front door (at most 250 lines), and the licence and citation files agree with it."""
import re
import subprocess
from pathlib import Path

from tests.conftest import REPO

METHOD = REPO / "docs" / "method.md"
TEXT_SUFFIXES = {".py", ".md", ".json", ".sh", ".txt", ".toml", ".cff", ""}


def tracked_text_files() -> list[Path]:
    """The repository's text files: git's tracked files when git is there, else every file outside caches."""
    try:
        names = subprocess.run(["git", "ls-files"], cwd=REPO, capture_output=True, text=True, check=True).stdout.split()
        paths = [REPO / name for name in names]
    except (OSError, subprocess.CalledProcessError):
        paths = [p for p in REPO.rglob("*") if not any(part.startswith(".") for part in p.relative_to(REPO).parts)]
    return [p for p in paths if p.is_file() and p.suffix in TEXT_SUFFIXES and p.name != "test_docs.py"]


def method_sections() -> set[int]:
    """Numbers of docs/method.md's numbered sections ("## 5. Objectives ..." gives 5)."""
    return {int(m) for m in re.findall(r"^## (\d+)\. ", METHOD.read_text(encoding="utf-8"), flags=re.M)}


def test_every_method_reference_names_a_section_that_exists():
    sections, references = method_sections(), 0
    assert sections == set(range(1, 10)), sections
    for path in tracked_text_files():
        for match in re.finditer(r"method\.md §(\d+)(?:-(\d+))?", path.read_text(encoding="utf-8", errors="replace")):
            first, last = int(match[1]), int(match[2] or match[1])
            assert first <= last and set(range(first, last + 1)) <= sections, f"{path.relative_to(REPO)}: {match[0]}"
            references += 1
    assert references > 40  # the code cites the method throughout: a broken pattern would find none


def test_nothing_points_outside_the_repository():
    outside = re.compile(r"spec §|CFINE_SPEC|\.\./shared|shared/CFINE|STYLE\.md|DATASETS\.md", re.I)
    offenders = [f"{p.relative_to(REPO)}:{n}" for p in tracked_text_files()
                 for n, line in enumerate(p.read_text(encoding="utf-8", errors="replace").splitlines(), 1)
                 if outside.search(line)]
    assert not offenders, offenders


def _slug(heading: str) -> str:
    """GitHub's anchor for a Markdown heading: lower case, punctuation dropped, spaces as hyphens."""
    return re.sub(r"[^\w\- ]", "", heading.strip().lower()).replace(" ", "-")


def test_relative_links_in_readme_and_docs_resolve():
    pages = [REPO / "README.md", REPO / "configs" / "README.md", *sorted((REPO / "docs").glob("*.md"))]
    checked = 0
    for page in pages:
        for target in re.findall(r"\]\(([^)\s]+)\)", page.read_text(encoding="utf-8")):
            if re.match(r"[a-z]+://", target):
                continue
            file_part, _, anchor = target.partition("#")
            path = (page.parent / file_part).resolve() if file_part else page
            assert path.exists(), f"{page.relative_to(REPO)} links to a missing {target}"
            if anchor:
                headings = re.findall(r"^#+ (.+)$", path.read_text(encoding="utf-8"), flags=re.M)
                assert anchor in {_slug(h) for h in headings}, f"{page.relative_to(REPO)}: no heading for #{anchor}"
            checked += 1
    assert checked > 20


def test_readme_is_a_front_door():
    readme = (REPO / "README.md").read_text(encoding="utf-8")
    assert len(readme.splitlines()) <= 250
    for heading in ("## Two commands", "## Install", "## Data", "## Train", "## Evaluate", "## Results",
                    "## Layout", "## Citation", "## Licence"):
        assert heading in readme, heading
    for figure in ("69.57", "60.83", "50.55"):  # the paper's R@1 on the three benchmarks
        assert figure in readme and figure in METHOD.read_text(encoding="utf-8")


def test_licence_and_citation_agree_with_the_readme():
    assert (REPO / "LICENSE").read_text(encoding="utf-8").startswith("MIT License")
    citation = (REPO / "CITATION.cff").read_text(encoding="utf-8")
    doi = re.search(r'doi: "([^"]+)"', citation)[1]
    assert "cff-version: 1.2.0" in citation and doi in (REPO / "README.md").read_text(encoding="utf-8")
    assert (REPO / "clip" / "BPE_LICENSE.txt").is_file()


def test_every_test_the_docs_name_exists():
    # A promise's evidence is a test by name ("`test_x.py::test_y`", later "`::test_z`" of the same file): a renamed or
    # deleted test must not leave the documentation citing nothing.
    cited, missing = 0, []
    for doc in [REPO / "README.md", *sorted((REPO / "docs").glob("*.md"))]:
        for line in doc.read_text(encoding="utf-8").splitlines():
            current = None
            for file, name in re.findall(r"`(test_\w+\.py)?(?:::)?(test_\w+)?(?:\[[^\]`]*\])?`", line):
                current = file or current
                if file and not (REPO / "tests" / file).is_file():
                    missing.append(f"{doc.name}: tests/{file}")
                elif name and current:
                    cited += 1
                    if f"def {name}(" not in (REPO / "tests" / current).read_text(encoding="utf-8"):
                        missing.append(f"{doc.name}: {current}::{name}")
    assert cited > 50 and not missing, missing
