"""Runnable jobs that use blockstore but are not part of the installed package: the vLLM + LMCache
end-to-end main job (`python -m jobs.main_job`), the tiny Llama model it builds
(`python -m jobs.tiny_model`), and the engine demo without vLLM (`python -m jobs.demo`). Run them from
the repository root (scripts/main-job.sh does)."""
