#!/usr/bin/env bash
# The whole test suite, as CI runs it: set up .venv, lint and type-check, then every test (slow ones
# included) with the `ci` hypothesis profile. Extra arguments go to pytest, e.g. locally:
#   bash scripts/test.sh -m "not slow"          # skip crash loops and long runs
#   HYPOTHESIS_PROFILE=dev bash scripts/test.sh  # fewer examples
source "$(dirname "$0")/setup-env.sh"
if ! command -v strace >/dev/null 2>&1; then  # tests count the store's fsyncs with it (test_conformance_docs.py)
  echo "setup: installing strace" >&2
  apt_install strace
fi
export HYPOTHESIS_PROFILE="${HYPOTHESIS_PROFILE:-ci}"
echo "== ruff" && ruff check .
echo "== mypy" && mypy
echo "== pytest (hypothesis profile: $HYPOTHESIS_PROFILE)"
set +e
python -m pytest "$@"
rc=$?
set -e
# 5 = "no tests collected": a marker that selects nothing is not a failure
if [ "$rc" -eq 5 ]; then rc=0; fi
exit "$rc"
