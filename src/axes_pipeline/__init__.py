"""axes-pipeline: the two-axis view of channel information (local replaceability vs task relevance)."""

__version__ = "0.1.0"
