"""The inspection model: one pure ``nn.Module`` shared by trainer, worker and export."""

from .backbone import WeightsError, create_backbone, load_backbone_weights
from .bank import BankTensors, ProductBank, build_bank, stack_banks
from .config import (
    BackboneConfig,
    BankConfig,
    CadaConfig,
    FlowConfig,
    ModelConfig,
    ScoreConfig,
)
from .graph import Analysis, Inspection, InspectionModel, verdicts

__all__ = [
    "Analysis",
    "BackboneConfig",
    "BankConfig",
    "BankTensors",
    "CadaConfig",
    "FlowConfig",
    "Inspection",
    "InspectionModel",
    "ModelConfig",
    "ProductBank",
    "ScoreConfig",
    "WeightsError",
    "build_bank",
    "create_backbone",
    "load_backbone_weights",
    "stack_banks",
    "verdicts",
]
