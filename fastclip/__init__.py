"""fastclip: efficient CLIP pretraining with Dynamic Token Pooling, as a Hydra sweep harness."""
from pathlib import Path

PROJECT_ROOT = Path(__file__).resolve().parent.parent
CONF_DIR = PROJECT_ROOT / "conf"
