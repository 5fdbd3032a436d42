"""`python -m fastclip.train --help`: the groups and options a user chooses, each with the first line of
its config file's own description, and how to see or change any key. Hydra's generated help lists
every config group, the internal ones (`_shared`, `schema/*`) among them; this lists what the
schema declares (fastclip.schema.OPTIONS) and the site profiles. Torch-free (it answers at once)."""
import re

from fastclip import CONF_DIR
from fastclip.group_choices import conf_options, defaults_list
from fastclip.schema import OPTIONS

# groups chosen with `+group=option` (no default in train.yaml): a SLURM site, a paper recipe
APPENDED = {"cluster": "a SLURM site profile (conf/cluster/)", "experiment": "a recipe (conf/experiment/)"}


def describe(group: str, option: str, limit: int = 96) -> str:
    """The first sentence of conf/<group>/<option>.yaml's leading comment, cut at `limit` chars."""
    said = []
    for line in (CONF_DIR / group / f"{option}.yaml").read_text().splitlines():
        if "@package" in line or not line.startswith("#"):
            if said or not line.startswith("#") and line.strip() and not line.startswith("defaults"):
                break
            continue
        said.append(line.lstrip("# ").strip())
    text = " ".join(said)
    end = re.search(r"(?<! al)\.(\s+(?=[A-Z])|$)", text)  # a sentence's end, not "et al."
    text = text[:end.start() + 1] if end else text
    return text if len(text) <= limit else text[:limit - 3].rsplit(" ", 1)[0] + " ..."


def help_text() -> str:
    defaults = dict(defaults_list("train"))  # group -> its default option (experiment: None)
    out = ["python -m fastclip.train [group=option ...] [group.key=value ...] [-m  for a grid: key=a,b]",
           "",
           "CLIP (or a DTP character LM) trained and evaluated once, tracked in MLflow (make ui, make report).",
           "",
           "Config groups (group=option; * the default):"]
    for group, options in OPTIONS.items():
        out.append(f"  {group}:")
        width = max(len(o) for o in options)
        for option in options:
            mark = "*" if defaults.get(group) == option else " "
            out.append(f"    {mark} {option:<{width}}  {describe(group, option)}".rstrip())
    out.append("")
    out.append("Recipes and site profiles (+ adds a group the defaults list lacks):")
    for group, what in APPENDED.items():
        sign = "" if group in defaults else "+"  # experiment: null in the defaults list, chosen without +
        out.append(f"  {sign}{group}=  {what}: {', '.join(conf_options(group))}")
    out += ["",
            "Any key: group.key=value (trainer.lr=1e-3, boundary.prior=0.25, dataset.path=/data/x.csv); a misspelt",
            "key or option is named with the nearest real one. The whole composed config, nothing run:",
            "  python -m fastclip.train [overrides] --cfg job",
            "Resume: trainer.resume=<run dir>. Grids: -m trainer.lr=5e-4,1e-3 (then make report, make ui).",
            "Hydra's own flags (--multirun, --cfg, --info, ...): --hydra-help. Input errors are one line;",
            "FASTCLIP_TRACEBACK=1 shows the stack."]
    return "\n".join(out)
