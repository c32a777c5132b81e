"""Lightning side of the zoo: LightningModules (one per mechanism), DataModules, callbacks."""
from .classification import ClassificationModule, build_optimizer, build_scheduler

__all__ = ["ClassificationModule", "build_optimizer", "build_scheduler"]
