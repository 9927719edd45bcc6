"""data_prep: corpora -> tokenized, packed / slide-window-chunked rows (needs no torch, no deepspeed)."""

__version__ = "0.1.0"
