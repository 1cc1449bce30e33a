#!/bin/sh
# Try lorastrap here, without a conda channel:   sh scripts/try.sh [install flags]
#
# Builds only what that needs, in its own folder ($LORASTRAP_TRY_HOME, default ${TMPDIR:-/tmp}/lorastrap-try):
# lorastrap's runtime in data/ (setup.sh's, from the hash-pinned requirements.txt; reused while that file is unchanged) and
# the test channel of real conda packages (scripts/testchannel.py); serves the channel on a free loopback port
# (printed), runs `lorastrap install` from it (into $LORASTRAP_TRY_HOME/lora unless --prefix/--name is given), and
# stops the server at the end, also on failure or Ctrl-C.  LORASTRAP_TRY_PYTHON: a Python that already has
# requirements.txt installed (skips building the runtime).

set -u

say() {
    printf 'try: %s\n' "$1" >&2
}

# A word single-quoted for sh.
sq() {
    printf "'%s'" "$(printf '%s' "$1" | sed "s/'/'\\\\''/g")"
}

main() {
    root=$(cd "$(dirname "$0")/.." && pwd)
    home="${LORASTRAP_TRY_HOME:-${TMPDIR:-/tmp}/lorastrap-try}"
    mkdir -p "$home" || return 16
    home=$(cd "$home" && pwd)
    data="$home/data"  # lorastrap's data dir for the trial (runtime, package cache, locks)
    if [ -n "${LORASTRAP_TRY_PYTHON:-}" ]; then
        py="$LORASTRAP_TRY_PYTHON"
    else
        say "lorastrap's runtime in $data/runtime (setup.sh builds it; about a minute the first time)"
        LORASTRAP_HOME="$data" sh "$root/setup.sh" --dry-run >/dev/null || return $?
        py="$data/runtime/bin/python"
    fi
    if [ ! -f "$home/tc/channel/noarch/repodata.json" ]; then
        say "building the test channel in $home/tc (real .conda packages shaped like the LoRA stack)"
        rm -rf "$home/tc"
        "$py" "$root/scripts/testchannel.py" build "$home/tc" || return $?
    fi
    out="$home/server.out"
    : >"$out"
    "$py" "$root/scripts/testchannel.py" serve "$home/tc" 0 >"$out" 2>&1 &
    server=$!
    trap 'kill "$server" 2>/dev/null; wait "$server" 2>/dev/null; say "server stopped"' EXIT
    trap 'exit 130' INT TERM HUP
    tries=0
    while ! grep -q '^channel: ' "$out"; do
        if ! kill -0 "$server" 2>/dev/null || [ "$tries" -ge 100 ]; then
            say "the test channel's server did not start:"
            cat "$out" >&2
            return 5
        fi
        tries=$((tries + 1))
        sleep 0.1
    done
    base=$(sed -n 's|^channel: \(http://127\.0\.0\.1:[0-9]*\)/channel .*|\1|p' "$out")
    say "serving the test channel at $base/channel and its pip index at $base/simple (stopped at the end)"
    where=""
    for a in "$@"; do
        case "$a" in
            --prefix | --prefix=* | --name | --name=*) where=given ;;
        esac
    done
    [ -n "$where" ] || set -- --prefix "$home/lora" "$@"
    # how lorastrap's hints name the command: runnable as printed, with this data dir and this source
    LORASTRAP_COMMAND="LORASTRAP_HOME=$(sq "$data") PYTHONPATH=$(sq "$root/installer") $(sq "$py") -m lorastrap"
    export LORASTRAP_COMMAND
    LORASTRAP_HOME="$data" PYTHONPATH="$root/installer" \
        "$py" -m lorastrap install --envs-dir "$root/tests/envs" --channel "$base/channel" \
        --pip-index-url "$base/simple" "$@"
}

main "$@"
