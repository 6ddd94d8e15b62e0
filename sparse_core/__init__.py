"""sparse_core: an end-to-end pruning pipeline (init -> pre-train -> prune -> post-train) and RigL.

Never imports ray or mlflow: it is called from the CLI, from tests and from the Ray trainable alike.
"""

from .config import Config, from_flat, run_key, to_flat

__version__ = "0.1.0"
__all__ = ["Config", "from_flat", "run_key", "to_flat", "__version__"]
