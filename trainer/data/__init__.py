"""Text in, activations out: the data's way to the SAE steps.

* ``text``: documents -> fixed-length token contexts, the held-out split (``ContextData``).
* ``lm``: the causal LM and its hooks: load it, capture a site's activations, splice an SAE in.
* ``source``: LM batches -> chunks of non-special-token activations (``ActivationSource``).
* ``buffer``: the shuffling activation buffer a producer thread fills (``ActivationBuffer``).
* ``h2d``: copies from a host buffer to the training GPU that never block it.
"""
from .text import (
    DEFAULT_DATASET, ContextData, DataError, DocumentSource, TokenIds, iter_contexts, load_documents, looks_like_path,
    pydoc_documents,
)

__all__ = ["DEFAULT_DATASET", "ContextData", "DataError", "DocumentSource", "TokenIds", "iter_contexts",
           "load_documents", "looks_like_path", "pydoc_documents"]
