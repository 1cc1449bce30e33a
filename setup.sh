#!/bin/sh
# lorastrap bootstrap: from a bare machine to a verified LoRA + 8-bit conda environment.
#
#   curl -fsSL <url>/setup.sh | sh            # or, in a checkout:  sh setup.sh [flags]
#
# Every line is inside a function and `main "$@"` is the last line, so a download cut short runs nothing.
# `sh setup.sh --help` lists the flags and their LORASTRAP_* environment variables.

set -u

say() { printf 'lorastrap: %s\n' "$1" >&2; }
warn() { printf 'lorastrap: warning: %s\n' "$1" >&2; }
err() {
    printf 'lorastrap: error: %s\n' "$1" >&2
    exit "${2:-1}"
}
need_cmd() { command -v "$1" >/dev/null 2>&1 || err "need '$1' (command not found)" 1; }
check_cmd() { command -v "$1" >/dev/null 2>&1; }

usage() {
    cat <<'USAGE'
lorastrap setup.sh: detect the machine, choose a locked LoRA + 8-bit environment, install it, verify it.

usage: sh setup.sh [flags]

  --prefix PATH       install the environment at PATH          (LORASTRAP_PREFIX)
  --name NAME         ... or as NAME under the data dir         (LORASTRAP_NAME)
  --profile NAME      force a profile (cuda12, cuda11, cpu, ...) (LORASTRAP_PROFILE)
  --engine E          auto | micromamba | mamba | rattler       (LORASTRAP_ENGINE)
  --channel URL       conda channel (default conda-forge)       (LORASTRAP_CHANNEL)
  --mirror URL        mirror for conda-forge                    (LORASTRAP_MIRROR)
  --envs-dir PATH     profiles folder (default envs/)           (LORASTRAP_ENVS_DIR)
  --frozen            use only committed locks, never re-lock   (LORASTRAP_FROZEN=1)
  --yes               do not ask                                (LORASTRAP_YES=1)
  --dry-run           detect and plan only; change nothing      (LORASTRAP_DRY_RUN=1)
  --json              print the result as JSON                  (LORASTRAP_JSON=1)
  --report FILE       write the JSON report to FILE             (LORASTRAP_REPORT)
  --verbose/--quiet   more / less narration                     (LORASTRAP_VERBOSE=1 / LORASTRAP_QUIET=1)
  --help              this text

Other variables: LORASTRAP_HOME (data dir; default $XDG_DATA_HOME/lorastrap or ~/.local/share/lorastrap),
LORASTRAP_PYTHON (the python3 to build the runtime with).
Exit codes: 0 ok, 1 internal, 2 usage, 3 no profile fits, 4 bad config, 5 network, 6 checksum,
7 disk, 8 busy, 9 verification failed, 10 no runtime possible, 130 interrupted.
USAGE
}

# The project checkout this script belongs to (when run as `sh setup.sh` from a checkout).
find_root() {
    _dir=$(dirname "$0")
    if [ -f "$_dir/installer/__main__.py" ] && [ -f "$_dir/requirements.txt" ]; then
        (cd "$_dir" && pwd)
        return 0
    fi
    return 1
}

data_dir() {
    if [ -n "${LORASTRAP_HOME:-}" ]; then
        printf '%s\n' "$LORASTRAP_HOME"
    else
        printf '%s/lorastrap\n' "${XDG_DATA_HOME:-$HOME/.local/share}"
    fi
}

# A python3 >= 3.10 with a working venv module, or nothing.
find_python() {
    for _py in ${LORASTRAP_PYTHON:-} python3 python3.13 python3.12 python3.11 python3.10; do
        check_cmd "$_py" || continue
        if "$_py" -c 'import sys; sys.exit(0 if sys.version_info >= (3, 10) else 1)' 2>/dev/null; then
            command -v "$_py"
            return 0
        fi
    done
    return 1
}

sha256_of() {
    if check_cmd sha256sum; then
        sha256sum "$1" | cut -d' ' -f1
    else
        shasum -a 256 "$1" | cut -d' ' -f1
    fi
}

# The runtime: a private venv in the data dir with the hash-pinned requirements; reused while they are unchanged.
ensure_runtime() {
    _root="$1"
    _venv="$(data_dir)/runtime"
    _want=$(sha256_of "$_root/requirements.txt")
    if [ -x "$_venv/bin/python" ] && [ "$(cat "$_venv/.requirements.sha256" 2>/dev/null)" = "$_want" ]; then
        printf '%s\n' "$_venv/bin/python"
        return 0
    fi
    _py=$(find_python) || err "no python3 >= 3.10 found; install one (e.g. 'apt-get install python3 python3-venv') and run again" 10
    if ! "$_py" -c 'import venv, ensurepip' 2>/dev/null; then
        _v=$("$_py" -c 'import sys; print("%d.%d" % sys.version_info[:2])')
        err "$_py has no working venv/ensurepip; on Debian/Ubuntu: 'sudo apt-get install python${_v}-venv'" 10
    fi
    say "creating the runtime in $_venv (from requirements.txt)"
    rm -rf "$_venv.tmp"
    "$_py" -m venv "$_venv.tmp" >&2 || err "could not create a virtual environment in $_venv.tmp" 10
    "$_venv.tmp/bin/python" -m pip install -q --disable-pip-version-check --require-hashes \
        -r "$_root/requirements.txt" >&2 || err "could not install lorastrap's runtime requirements (network? see above)" 5
    printf '%s\n' "$_want" >"$_venv.tmp/.requirements.sha256"
    rm -rf "$_venv"
    mv "$_venv.tmp" "$_venv" || err "could not move the runtime into place at $_venv" 1
    printf '%s\n' "$_venv/bin/python"
}

main() {
    _args=""
    _dry_run="${LORASTRAP_DRY_RUN:-}"
    for _a in "$@"; do
        case "$_a" in
            --help | -h)
                usage
                return 0
                ;;
            --dry-run) _dry_run=1 ;;
        esac
    done
    _root=$(find_root) || err "run setup.sh from a lorastrap checkout (piped installs come with the bootstrap issue)" 2
    _python=$(ensure_runtime "$_root") || exit $?
    if [ -n "$_dry_run" ]; then
        say "dry run: detecting this machine and planning; nothing is changed"
        PYTHONPATH="$_root" "$_python" -m installer detect || return $?
        _filtered=""
        # Only the flags plan understands.
        while [ $# -gt 0 ]; do
            case "$1" in
                --profile | --envs-dir) _filtered="$_filtered $1 $2"; shift ;;
                --json) _filtered="$_filtered $1" ;;
            esac
            shift
        done
        # shellcheck disable=SC2086 # word splitting of the collected flags is intended
        PYTHONPATH="$_root" "$_python" -m installer plan $_filtered
        return $?
    fi
    : "$_args"
    PYTHONPATH="$_root" exec "$_python" -m installer install "$@"
}

main "$@" || exit $?
