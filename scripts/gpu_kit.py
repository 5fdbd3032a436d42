"""make gpu-kit: the wheels scripts/gpu_check.sh installs on the lent GPU machine, built here into .whl/.

That machine's image holds torch, timm, pytest and about 190 more packages (gpu_image_packages.txt
beside this file) and reaches no network. The kit is what the check's code imports beyond them,
each at the version this environment runs, so the GPU measures the code the tests pass here. All
are pure Python (wcwidth's wheel is abi3), so wheels built on this machine's Python install on the
image's 3.12.

    python scripts/gpu_kit.py            # the wheels into .whl/ (git-ignored; the device call carries it)
    python scripts/gpu_kit.py --check    # exit 1 naming each distribution that the check imports
                                         # and neither the image nor the kit has
"""
import argparse
import importlib
import importlib.metadata as md
import re
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
IMAGE = ROOT / "scripts" / "gpu_image_packages.txt"
KIT = ("open_clip_torch", "hydra-core", "omegaconf", "antlr4-python3-runtime", "webdataset", "braceexpand",
       "ftfy", "wcwidth")
# what gpu_check.sh runs: make bench-gpu, and the CUDA-only tests with their conftest and its fixture's imports
CHECKED = ("fastclip.bench.gpu", "conftest", "test_packed_varlen", "test_device_copies", "fastclip.tracking",
           "fastclip.eval.names")


def norm(name: str) -> str:
    """A distribution name as PEP 503 compares them."""
    return re.sub(r"[-_.]+", "-", name).lower()


def imported_distributions(modules) -> set[str]:
    """The distributions whose top-level modules are loaded after importing `modules` (here)."""
    sys.path[:0] = [str(ROOT), str(ROOT / "tests")]
    for module in modules:
        importlib.import_module(module)
    owners = md.packages_distributions()
    return {norm(d) for top in {name.split(".")[0] for name in list(sys.modules)} for d in owners.get(top, ())}


def requirements(dist: str) -> set[str]:
    """dist's own requirements (no extras), as names."""
    return {norm(re.split(r"[\s;<>=!~\[(]", req, maxsplit=1)[0]) for req in md.requires(dist) or []
            if "extra ==" not in req}


def missing(modules=CHECKED) -> list[str]:
    """The distributions `modules` import that neither the image nor the kit provides. An image
    package's own requirements, and theirs, are left out: the image's version of it brings what it needs."""
    image = {norm(line) for line in IMAGE.read_text().splitlines() if line.strip() and not line.startswith("#")}
    used = imported_distributions(modules)
    brought, grown = set(), True
    while grown:
        more = set().union(*(requirements(d) for d in used & (image | brought)))
        grown, brought = bool(more - brought), brought | more
    return sorted(used - image - {norm(k) for k in KIT} - {"fastclip"} - brought)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--check", action="store_true", help="name what the check imports that no wheel provides")
    ap.add_argument("--modules", default=",".join(CHECKED), help="comma-separated modules the check imports")
    args = ap.parse_args(argv)
    if args.check:
        lacking = missing(args.modules.split(","))
        if lacking:
            print(f"the GPU check imports {', '.join(lacking)}: neither the GPU image ({IMAGE.name}) nor the "
                  f"kit (scripts/gpu_kit.py KIT) has it", file=sys.stderr)
            return 1
        print("the GPU image and the kit cover every distribution the check imports")
        return 0
    pins = [f"{name}=={md.version(name)}" for name in KIT]
    return subprocess.call([sys.executable, "-m", "pip", "wheel", "-q", "--no-deps", "-w", str(ROOT / ".whl"), *pins])


if __name__ == "__main__":
    sys.exit(main())
