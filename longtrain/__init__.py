"""longtrain: distributed long-sequence continued pretraining (library; no import-time side effects)."""

__version__ = "0.1.0"
