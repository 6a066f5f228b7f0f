"""PyTorch integration (needs the torch extra: pip install 'multiverso-py[torch]').

    import multiverso_py as mv
    from multiverso_py.torch import ParamManager, PSOptimizer, Embedding

- ParamManager(module): a module's parameters live on the servers; sync() merges.
- PSOptimizer(params, updater="adam", lr=...): a torch optimizer whose update runs on
  the servers; step() pushes gradients and pulls the new weights.
- Embedding(dim, ...): an embedding layer whose rows live in a KV or sparse matrix table;
  a forward pulls only the batch's rows, a backward pushes only their gradients.

The servers never import torch; only this package does.
"""

from multiverso_py.torch.embedding import Embedding
from multiverso_py.torch.optimizer import PSOptimizer
from multiverso_py.torch.param_manager import ParamManager

__all__ = ["ParamManager", "PSOptimizer", "Embedding"]
