"""Mixed data x tensor parallelism on torch.distributed: the same SAE from any layout (docs/method.md sec. 8).

* ``mesh``: ``ParallelContext`` (where a process sits in the (data, model) mesh, and its collectives;
  a no-op 1 x 1 context in one process) and ``init_parallel`` (join the job torchrun started).
* ``sharded``: the exact global TopK over latents sharded across a model group (``sharded_forward``,
  ``sharded_select_decode``) and ``ShardedTopKSAE``, a rank's rows of an SAE.
* ``batch_select``: BatchTopK's selection over the whole step batch, exact on any layout (radix histograms
  all-reduced over the mesh, ties in global order: ``batch_topk_forward``, which also decodes Matryoshka's
  prefixes by bands of latents) and the dense ReLU forward of the ``standard`` architecture
  (``dense_forward``).
* ``placement``: which model groups train which member of a suite, and what each rank trains on.
* ``exchange``: ``RowExchange``, each step's rows moved to the ranks that train on them.
* ``state``: a member's SAE and Adam state gathered to single-process shapes, and re-sharded.

The LM producers are data-parallel over every rank; each member trains on the single process's batches
(row for row), its latents split over ``--tp`` ranks; gradients are averaged over data groups and
clipped by the global norm; checkpoints hold single-process shapes. So any world size and ``--tp`` give
the single-process SAE to float32 tolerance, and a checkpoint of one layout resumes in another.
"""
from .batch_select import BatchTopK, batch_topk_forward, dense_forward
from .exchange import RowExchange
from .mesh import DEFAULT_TIMEOUT_S, ParallelContext, init_parallel, is_sharded
from .placement import RowNeed, member_contexts, place_members, row_needs
from .sharded import ShardedTopK, ShardedTopKSAE, select_global_topk, sharded_forward, sharded_select_decode
from .state import gather_full_state, gather_optimizer_state_dict, shard_optimizer_state_dict, shard_state

__all__ = ["ParallelContext", "init_parallel", "DEFAULT_TIMEOUT_S", "is_sharded", "ShardedTopK", "ShardedTopKSAE",
           "select_global_topk", "sharded_forward", "sharded_select_decode", "place_members", "member_contexts",
           "RowNeed", "row_needs", "RowExchange", "gather_full_state", "shard_state", "gather_optimizer_state_dict",
           "shard_optimizer_state_dict", "BatchTopK", "batch_topk_forward", "dense_forward"]
