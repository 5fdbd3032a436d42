"""make gpu-kit: the wheels scripts/gpu_check.sh installs on the lent GPU machine, built here into .whl/.

That machine's image holds torch, timm, pytest and about 190 more packages (gpu_image_packages.txt
beside this file) and reaches no network. The kit is what the check's code imports beyond them,
each at the version this environment runs (the image's own torch, timm, numpy... keep theirs:
gpu_check.sh writes their versions to env.txt). Each wheel is downloaded for the image's CPython 3.12
on x86-64 Linux; a project with no such wheel on the index (antlr4-python3-runtime 4.9.3: a source
archive only) is built here and must come out pure Python.

    python scripts/gpu_kit.py            # .whl/ emptied, then the wheels into it (git-ignored; the call carries it)
    python scripts/gpu_kit.py --check    # exit 1 naming each distribution that the check's modules
                                         # import at load and neither the image nor the kit has, or a
                                         # kit project the image also has (on PYTHONPATH it would shadow it)
"""
import argparse
import importlib
import importlib.metadata as md
import re
import shutil
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


IMAGE_PYTHON = {"python_version": "3.12", "python_full_version": "3.12.3", "sys_platform": "linux",
                "platform_system": "Linux", "os_name": "posix", "platform_machine": "x86_64",
                "implementation_name": "cpython", "platform_python_implementation": "CPython", "extra": ""}


def requirements(dist: str) -> set[str]:
    """dist's own requirements on the image's Python (markers evaluated there; no extras), as names."""
    from packaging.requirements import Requirement
    reqs = (Requirement(req) for req in md.requires(dist) or [])
    return {norm(req.name) for req in reqs if req.marker is None or req.marker.evaluate(IMAGE_PYTHON)}


def missing(modules=CHECKED) -> list[str]:
    """The distributions `modules` import that neither the image nor the kit provides. An image
    package's own requirements, and theirs, are left out: the image's version of it brings what it needs."""
    image = image_packages()
    used = imported_distributions(modules)
    brought, grown = set(), True
    while grown:
        more = set().union(*(requirements(d) for d in used & (image | brought)))
        grown, brought = bool(more - brought), brought | more
    return sorted(used - image - {norm(k) for k in KIT} - {"fastclip"} - brought)


def image_packages() -> set[str]:
    return {norm(line) for line in IMAGE.read_text().splitlines() if line.strip() and not line.startswith("#")}


def build(dest: Path = ROOT / ".whl") -> list[str]:
    """dest emptied (two versions of one project stop the install there), then one wheel per KIT
    project at this environment's version -> the wheels' names. Raises RuntimeError naming a wheel
    built here that is not pure Python."""
    shutil.rmtree(dest, ignore_errors=True)
    dest.mkdir()
    pip = [sys.executable, "-m", "pip"]
    for name in KIT:
        pin = f"{name}=={md.version(name)}"
        downloaded = subprocess.call(pip + ["download", "-q", "--no-deps", "--only-binary=:all:", "--python-version",
                                            "3.12", "--implementation", "cp", "--platform", "manylinux2014_x86_64",
                                            "--platform", "manylinux_2_28_x86_64", "-d", str(dest), pin],
                                     stderr=subprocess.DEVNULL)
        if downloaded:  # no wheel on the index: built here from its source archive
            before = set(dest.iterdir())
            subprocess.check_call(pip + ["wheel", "-q", "--no-deps", "-w", str(dest), pin])
            built = [p.name for p in set(dest.iterdir()) - before]
            if not all(n.endswith("-none-any.whl") for n in built):
                raise RuntimeError(f"{pin}: built here as {built}, not pure Python: it would not install on the image")
    return sorted(p.name for p in dest.glob("*.whl"))


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--check", action="store_true", help="name what the check imports that no wheel provides")
    ap.add_argument("--modules", default=",".join(CHECKED), help="comma-separated modules the check imports")
    args = ap.parse_args(argv)
    if args.check:
        shadowing = sorted({norm(k) for k in KIT} & image_packages())
        if shadowing:
            print(f"the kit carries {', '.join(shadowing)}, which the GPU image has: on PYTHONPATH it would "
                  f"shadow the image's own", file=sys.stderr)
            return 1
        lacking = missing(args.modules.split(","))
        if lacking:
            print(f"the GPU check imports {', '.join(lacking)}: neither the GPU image ({IMAGE.name}) nor the "
                  f"kit (scripts/gpu_kit.py KIT) has it", file=sys.stderr)
            return 1
        print("the GPU image and the kit cover every distribution the check's modules import at load")
        return 0
    print("\n".join(build()))
    return 0


if __name__ == "__main__":
    sys.exit(main())
