"""fastclip: efficient CLIP pretraining with Dynamic Token Pooling, as a Hydra sweep harness."""
from pathlib import Path

PROJECT_ROOT = Path(__file__).resolve().parent.parent
CONF_DIR = PROJECT_ROOT / "conf"


def _register_resolvers() -> None:
    # imported by every process that composes the config (CLI, Submitit workers, tests)
    from omegaconf import OmegaConf
    # ${fastclip.if_one_epoch:${epochs},128,32}: the seed table's batch size (128 for 1 epoch, else 32)
    OmegaConf.register_new_resolver("fastclip.if_one_epoch", lambda epochs, one, other: one if int(epochs) == 1
                                    else other, replace=True)


_register_resolvers()


def __getattr__(name):
    # fastclip.load without importing torch and open_clip for every `import fastclip`
    if name == "load":
        from fastclip.inference import load
        return load
    raise AttributeError(f"module 'fastclip' has no attribute {name!r}")
