"""LMCache and vLLM integration. Speaks LMCache types on one side, the engine API on the other.

- `blockstore.connector.l2_adapter`: the L2 adapter plugin for `lmcache server` (LMCache multiprocess
  mode), loaded with `--l2-adapter '{"type": "plugin", "module_path": "blockstore.connector.l2_adapter",
  "class_name": "BlockstoreL2Adapter", "adapter_params": {"path": ...}}'`.
- `blockstore.connector.remote_plugin`: the in-process remote storage plugin for LMCache inside vLLM's
  workers (`remote_storage_plugins: ["blockstore"]`, class `BlockstoreConnectorAdapter`).

Nothing here imports LMCache or torch at package import time: only the adapter modules do, so the engine
installs and runs without them.
"""
