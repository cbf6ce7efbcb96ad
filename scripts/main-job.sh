#!/usr/bin/env bash
# The main job: vLLM (CPU build) with an `lmcache server` whose disk tier is blockstore, on a ~100 M
# parameter random Llama built locally; replays after clearing the server's RAM tier and after
# restarting both processes, and prints a report (tokens served from blockstore, hit rate, TTFT against
# no reuse, outputs identical to a no-cache run). Then the blend scenario on the trained model: chunks
# in new orders served blended by blockstore's vLLM connector (tokens served, TTFT, greedy agreement
# with full prefill). Options: python -m jobs.main_job --help. The embedded engine demo without vLLM is
# `python -m jobs.demo`.
source "$(dirname "$0")/setup-env.sh"
export DO_NOT_TRACK=1 VLLM_NO_USAGE_STATS=1 LMCACHE_TRACK_USAGE=false PYTHONHASHSEED=0
exec python -m jobs.main_job "$@"
