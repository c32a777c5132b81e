"""Registry of the issue-18 metrics for :func:`models.metrics.run_interpretability` / ``eval.py --metrics``.

Keys (``--metrics rins,dpos,dneg,cd,adcc,om,le,f1,boxacc,sm,axsens,axcons``; not part of ``all``):

| key | metric | ↑/↓ | module |
|---|---|---|---|
| rins | region-insertion AUC (seed 004), max 19 | ↑ | region.py |
| dpos / dneg | positive / negative map density (seed 004, spec §5.4) | ↑ / ↓ | region.py |
| cd | confidence drop ×100 (seed 002 eq 5.4) | ↑ | region.py |
| adcc | ADCC ×100 (seed 001 eqs 1.12-1.14) | ↑ | region.py |
| om / le / f1 / boxacc / sm | localisation family (seed 001 eqs 1.16-1.22) | ↓ ↓ ↑ ↑ ↓ | boxes.py |
| axsens / axcons | axiom errors (seed 002 eqs 5.5-5.6) | ↓ ↓ | axioms.py |

Each factory takes the runner's options (``max_batch``) and returns a :class:`PerItemMetric` with
``update_from_context(ctx)``.
"""
from __future__ import annotations

from typing import Callable, Dict, Tuple

from .axioms import AxiomConservation, AxiomSensitivity
from .boxes import BoxAccuracy, LocalizationError, OfficialMetric, PixelF1, SaliencyMetric
from .region import ADCC, ConfidenceDrop, NegativeDensity, PositiveDensity, RegionInsertion

__all__ = ["EXTRA_METRICS", "EXTRA_METRIC_INFO", "EXTRA_ALIASES", "build_extra_metric"]

#: key -> (table header, higher is better)
EXTRA_METRIC_INFO: Dict[str, Tuple[str, bool]] = {
    "rins": ("RegIns", True), "dpos": ("D+", True), "dneg": ("D-", False), "cd": ("CD", True),
    "adcc": ("ADCC", True), "om": ("OM", False), "le": ("LE", False), "f1": ("F1", True),
    "boxacc": ("BoxAcc", True), "sm": ("SM", False), "axsens": ("AxSens", False), "axcons": ("AxCons", False),
}
EXTRA_ALIASES = {"region_insertion": "rins", "density": "dpos", "positive_density": "dpos",
                 "negative_density": "dneg", "confidence_drop": "cd", "box_accuracy": "boxacc",
                 "axiom_sensitivity": "axsens", "axiom_conservation": "axcons"}

EXTRA_METRICS: Dict[str, Callable] = {
    "rins": lambda max_batch=64, **_: RegionInsertion(max_batch=max_batch),
    "dpos": lambda **_: PositiveDensity(), "dneg": lambda **_: NegativeDensity(),
    "cd": lambda **_: ConfidenceDrop(), "adcc": lambda **_: ADCC(),
    "om": lambda **_: OfficialMetric(), "le": lambda **_: LocalizationError(), "f1": lambda **_: PixelF1(),
    "boxacc": lambda **_: BoxAccuracy(), "sm": lambda **_: SaliencyMetric(),
    "axsens": lambda **_: AxiomSensitivity(), "axcons": lambda **_: AxiomConservation(),
}


def build_extra_metric(key: str, **options):
    """Instantiate the metric registered under ``key`` with the runner's ``options``."""
    if key not in EXTRA_METRICS:
        raise ValueError(f"unknown extra metric {key!r}; known: {', '.join(EXTRA_METRICS)}.")
    return EXTRA_METRICS[key](**options)
