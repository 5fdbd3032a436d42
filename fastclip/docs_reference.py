"""The docs' config reference (docs/reference/config.md), generated from the config tree: every group
option's keys with their default (the option's YAML file, Hydra-composed with its schema and shared
files), what a resume may do with each (the schema's frozen / mutable / runtime rule) and the comment the
YAML file gives it. Torch-free.

    python -m fastclip.docs_reference           # rewrites docs/reference/config.md
    python -m fastclip.docs_reference --check   # exit 1 when the committed page differs from the tree

tests/test_docs.py runs the check, so the page cannot go stale."""
import argparse
import dataclasses
import re
import sys
from pathlib import Path

from fastclip import CONF_DIR, PROJECT_ROOT
from fastclip.cli_help import describe
from fastclip.schema import OPTIONS

PAGE = PROJECT_ROOT / "docs" / "reference" / "config.md"
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
    for line in lines:
        if line.startswith("#"):
            if not in_header:
                above.append(line.lstrip("# ").strip())
            continue
        in_header = False
        match = KEY_LINE.match(line)
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


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(prog="python -m fastclip.docs_reference", description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--check", action="store_true", help="compare with the committed page instead of writing it")
    args = ap.parse_args(argv)
    text = reference_markdown()
    if args.check:
        if not PAGE.is_file() or PAGE.read_text() != text:
            print(f"{PAGE}: out of date with conf/ and fastclip/schema/ (python -m fastclip.docs_reference)",
                  file=sys.stderr)
            return 1
        return 0
    PAGE.parent.mkdir(parents=True, exist_ok=True)
    PAGE.write_text(text)
    print(f"wrote {PAGE}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
