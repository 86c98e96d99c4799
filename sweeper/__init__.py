"""sweeper: Ray-based parallel sweeps of LLM quantization (models x precisions x compute dtypes) into Parquet."""
from .study import Benchmark, KLSettings, Model, Perplexity, Resources, Study, Task

__version__ = "0.1.0"

__all__ = ["Study", "Model", "Task", "Benchmark", "Perplexity", "Resources", "KLSettings", "__version__"]
