"""The docs' reference pages, generated: docs/reference/config.md from the config tree (every group
option's keys with their default, the option's YAML file Hydra-composed with its schema and shared
files; what a resume may do with each, the schema's frozen / mutable / runtime rule; the comment the
YAML file gives it) and docs/reference/metrics.md from the metric catalog (fastclip.eval.names.CATALOG).
Torch-free.

    python -m fastclip.docs_reference           # rewrites both pages
    python -m fastclip.docs_reference --check   # exit 1 when a committed page differs from its source

tests/test_docs.py runs the check, so the pages cannot go stale."""
import argparse
import dataclasses
import re
import sys
from pathlib import Path

from fastclip import CONF_DIR, PROJECT_ROOT
from fastclip.cli_help import describe
from fastclip.schema import OPTIONS

PAGE = PROJECT_ROOT / "docs" / "reference" / "config.md"
METRICS_PAGE = PROJECT_ROOT / "docs" / "reference" / "metrics.md"
KEY_LINE = re.compile(r"^(\w+):\s*([^#]*?)\s*(?:#\s*(.*))?$")
SHARED = re.compile(r"^\s*-\s*/(_shared/[\w/]+)@_here_")


def key_comments(path: Path) -> dict[str, str]:
    """key -> its comment in a YAML file: the one after its value, else the comment lines just above it
    (not the file's leading comment, which describes the file);
    the files its defaults list pulls in from conf/_shared/ first (the option's own comment wins)."""
    lines = path.read_text().splitlines()
    out: dict[str, str] = {}
    for line in lines:
        shared = SHARED.match(line)
        if shared:
            out.update(key_comments(CONF_DIR / f"{shared.group(1)}.yaml"))
    above: list[str] = []
    in_header = True  # the file's leading comment describes the file, not its first key
    parent = None  # a global-package file (task/lm.yaml) nests its group's keys under the group's name
    for line in lines:
        if line.startswith("#"):
            if not in_header:
                above.append(line.lstrip("# ").strip())
            continue
        in_header = False
        if not line.startswith(" "):
            parent = line.split(":", 1)[0]
        match = KEY_LINE.match(line[2:] if parent == path.parent.name and line.startswith("  ") else line)
        if match and match.group(1) not in ("defaults", "name", "hydra"):
            said = match.group(3) or " ".join(a for a in above if "@package" not in a)
            if said:
                out[match.group(1)] = said
        above = []
    return out


LM_ONLY = {("dataset", "text8"), ("encoder", "char_lm_small"), ("encoder", "char_lm_bench"),
           ("encoder", "char_lm_paper")}  # composed under task=lm, as they run


def composed(group: str, option: str) -> dict:
    """The option's keys and defaults as a run composes them (train.yaml with `group=option`: its
    schema and shared files in)."""
    from omegaconf import OmegaConf

    from fastclip.config import compose_train_config
    extra = ["task=lm"] if (group, option) in LM_ONLY else []
    cfg = compose_train_config([*extra, f"{group}={option}"])
    return OmegaConf.to_container(cfg[group], resolve=False)


def rules(schema: type) -> dict[str, str]:
    return {f.name: f.metadata.get("resume", "") for f in dataclasses.fields(schema)}


def cell(value) -> str:
    text = "null" if value is None else str(value).replace("|", "\\|")
    return f"`{text}`" if text else ""


def run_keys() -> list[str]:
    """The top-level keys of train.yaml (epochs, seed, device), from the root schema."""
    from fastclip.schema import ROOT
    comments = key_comments(CONF_DIR / "train.yaml")
    values = {m.group(1): m.group(2) for m in map(KEY_LINE.match, (CONF_DIR / "train.yaml").read_text().splitlines())
              if m}
    out = ["## The run (train.yaml)", "", "| key | default | resume | what it is |", "| --- | --- | --- | --- |"]
    for name, rule in rules(ROOT).items():
        if name in values:
            said = comments.get(name, "").replace("|", "\\|")
            out.append(f"| `{name}` | {cell(values[name])} | {rule} | {said} |")
    return out


def reference_markdown() -> str:
    out = ["# Config reference", "",
           "Generated from the config tree by `python -m fastclip.docs_reference` (CI fails when this page and",
           "`conf/` + `fastclip/schema/` disagree). Each group option is a file `conf/<group>/<option>.yaml`,",
           "typed by its schema dataclass (`fastclip/schema/`); `key=value` on the command line sets a key,",
           "`group=option` picks an option. *resume*: what `trainer.resume` may do with the key: `frozen`",
           "(what the run is; changing it is a new run), `mutable` (how long and how fast it goes on),",
           "`runtime` (how it executes; never what it learns or measures).", ""]
    out += run_keys()
    for group, options in OPTIONS.items():
        out += ["", f"## `{group}`", ""]
        for option, schema in options.items():
            keys = composed(group, option)
            comments = key_comments(CONF_DIR / group / f"{option}.yaml")
            resume = rules(schema)
            title = f"### `{group}={option}`" if len(options) > 1 else f"### `{group}`"
            out += [title, "", describe(group, option, limit=400), "",
                    "| key | default | resume | what it is |", "| --- | --- | --- | --- |"]
            for key, value in keys.items():
                if key == "name":
                    continue
                said = comments.get(key, "").replace("|", "\\|")
                out.append(f"| `{group}.{key}` | {cell(value)} | {resume.get(key, '')} | {said} |")
            out.append("")
    return "\n".join(out).rstrip() + "\n"


WHEN = {"step": "training steps (every `tracking.log_every`)",
        "eval": "each evaluation (per epoch, `eval.every_epochs`; the validation split)",
        "end": "once, when training ends", "final": "once, at the end (the test split)"}


def metrics_markdown() -> str:
    """The metric-name reference: every name a run logs, grouped by when it is logged."""
    from fastclip.eval.names import CATALOG, TWINS
    out = ["# Metric names", "",
           "Generated from `fastclip.eval.names.CATALOG` by `python -m fastclip.docs_reference` (CI fails when",
           "this page and the catalog disagree, and when a run logs a name the catalog lacks). Every metric is",
           "an MLflow metric of the run; `{k}` stands for 1, 5 or 10, `{tower}` for `image` or `text`. *better*:",
           "which way wins (the report's Pareto plot and `make ui`'s sort read it); empty for counts and settings.",
           ""]
    for when, title in WHEN.items():
        out += [f"## Logged at {title}", "", "| name | unit | better | what it is |", "| --- | --- | --- | --- |"]
        out += [f"| `{m.name}` | {m.unit} | {m.better} | {m.meaning.replace('|', chr(92) + '|')} |"
                for m in CATALOG if m.when == when]
        out.append("")
    out += ["## Twins", "", "A quality or cost metric measured again on another form of the model carries a suffix:", ""]
    out += [f"- `<name>{suffix}`: {meaning}." for suffix, meaning in TWINS.items()]
    return "\n".join(out).rstrip() + "\n"


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(prog="python -m fastclip.docs_reference", description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--check", action="store_true", help="compare with the committed page instead of writing it")
    args = ap.parse_args(argv)
    pages = {PAGE: (reference_markdown(), "conf/ and fastclip/schema/"),
             METRICS_PAGE: (metrics_markdown(), "fastclip.eval.names.CATALOG")}
    if args.check:
        stale = [(page, source) for page, (text, source) in pages.items()
                 if not page.is_file() or page.read_text() != text]
        for page, source in stale:
            print(f"{page}: out of date with {source} (python -m fastclip.docs_reference)", file=sys.stderr)
        return 1 if stale else 0
    for page, (text, _) in pages.items():
        page.parent.mkdir(parents=True, exist_ok=True)
        page.write_text(text)
        print(f"wrote {page}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
