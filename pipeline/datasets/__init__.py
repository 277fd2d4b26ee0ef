"""Example data: a synthetic longitudinal exercise cohort with known, planted effects."""

from __future__ import annotations

from .demo import SIZES, DemoCohort, demo_cohort

__all__ = ["SIZES", "DemoCohort", "demo_cohort"]
