"""Process-level set-up shared by every task: device, seeding, autocast, provenance."""
import contextlib
import functools
import os
import random
import subprocess

import numpy as np
import torch

from fastclip import PROJECT_ROOT
from fastclip.errors import InputError
from fastclip.schema.workers import available_cpus


def pick_device(name: str) -> torch.device:
    """The config's `device` (auto, cpu, cuda, cuda:N). cuda:N becomes the process's current CUDA
    device, the one whose RNG state checkpoints keep (rng_state). auto in a process that was given GPUs
    (a SLURM job's GPU request, CUDA_VISIBLE_DEVICES) yet sees none raises ValueError naming the request,
    rather than training on the CPU unnoticed."""
    if name == "auto":
        if torch.cuda.is_available():
            return torch.device("cuda")
        asked = gpus_requested()
        if asked:
            raise InputError(f"{asked} but torch sees no GPU (torch.cuda.is_available() is False; torch "
                             f"{torch.__version__}, CUDA build {torch.version.cuda}): check the job's GPU binding "
                             f"and the CUDA driver, or set device=cpu to train on the CPU")
        return torch.device("cpu")
    if name.startswith("cuda") and not torch.cuda.is_available():
        raise InputError(f"device={name} but torch.cuda.is_available() is False")
    device = torch.device(name)
    if device.type == "cuda" and device.index is not None:
        torch.cuda.set_device(device)
    return device


# what a SLURM job sets when it was given GPUs (sbatch/srun --gpus, --gpus-per-node, --gpus-per-task, --gres)
SLURM_GPU_VARIABLES = ("SLURM_GPUS", "SLURM_GPUS_PER_NODE", "SLURM_GPUS_PER_TASK", "SLURM_GPUS_ON_NODE",
                       "SLURM_JOB_GPUS", "SLURM_STEP_GPUS")


def gpus_requested() -> str | None:
    """The variable (NAME=value) that says this process was given GPUs, or None: a SLURM GPU
    variable other than 0, or CUDA_VISIBLE_DEVICES naming devices ("" and -1 hide them all: a
    request for none)."""
    for name in SLURM_GPU_VARIABLES:
        value = os.environ.get(name, "").strip()
        if value and value not in ("0", "none"):
            return f"{name}={value}"
    visible = os.environ.get("CUDA_VISIBLE_DEVICES")
    if visible is not None and visible.strip() not in ("", "-1"):
        return f"CUDA_VISIBLE_DEVICES={visible}"
    return None


def set_torch_threads(requested, num_workers: int, device: torch.device) -> int:
    """Intra-op threads of the training process. null: on CPU, the cores left after the loader
    workers (at least 1): on 2 cores, 2 workers + 2 torch threads thrashed, and training fed by
    the loader ran at 0.44x of its in-memory rate against 0.8-1.2x with 1 thread (bench-loader)."""
    if requested:
        n = int(requested)
    elif device.type == "cpu" and num_workers:  # this rank's share of the CPUs it may run on (its cpuset)
        n = max(1, available_cpus() - num_workers)
    else:
        return torch.get_num_threads()
    torch.set_num_threads(n)
    return n


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


def epoch_generator(seed: int, epoch: int) -> torch.Generator:
    """The data order of one epoch: a function of (seed, epoch) only, so a resumed run replays it."""
    return torch.Generator().manual_seed(seed * 100_003 + epoch)


def rng_state() -> dict:
    """This process's generators' states as tensors and plain numbers (torch.load(weights_only=True)
    reads it): Python, numpy, torch CPU and, with CUDA, its current device's alone (a process draws
    on one device; every visible device's, by index, failed to restore where fewer were visible)."""
    name, keys, pos, has_gauss, gauss = np.random.get_state()
    state = {"python": random.getstate(), "numpy": (name, keys.tolist(), pos, has_gauss, gauss),
             "torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state(torch.cuda.current_device())
    return state


def set_rng_state(state: dict) -> None:
    """Restores rng_state()'s generators; the CUDA state goes into the current device, whichever
    index it had when saved. A list (checkpoints before: every visible device's state, by index)
    gives the entry of the current device's index, or its first where it is shorter (a process that
    saw one device saved one entry)."""
    version, internal, gauss = state["python"]
    random.setstate((version, tuple(internal), gauss))
    name, keys, *rest = state["numpy"]
    np.random.set_state((name, np.asarray(keys, dtype=np.uint32), *rest))
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        cuda, index = state["cuda"], torch.cuda.current_device()
        if isinstance(cuda, (list, tuple)):
            cuda = cuda[index] if index < len(cuda) else cuda[0]
        torch.cuda.set_rng_state(cuda, index)


@contextlib.contextmanager
def preserved_rng():
    """Inside, any random draw (evaluation's loaders and crops, a probe) leaves every generator
    (Python, numpy, torch CPU and CUDA) as it found it, so what training draws next does not depend
    on whether or how often it evaluated: a resumed run replays an uninterrupted one exactly."""
    state = rng_state()
    try:
        yield
    finally:
        set_rng_state(state)


def sample_seed(*key: int) -> int:
    """A seed from integers (seed, epoch, index ...), the same in every process and run."""
    return int(np.random.SeedSequence([int(k) for k in key]).generate_state(1, np.uint64)[0] >> 1)


@contextlib.contextmanager
def seeded(*key: int):
    """torch's CPU generator seeded from key inside, restored after: a sample's random crop depends
    on (seed, epoch, index) alone, not on which worker made it or what it made before, so a resumed
    epoch that starts mid-way, or runs with other loader workers, crops every sample as before.
    Only the CPU generator is saved, seeded and restored: torchvision's transforms draw from it alone,
    and fork_rng + torch.manual_seed also walked (and reseeded) every accelerator's generators."""
    generator = torch.default_generator
    state = generator.get_state()
    generator.manual_seed(sample_seed(*key))
    try:
        yield
    finally:
        generator.set_state(state)


def config_container(cfg) -> dict:
    """The resolved config as plain dicts and lists (what checkpoints and MLflow record)."""
    from omegaconf import OmegaConf
    return OmegaConf.to_container(cfg, resolve=True)


def autocast_dtype(precision: str, device: torch.device):
    """None means no autocast: float32 (on CUDA with TF32 matmuls, use_tf32_matmuls). 'auto' takes
    bf16 only where the hardware runs it natively."""
    if precision == "fp32":
        return None
    if precision == "bf16":
        return torch.bfloat16
    if precision == "fp16":
        return torch.float16
    if precision == "auto":
        if device.type == "cuda" and torch.cuda.is_bf16_supported():
            return torch.bfloat16
        return None
    raise InputError(f"trainer.precision={precision!r}: expected auto, fp32, bf16 or fp16")


def autocast(device: torch.device, dtype):
    if dtype is None:
        return contextlib.nullcontext()
    return torch.autocast(device_type=device.type, dtype=dtype)


def use_tf32_matmuls(device: torch.device) -> None:
    """float32 matmuls on CUDA in TensorFloat-32 (torch.set_float32_matmul_precision("high"): tensor
    cores, 10 mantissa bits); on CPU nothing is set, so a CPU run's float32 stays IEEE fp32 whatever
    oneDNN could do on the CPU. The process-wide setting stays for the rest of the process.
    `math_mode` names what was in effect."""
    if device.type == "cuda":
        torch.set_float32_matmul_precision("high")


def math_mode(device: torch.device, amp_dtype=None) -> str:
    """The arithmetic a float32 model's forward runs in on `device` under autocast `amp_dtype` (None:
    none) and the process's float32 matmul precision, as a label for a measurement: 'bf16 autocast',
    'fp16 autocast', 'tf32' (float32 matmuls allowed TensorFloat-32: set_float32_matmul_precision
    "high", or torch.backends.{cuda,mkldnn}.matmul.fp32_precision = "tf32"), 'fp32' (IEEE), or
    'fp32, <p> matmuls' for any other precision torch reports."""
    if amp_dtype is not None:
        return f"{str(amp_dtype).removeprefix('torch.').replace('bfloat16', 'bf16').replace('float16', 'fp16')} autocast"
    backend = torch.backends.cuda.matmul if device.type == "cuda" else torch.backends.mkldnn.matmul
    precision = getattr(backend, "fp32_precision", "none")  # torch >= 2.9; "none": not set through it
    if precision == "none":
        precision = {"highest": "ieee", "high": "tf32", "medium": "bf16"}[torch.get_float32_matmul_precision()]
    return {"ieee": "fp32", "tf32": "tf32"}.get(precision, f"fp32, {precision} matmuls")


@functools.cache
def git_commit() -> tuple[str, bool]:
    """(commit, dirty) of the checkout fastclip runs from; ('unknown', True) outside git. Read once
    per process: jobs that Hydra's basic launcher runs one after another in it run the code it loaded,
    whatever was committed since (the report groups runs by this)."""
    try:
        commit = subprocess.run(["git", "rev-parse", "HEAD"], cwd=PROJECT_ROOT, capture_output=True,
                                text=True, check=True).stdout.strip()
        dirty = bool(subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"], cwd=PROJECT_ROOT,
                                    capture_output=True, text=True, check=True).stdout.strip())
        return commit, dirty
    except (OSError, subprocess.CalledProcessError):
        return os.environ.get("FASTCLIP_GIT_COMMIT", "unknown"), True


def compile_blocks(model: torch.nn.Module) -> int:
    """torch.compile each transformer block in place (regional compilation): the blocks are where
    the FLOPs are, and compiling them alone leaves DTP's data-dependent pooling (its segment count
    changes every step) eager; dynamic shapes so a new segment count does not recompile.
    ModifiedResNet (RN50) has no such blocks and stays eager. A DTP-ViT's shortened blocks on
    packed rows do not go through block.__call__: its packed block function is compiled too.
    -> the number of blocks compiled."""
    from open_clip.transformer import ResidualAttentionBlock
    blocks = [m for m in model.modules() if isinstance(m, ResidualAttentionBlock)]
    for block in blocks:
        block.compile(dynamic=True)
    for module in model.modules():
        if hasattr(module, "packed_block"):
            module.packed_block = torch.compile(module.packed_block, dynamic=True)
    return len(blocks)
