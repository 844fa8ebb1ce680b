"""gemma4: Google's Gemma 4 models in plain PyTorch."""
from .chat.parse import parse_output
from .config import ConfigError, load_config
from .llm import LLM, GenerationResult
from .tokenizer import load_tokenizer
from .weights import CheckpointError, load

__all__ = ["LLM", "GenerationResult", "load", "load_tokenizer", "load_config", "ConfigError", "CheckpointError"]
__version__ = "0.1.0"
