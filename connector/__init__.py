"""LMCache and vLLM integration (its own issue). Speaks LMCache types on one side, the engine API on the other."""
