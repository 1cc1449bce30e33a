#!/bin/sh
# Set up everything the tests need on a fresh machine, then run them:  sh scripts/test.sh [pytest args]
# Creates .venv (the tool's runtime from the hash-pinned requirements.txt, plus requirements-dev.txt, plus lorastrap
# itself as an editable install) and reuses it while those files are unchanged.
set -eu

main() {
    root=$(cd "$(dirname "$0")/.." && pwd)
    cd "$root"
    py=${PYTHON:-python3}
    stamp=$(cat requirements.txt requirements-dev.txt pyproject.toml | sha256sum | cut -d' ' -f1)
    if [ ! -x .venv/bin/python ] || [ "$(cat .venv/.lorastrap-stamp 2>/dev/null)" != "$stamp" ]; then
        echo "test.sh: creating .venv" >&2
        rm -rf .venv
        "$py" -m venv .venv
        .venv/bin/python -m pip install -q --disable-pip-version-check --require-hashes -r requirements.txt
        .venv/bin/python -m pip install -q --disable-pip-version-check -r requirements-dev.txt
        .venv/bin/python -m pip install -q --disable-pip-version-check --no-deps -e .
        echo "$stamp" > .venv/.lorastrap-stamp
    fi
    exec .venv/bin/python -m pytest "$@"
}

main "$@"
