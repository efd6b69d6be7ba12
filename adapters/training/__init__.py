"""Training: adapters of any registered kind on the frozen backbone, and the tiny base model.

``train_adapter(model, kind, cfg, examples, TrainConfig(...), eval_examples) -> TrainResult`` is the
library API behind ``petserve train`` and the demo builder; ``save_trained`` writes its adapter file.
"""
from petserve.adapters.training.batches import BatchBuilder, ExampleFeatures
from petserve.adapters.training.evaluation import evaluate, predict, score
from petserve.adapters.training.schedule import lr_at, warmup_steps
from petserve.adapters.training.trainer import (
    TrainConfig,
    TrainHistory,
    TrainResult,
    adapter_loss,
    adapter_weights,
    save_trained,
    single_task,
    train_adapter,
    trained_adapter_bytes,
)

__all__ = ["BatchBuilder", "ExampleFeatures", "TrainConfig", "TrainHistory", "TrainResult",
           "adapter_loss", "adapter_weights", "evaluate", "lr_at", "predict", "save_trained", "score",
           "single_task", "train_adapter", "trained_adapter_bytes", "warmup_steps"]
