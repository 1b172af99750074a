"""Fine-tuning with Accelerate: `TrainConfig` (every option), `parse_train_args` (its command line), `train`."""

from .command_line import parse_train_args
from .config import TrainConfig
from .ema import EMAModel
from .loop import train

__all__ = ["EMAModel", "TrainConfig", "parse_train_args", "train"]
