"""gemma4: Google's Gemma 4 models in plain PyTorch."""
import os

# MKL (PyTorch's fp32 GEMM on x86 CPUs: our prefill) keeps the buffers of past GEMMs for reuse: ~37 MB of a
# bf16 E2B prefill's peak RSS, and no measurable speed (benchmarks/bench_generate.py). Read at MKL's first
# GEMM, so it works even when torch was imported first; set MKL_DISABLE_FAST_MM=0 to keep the cache.
os.environ.setdefault("MKL_DISABLE_FAST_MM", "1")

from .memory import configure_heap

configure_heap()  # how glibc serves prompt-sized buffers on this CPU (see there)

from .chat.parse import parse_output
from .config import ConfigError, load_config
from .llm import LLM, GenerationResult
from .tokenizer import load_tokenizer
from .weights import CheckpointError, load

__all__ = ["LLM", "GenerationResult", "load", "load_tokenizer", "load_config", "ConfigError", "CheckpointError"]
__version__ = "0.1.0"
