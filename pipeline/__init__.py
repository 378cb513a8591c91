"""Offline batch generation for large language models."""

import os

# The engine shares the CPU with tokenization workers (and whatever else runs there). With
# OpenMP's default spin-waiting, one busy core stalls every parallel region of the other
# threads: small ops ran 8x slower on 2 cores with one core taken (measured). Passive waiting
# yields instead. Set before torch is imported; a user's own setting wins.
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")
# Tokenization is spread over Dask worker processes, one thread each; the tokenizers
# library's own thread pool in every worker would compete with the engine for the cores.
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

__version__ = "0.1.0"
