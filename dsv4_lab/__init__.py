"""dsv4-lab: DeepSeek-V4, every component a toggle, small enough to read and run on a laptop CPU."""
from .config import ConfigError, ModelConfig, TrainConfig, parse_overrides
from .model import DSV4LM, LMOutput
from .inference.generate import generate

__all__ = ["ConfigError", "ModelConfig", "TrainConfig", "parse_overrides", "DSV4LM", "LMOutput", "generate"]
__version__ = "0.1.0"
