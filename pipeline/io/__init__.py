"""Reading and writing counts files and the sample sheet."""

from __future__ import annotations

from .readers import FORMATS, CountsSummary, detect_format, inspect_counts, read_counts
from .samplesheet import SampleRow, SampleSheet, read_samplesheet
from .write10x import write_10x_h5, write_10x_mtx

__all__ = [
    "FORMATS",
    "CountsSummary",
    "SampleRow",
    "SampleSheet",
    "detect_format",
    "inspect_counts",
    "read_counts",
    "read_samplesheet",
    "write_10x_h5",
    "write_10x_mtx",
]
