#!/usr/bin/env bash
# The main job. Until the LMCache connector lands this is the embedded demo: it writes KV tensors and
# agent-memory chunk records into a store, reopens it, reads everything back verified, and prints stats.
source "$(dirname "$0")/setup-env.sh"
exec python -m blockstore.demo "$@"
