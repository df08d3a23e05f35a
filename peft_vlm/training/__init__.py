"""Training: `JointTrainer` (disjoint parameter groups for caption and instruction batches), `TrainConfig`,
checkpoints that resume exactly."""
from peft_vlm.training.config import TrainConfig
from peft_vlm.training.trainer import JointTrainer, TrainingStopped, TrainResult

__all__ = ["JointTrainer", "TrainConfig", "TrainResult", "TrainingStopped"]
