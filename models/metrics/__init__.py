"""Interpretability metrics (``torchmetrics.Metric`` subclasses, pure PyTorch) and their runner.

Faithfulness (seed 001): :class:`AverageDrop` (eq. 1.10), :class:`AverageIncrease` (1.11),
:class:`AverageGain` (2.8), :class:`InsertionAUC` / :class:`DeletionAUC` (batched
:func:`perturbation_curves`). Localisation: :class:`PointingGame` (1.21), :class:`EnergyPointingGame`,
:class:`SaliencyIoU` (seed 002 eq. 5.1 threshold). :class:`Runtime`. Runner:
:func:`run_interpretability`; reports: :func:`write_markdown_table`, :func:`save_json`,
:func:`save_overlay_grid`. Formulas, defaults and the evaluation protocol: ``docs/metrics.md``.
"""
from .faithfulness import (AverageDrop, AverageGain, AverageIncrease, DeletionAUC, InsertionAUC, check_saliency,
                           class_scores, confidence_change, curve_auc, default_steps, gaussian_blur, masked_images,
                           perturbation_curves, saliency_ranks)
from .localization import (EnergyPointingGame, PointingGame, Runtime, SaliencyIoU, binarize_saliency, boxes_to_mask,
                           class_masks, dilate, energy_in_region, mask_iou, pointing_hits)
from .runner import METRIC_INFO, METRICS, InterpretabilityResults, parse_metrics, run_interpretability
from .report import format_markdown_table, save_json, save_overlay_grid, write_markdown_table

__all__ = [
    "AverageDrop", "AverageGain", "AverageIncrease", "DeletionAUC", "InsertionAUC", "check_saliency", "class_scores",
    "confidence_change", "curve_auc", "default_steps", "gaussian_blur", "masked_images", "perturbation_curves",
    "saliency_ranks", "EnergyPointingGame", "PointingGame", "Runtime", "SaliencyIoU", "binarize_saliency",
    "boxes_to_mask", "class_masks", "dilate", "energy_in_region", "mask_iou", "pointing_hits", "METRIC_INFO",
    "METRICS", "InterpretabilityResults", "parse_metrics", "run_interpretability", "format_markdown_table",
    "save_json", "save_overlay_grid", "write_markdown_table",
]
