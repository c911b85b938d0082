"""Data sets on disk (MVTec AD, MVTec LOCO, MVTec Caption), the synthetic set, and split protocols."""
from harness.data.layouts import MVTEC_AD, MVTEC_LOCO, Findings, detect_layout, list_categories, read_category, read_dataset
from harness.data.model import GOOD, Category, Sample

__all__ = ["GOOD", "MVTEC_AD", "MVTEC_LOCO", "Category", "Findings", "Sample", "detect_layout", "list_categories",
           "read_category", "read_dataset"]
