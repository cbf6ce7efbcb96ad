"""A small Llama-architecture model with trained weights, for measuring blending fidelity (issue 15).

Random weights say nothing about which tokens matter, so the blending benchmark needs a model that has
learned language. This package builds one from text available offline and ships it in
``jobs/models/trained-llama/`` (``DEFAULT_MODEL_DIR``):

    python -m jobs.trained_model corpus build/trained-corpus      # text -> tokenizer + token ids
    python -m jobs.trained_model train build/trained-corpus OUT   # plain torch, GPU if there is one
    python -m jobs.trained_model check OUT                        # vLLM and transformers agree
    python -m jobs.trained_model verify OUT                       # files match MANIFEST.sha256

Other code imports ``DEFAULT_MODEL_DIR``, ``load_tokenizer`` and ``heldout_chunks`` from here.
Modules: ``corpus`` (sources, split, tokenizer), ``llama`` (the model in plain torch with HF names),
``train`` (the loop), ``check`` (vLLM vs transformers), ``manifest`` (file hashes), ``heldout`` (helpers).
"""

from jobs.trained_model.heldout import DEFAULT_MODEL_DIR, heldout_chunks, heldout_documents, load_tokenizer
from jobs.trained_model.manifest import ModelFilesError

__all__ = ["DEFAULT_MODEL_DIR", "ModelFilesError", "heldout_chunks", "heldout_documents", "load_tokenizer"]
