#!/usr/bin/env bash
# The benchmark report from a fresh clone: make .venv as the tests do (scripts/setup-env.sh), then run
# `python -m bench.report` with these arguments (none: --quick). It runs the suite, writes JSON and PNG plots
# to bench/results/ and rewrites the "Latest results" section of bench/README.md. For example:
#   bash scripts/bench.sh                               # quick mode of every bench
#   bash scripts/bench.sh --full                        # full mode
#   bash scripts/bench.sh --quick --only compaction     # one bench (the README still shows every result)
#   bash scripts/bench.sh --no-run                      # plots and README from the JSONs present
source "$(dirname "$0")/setup-env.sh"
export DO_NOT_TRACK=1 VLLM_NO_USAGE_STATS=1 LMCACHE_TRACK_USAGE=false PYTHONHASHSEED=0
[ "$#" -gt 0 ] || set -- --quick
exec python -m bench.report "$@"
