"""Offline batch generation for large language models."""

import os
from pathlib import Path

# The engine shares the CPU with tokenization workers (and whatever else runs there). With
# OpenMP's default spin-waiting, one busy core stalls every parallel region of the other
# threads: small ops ran 8x slower on 2 cores with one core taken (measured). Passive waiting
# yields instead. Set before torch is imported; a user's own setting wins.
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")
# Tokenization is spread over Dask worker processes, one thread each; the tokenizers
# library's own thread pool in every worker would compete with the engine for the cores.
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
# bf16 products on the CPU go through oneDNN, which compiles and caches a kernel for every
# shape it meets, ~2.6 MB each, up to 1,024 by default in each of its two caches: a job's
# prefill and decode batches have hundreds of row counts, so the main process grew by ~1 GB
# over a 60k-row job (the demo model). 32 entries bound that at ~80 MB; compiling anew cost
# no measurable time (300 shapes, twice each: 3.8 s with the default caches, 3.5 s with 32).
# Read at oneDNN's first product; a user's own setting wins.
for _cache in ("ONEDNN_PRIMITIVE_CACHE_CAPACITY", "LRU_CACHE_CAPACITY"):
    os.environ.setdefault(_cache, "32")

__version__ = "0.1.0"

# Our kernels are imported as `pipeline.kernels`, never as a top-level `kernels`: that name
# belongs to Hugging Face's hub-kernels package, which transformers and bitsandbytes import
# and which users install; whichever of the two came first on sys.path would hide the other.
# An installed wheel holds them in pipeline/kernels (pyproject's package-dir). In the source
# tree (an editable install, or the repository on PYTHONPATH) they sit at the top level,
# beside this package: let its submodule search look there too.
_source_tree = Path(__file__).resolve().parent.parent
if not Path(__file__).with_name("kernels").is_dir() and (_source_tree / "kernels").is_dir():
    __path__.append(str(_source_tree))
