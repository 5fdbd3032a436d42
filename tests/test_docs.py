"""The documentation: the README stays a front page, its links land, the site (mkdocs.yml, docs/)
builds strictly (a broken link or anchor, a page left out of the navigation fails), the generated
config reference matches the config tree, and every command the docs show runs (a train command that
needs no outside data or cluster: its first job, a few steps) or composes (one that does) or names a
real make target (the README's own command block runs in test_readme.py)."""
import re
import shlex
import subprocess
import sys

import pytest

from fastclip import PROJECT_ROOT
from conftest import OUTSIDE, bash_words, composable, few_steps
from fastclip.docs_reference import METRICS_PAGE, PAGE, metrics_markdown, reference_markdown

DOCS = PROJECT_ROOT / "docs"
README_MAX_LINES = 150  # a front page read in five minutes (issue 34)


def slug(heading: str) -> str:
    """The anchor mkdocs' toc gives a heading (its default slugify: lower case, words joined by '-')."""
    text = re.sub(r"[`*_]", "", heading.strip().lower())
    text = re.sub(r"[^\w\s-]", "", text)
    return re.sub(r"[\s]+", "-", text).strip("-")


def test_the_readme_is_a_front_page_whose_links_land():
    text = (PROJECT_ROOT / "README.md").read_text()
    assert len(text.splitlines()) <= README_MAX_LINES
    links = re.findall(r"\]\(((?!https?:)[^)#]+)(?:#([^)]+))?\)", text)
    assert links, "the README links the docs"
    for target, anchor in links:
        path = PROJECT_ROOT / target
        assert path.is_file(), f"README links {target}, which does not exist"
        if anchor:
            anchors = {slug(h) for h in re.findall(r"^#+ (.+)$", path.read_text(), re.M)}
            assert anchor in anchors, f"README links {target}#{anchor}: no such heading there"
    # set-up first, then how to enter the environment, before any command that needs it
    assert text.index("make train") < text.index("source .venv/bin/activate") < text.index("python -m fastclip")


def test_the_site_builds_strictly(tmp_path):
    done = subprocess.run([sys.executable, "-m", "mkdocs", "build", "--strict", "--quiet", "-d", str(tmp_path / "site")],
                          cwd=PROJECT_ROOT, capture_output=True, text=True, timeout=300,
                          env={"NO_MKDOCS_2_WARNING": "1", "PATH": "/usr/bin:/bin"})
    assert done.returncode == 0, done.stderr[-3000:]
    pages = {p.relative_to(DOCS).as_posix() for p in DOCS.rglob("*.md")}
    nav = set(re.findall(r":\s*([\w/.-]+\.md)\s*$", (PROJECT_ROOT / "mkdocs.yml").read_text(), re.M))
    assert pages == nav, f"pages outside the navigation: {sorted(pages - nav)}; missing: {sorted(nav - pages)}"
    assert (tmp_path / "site" / "reference" / "config.html").is_file()
    # opened from disk (file://, no server): every link names an HTML file, not a folder's listing
    home = (tmp_path / "site" / "index.html").read_text()
    links = re.findall(r'href="((?!https?:|#|mailto:)[^"]+)"', home)
    pages = [link.split("#")[0] for link in links if link.split("#")[0] and not link.endswith((".css", ".js", ".png",
                                                                                                   ".svg", ".ico"))]
    assert pages and all(p.endswith(".html") for p in pages), [p for p in pages if not p.endswith(".html")]


def test_the_metric_reference_is_generated_from_the_catalog():
    text = metrics_markdown()
    assert METRICS_PAGE.read_text() == text, "docs/reference/metrics.md is stale: python -m fastclip.docs_reference"
    assert "| `zeroshot/top1` | share | higher |" in text and "| `lm/test_bpc` | bits/char | lower |" in text


def test_the_config_reference_is_generated_from_the_tree():
    """Edit a default or a comment in conf/, or a resume rule in fastclip/schema/, and this fails until
    `python -m fastclip.docs_reference` (or make docs) rewrites the page."""
    text = reference_markdown()
    assert PAGE.read_text() == text, "docs/reference/config.md is stale: python -m fastclip.docs_reference"
    # what the page holds: a default and a comment from a group file, a resume rule from the schema
    assert "| `trainer.lr` | `0.0005` | mutable |" in text
    assert "| `boundary.prior` | `0.2` | frozen | target boundary rate" in text
    assert "### `dataset=text8`" in text and "### `encoder=char_lm_paper`" in text
    # every key says what it is (its comment in conf/); task=lm's nest under `task:` in a global-package file
    unsaid = [row.split(" | ")[0][2:] for row in text.splitlines() if row.startswith("| `") and row.endswith("|  |")]
    assert not unsaid, f"keys without a comment in conf/: {unsaid}"
    assert "| `task.context` | `256` | frozen | window length (chars) |" in text


def docs_commands() -> list[str]:
    """The shell commands the docs pages show (indented code lines, inline `python -m fastclip.train ...`
    spans) and the README's make lines."""
    found = []
    for page in sorted(DOCS.rglob("*.md")):
        text = page.read_text()
        found += [line.strip() for line in text.splitlines()
                  if line.startswith("    ") and line.strip().startswith(("python -m fastclip.train", "make "))]
        found += re.findall(r"`(python -m fastclip\.train [^`]+)`", text)
    readme = (PROJECT_ROOT / "README.md").read_text()  # its train lines run in test_readme.py; its make lines here
    found += [line.strip() for line in readme.splitlines() if line.startswith("    make ")]
    return [re.sub(r"\s+#\s.*$", "", c) for c in found]


NEEDS_OUTSIDE = (*OUTSIDE, "hydra/launcher=submitit", "tracking.uri=http")  # a cluster, a server


@pytest.mark.slow
def test_every_command_in_the_docs_runs_composes_or_names_a_make_target(shell):
    commands = docs_commands()
    ran = []
    for command in commands:
        # $RUN: the reader's own run dir (resume.md), here the newest run an earlier command trained
        runs = sorted(p for p in (shell.home / "outputs" / "runs").glob("*/*") if (p / "checkpoints").is_dir())
        if "$RUN" in command:
            assert runs, f"{command}: no earlier command of the docs trained a run to resume"
            # two steps further than the run trained, so a resume that lengthens it really trains on
            command = command.replace("$RUN", str(runs[-1])) + " trainer.max_steps=4"
        words = bash_words(shell, command)
        if words[0] == "make":
            done = subprocess.run(["make", "-n", *words[1:]], cwd=PROJECT_ROOT, capture_output=True, text=True)
        elif any(marker in command for marker in NEEDS_OUTSIDE):  # composed: one job of the grid
            done = shell(shlex.join(["python", "-m", "fastclip.train", *composable(words), "--cfg", "job"]))
        else:  # run: the grid's first job (each swept key at its first value), a few steps
            done = shell(shlex.join(["python", "-m", "fastclip.train", *few_steps(composable(words))]))
            ran.append(command)
        assert done.returncode == 0, f"{command}\n{done.stderr[-2000:]}"
    assert len(ran) >= 2, ran  # the docs' grids that need nothing from outside really train
