"""Compaction: invalid-ratio GC and affinity relocation (its own issue). Plugs into the engine through hooks."""
