#!/bin/sh
# lorastrap bootstrap: from a bare machine to a verified LoRA + 8-bit conda environment.
#
#   curl -fsSL https://<host>/setup.sh | LORASTRAP_SOURCE_URL=https://<host>/lorastrap.tar.gz sh
#   sh setup.sh [flags]                       # from a checkout
#
# Every line is inside a function and `main "$@"` is the last line: a download cut short runs nothing.
# `sh setup.sh --help` lists the flags and their LORASTRAP_* variables.  Exit codes are the CLI's (README).

set -u

EXIT_USAGE=2
EXIT_NETWORK=5
EXIT_INTEGRITY=6
EXIT_PREREQ=10
MICROMAMBA_VERSION_DEFAULT="2.0.5-0"
SETUP_MARKER="# added by lorastrap setup.sh"

# Narration on stderr, and into the run's log (the log holds everything, also of runs that succeed).
say() {
    if [ -z "${LORASTRAP_QUIET:-}" ]; then
        printf 'lorastrap: %s\n' "$1" >&2
    fi
    to_log "lorastrap: $1"
}

to_log() {
    if [ -n "${_log:-}" ]; then
        printf '%s\n' "$1" >>"$_log" 2>/dev/null || true
    fi
}

warn() {
    printf 'lorastrap: warning: %s\n' "$1" >&2
    to_log "lorastrap: warning: $1"
}

err() {
    printf 'lorastrap: error: %s\n' "$1" >&2
    to_log "lorastrap: error: $1"
    if [ -n "${_log:-}" ] && [ -s "$_log" ]; then
        printf 'lorastrap: the full log is %s\n' "$_log" >&2
    fi
    if [ -n "${_json:-}" ]; then  # --json: every error as JSON on stdout too, as lorastrap prints them
        printf '{"error": "%s", "what": "%s", "why": "", "fix": "%s", "exit_code": %s}\n' \
            "$(json_str "${3:-SetupError}")" "$(json_str "$1")" "$(json_str "${4:-}")" "${2:-1}"
    fi
    exit "${2:-1}"
}

# A string as the inside of a JSON string: backslash and double quote escaped, control characters as spaces.
json_str() {
    printf '%s' "$1" | tr '\001-\037' ' ' | sed -e 's/\\/\\\\/g' -e 's/"/\\"/g'
}

usage_err() {
    err "$1" "$EXIT_USAGE" UsageError "See 'sh setup.sh --help'."
}

check_cmd() {
    command -v "$1" >/dev/null 2>&1
}

need_cmd() {
    if ! check_cmd "$1"; then
        err "need '$1' (command not found)" "$EXIT_PREREQ"
    fi
}

usage() {
    cat <<'USAGE'
lorastrap setup.sh: detect the machine, choose a locked LoRA + 8-bit conda environment, install it, verify it.

usage: sh setup.sh [flags]            (or piped: curl -fsSL URL/setup.sh | sh -s -- [flags])

  --prefix PATH        install the environment at PATH              LORASTRAP_PREFIX
  --name NAME          ... or as NAME in the data dir (default lora) LORASTRAP_NAME
  --profile NAME       force a profile (cuda12, cuda11, cpu, ...)    LORASTRAP_PROFILE
  --engine E           auto | micromamba | mamba | rattler           LORASTRAP_ENGINE
  --channel URL        conda channel to lock from                    LORASTRAP_CHANNEL
  --mirror URL         mirror of the lock's channel                  LORASTRAP_MIRROR
  --pip-index-url URL  index for the spec's pip: entries             LORASTRAP_PIP_INDEX_URL
  --envs-dir PATH      profiles folder (default: envs/)              LORASTRAP_ENVS_DIR
  --bundle PATH        install offline from a bundle (folder/.tar)   LORASTRAP_BUNDLE
  --frozen             install only from committed locks             LORASTRAP_FROZEN=1
  --reverify           verify also when already up to date (fleets)  LORASTRAP_REVERIFY=1
  --frozen             install only from committed locks (exit 19 when there is none)  LORASTRAP_FROZEN=1
  --no-verify          skip the verification run (the smoke test still runs)  LORASTRAP_NO_VERIFY=1
  --keep-backup        keep the previous environment as PREFIX.lorastrap-backup  LORASTRAP_KEEP_BACKUP=1
  --link-mode MODE     hardlink (default) | copy                     LORASTRAP_LINK_MODE
  --no-wait            fail at once if another run holds the prefix  LORASTRAP_NO_WAIT=1
  --min-free-mib N     disk to keep free beyond the install (512)    LORASTRAP_MIN_FREE_MIB
  --yes                never ask (setup.sh never asks anyway)        LORASTRAP_YES=1
  --dry-run            detect and plan only; change nothing          LORASTRAP_DRY_RUN=1
  --json               print the result as JSON on stdout (errors too)  LORASTRAP_JSON=1
  --report FILE        write the JSON result to FILE (also with --dry-run)  LORASTRAP_REPORT
  --debug, --verbose   more detail (tracebacks on errors)            LORASTRAP_DEBUG=1
  --quiet              only errors and the result                    LORASTRAP_QUIET=1
  --no-modify-path     leave shell profiles alone (print the line)   LORASTRAP_NO_MODIFY_PATH=1
  --help               this text

Every flag with a value also takes the form --flag=VALUE, as lorastrap's own flags do.

More variables:
  LORASTRAP_HOME            data dir (runtime, package cache, logs, environments);
                            default $XDG_DATA_HOME/lorastrap, else ~/.local/share/lorastrap
  LORASTRAP_PYTHON          the python3 (>= 3.10) to build lorastrap's runtime with
  XDG_BIN_HOME              where the lorastrap command goes (default ~/.local/bin)
  LORASTRAP_SOURCE_URL      when piped: lorastrap's source archive (.tar.gz) to fetch
  LORASTRAP_SOURCE_SHA256   its expected sha256 (checked when given)
  LORASTRAP_MICROMAMBA_URL  where to fetch micromamba when no usable python3 exists
  LORASTRAP_MICROMAMBA_SHA256  its pinned sha256 (else the release's .sha256 file is used)
  TMPDIR                    temporary files (a noexec TMPDIR is detected and avoided)

Exit codes: 0 ok, 1 internal, 2 usage, 3 no profile fits, 4 bad config, 5 network, 6 checksum,
7 disk, 8 busy, 9 verification failed, 10 a prerequisite is missing (python3/venv, curl/wget), 16 a folder is
not writable (read-only filesystem or permissions), 17 the target is not lorastrap's (--force), 18 a package
would write outside its environment, 19 --frozen without a committed lock, 130 interrupted (lorastrap --help lists
them all).
USAGE
}

data_dir() {
    if [ -n "${LORASTRAP_HOME:-}" ]; then
        printf '%s\n' "$LORASTRAP_HOME"
    else
        printf '%s/lorastrap\n' "${XDG_DATA_HOME:-$HOME/.local/share}"
    fi
}

# uname → conda platform, through an explicit list (corrected for Rosetta 2 on macOS).
get_platform() {
    _os=$(uname -s)
    _cpu=$(uname -m)
    if [ "$_os" = Darwin ] && [ "$_cpu" = x86_64 ]; then
        if [ "$(sysctl -n sysctl.proc_translated 2>/dev/null || true)" = 1 ]; then
            _cpu=arm64
        fi
    fi
    case "$_os/$_cpu" in
        Linux/x86_64 | Linux/amd64) echo linux-64 ;;
        Linux/aarch64 | Linux/arm64) echo linux-aarch64 ;;
        Linux/ppc64le) echo linux-ppc64le ;;
        Darwin/arm64) echo osx-arm64 ;;
        Darwin/x86_64) echo osx-64 ;;
        *) return 1 ;;
    esac
}

# A temporary folder where files can be executed (TMPDIR honoured; a noexec mount detected and avoided).
make_tmp() {
    _base="${TMPDIR:-/tmp}"
    _t=$(mktemp -d "$_base/lorastrap.XXXXXX" 2>/dev/null) || _t=""
    if [ -n "$_t" ]; then
        printf '#!/bin/sh\nexit 0\n' >"$_t/probe.sh"
        chmod +x "$_t/probe.sh"
        if "$_t/probe.sh" 2>/dev/null; then
            rm -f "$_t/probe.sh"
            printf '%s\n' "$_t"
            return 0
        fi
        rm -rf "$_t"
        warn "$_base is mounted noexec; using $(data_dir)/tmp instead (set TMPDIR to choose)"
    fi
    mkdir -p "$(data_dir)/tmp" || return 1
    mktemp -d "$(data_dir)/tmp/lorastrap.XXXXXX"
}

sha256_of() {
    if check_cmd sha256sum; then
        sha256sum "$1" | cut -d' ' -f1
    elif check_cmd shasum; then
        shasum -a 256 "$1" | cut -d' ' -f1
    else
        err "need sha256sum or shasum to check downloads" "$EXIT_PREREQ"
    fi
}

# The one downloader: curl, else wget; https only (plain http only to this machine's loopback), TLS >= 1.2,
# retries on server errors, an empty file refused, and the sha256 checked when one is given.
download() {
    _url="$1"
    _dest="$2"
    _want="${3:-}"
    case "$_url" in
        https://*) _https=1 ;;
        http://127.0.0.1[:/]* | http://localhost[:/]* | http://\[::1\][:/]*) _https=0 ;;
        *) err "refusing to download $_url: only https:// URLs are allowed" "$EXIT_USAGE" ;;
    esac
    rm -f "$_dest"
    if check_cmd curl; then
        if [ "$_https" = 1 ]; then
            curl --proto '=https' --tlsv1.2 --silent --show-error --fail --location --retry 3 --retry-delay 1 \
                --output "$_dest" "$_url" || return "$EXIT_NETWORK"
        else
            curl --silent --show-error --fail --location --retry 3 --retry-delay 1 \
                --output "$_dest" "$_url" || return "$EXIT_NETWORK"
        fi
    elif check_cmd wget; then
        if [ "$_https" = 1 ]; then
            wget --https-only --secure-protocol=TLSv1_2 --quiet --tries=4 --waitretry=1 --retry-on-http-error=500,502,503,504 \
                --output-document="$_dest" "$_url" || return "$EXIT_NETWORK"
        else
            wget --quiet --tries=4 --waitretry=1 --retry-on-http-error=500,502,503,504 \
                --output-document="$_dest" "$_url" || return "$EXIT_NETWORK"
        fi
    else
        err "need curl or wget to download $_url (install one, e.g. 'apt-get install curl')" "$EXIT_PREREQ"
    fi
    if [ ! -s "$_dest" ]; then
        rm -f "$_dest"
        warn "the download of $_url is empty"
        return "$EXIT_NETWORK"
    fi
    if [ -n "$_want" ]; then
        _got=$(sha256_of "$_dest")
        if [ "$_got" != "$_want" ]; then
            rm -f "$_dest"
            printf 'lorastrap: error: checksum mismatch for %s\n  want: %s\n  got:  %s\n' "$_url" "$_want" "$_got" >&2
            return "$EXIT_INTEGRITY"
        fi
    fi
    return 0
}

# The project checkout this script runs from, or (piped) the source archive fetched and unpacked.
find_root() {
    _dir=$(dirname "$0")
    if [ -f "$_dir/installer/lorastrap/__main__.py" ] && [ -f "$_dir/requirements.txt" ]; then
        (cd "$_dir" && pwd)
        return 0
    fi
    if [ -n "$_bundle" ] && [ -f "$_bundle/source/installer/lorastrap/__main__.py" ]; then
        (cd "$_bundle/source" && pwd)
        return 0
    fi
    if [ -z "${LORASTRAP_SOURCE_URL:-}" ]; then
        err "not run from a lorastrap checkout and LORASTRAP_SOURCE_URL is not set: set it to lorastrap's source archive (.tar.gz), or run 'sh setup.sh' in a checkout" "$EXIT_USAGE"
    fi
    need_cmd tar
    _src="$(data_dir)/src"
    mkdir -p "$_src" || err "cannot create $_src" 1
    say "fetching lorastrap from $LORASTRAP_SOURCE_URL"
    download "$LORASTRAP_SOURCE_URL" "$_tmp/source.tar.gz" "${LORASTRAP_SOURCE_SHA256:-}" || exit $?
    if [ -z "${LORASTRAP_SOURCE_SHA256:-}" ]; then
        # Said even with LORASTRAP_QUIET: what runs next is whatever that URL served.
        warn "UNCHECKED SOURCE: LORASTRAP_SOURCE_SHA256 is not set, so the archive from $LORASTRAP_SOURCE_URL (sha256 $(sha256_of "$_tmp/source.tar.gz")) runs without a check. Set LORASTRAP_SOURCE_SHA256 to the sha256 its release page publishes."
    fi
    _into="$_src/$(sha256_of "$_tmp/source.tar.gz" | cut -c1-16)"
    if [ ! -f "$_into/installer/lorastrap/__main__.py" ]; then
        rm -rf "$_into.part"
        mkdir -p "$_into.part" || exit 1
        tar -xzf "$_tmp/source.tar.gz" -C "$_into.part" || err "the source archive is not a .tar.gz" "$EXIT_INTEGRITY"
        # Archives made by `git archive --prefix=x/` hold one top folder: use it.
        _top="$_into.part"
        if [ ! -f "$_top/installer/lorastrap/__main__.py" ]; then
            for _d in "$_into.part"/*; do
                if [ -f "$_d/installer/lorastrap/__main__.py" ]; then _top="$_d"; fi
            done
        fi
        [ -f "$_top/installer/lorastrap/__main__.py" ] || err "the source archive holds no lorastrap (installer/lorastrap/__main__.py)" "$EXIT_INTEGRITY"
        rm -rf "$_into"
        mv "$_top" "$_into" || exit 1
        rm -rf "$_into.part"
    fi
    printf '%s\n' "$_into"
}

# A python3 >= 3.10, or nothing.
find_python() {
    for _py in ${LORASTRAP_PYTHON:-} python3 python3.13 python3.12 python3.11 python3.10; do
        if check_cmd "$_py" && "$_py" -c 'import sys; sys.exit(0 if sys.version_info >= (3, 10) else 1)' 2>/dev/null; then
            command -v "$_py"
            return 0
        fi
    done
    return 1
}

# lorastrap's own runtime, reused while requirements.txt is unchanged: a venv from python3, else micromamba.
ensure_runtime() {
    _root="$1"
    _rt="$(data_dir)/runtime"
    _want=$(sha256_of "$_root/requirements.txt")
    if [ -x "$_rt/bin/python" ] && [ "$(cat "$_rt/.requirements.sha256" 2>/dev/null)" = "$_want" ]; then
        say "reusing the runtime in $_rt"
        RUNTIME_PY="$_rt/bin/python"
        return 0
    fi
    if _py=$(find_python); then
        if ! "$_py" -c 'import venv, ensurepip' 2>/dev/null; then
            _v=$("$_py" -c 'import sys; print("%d.%d" % sys.version_info[:2])')
            err "$_py has no working venv module: on Debian/Ubuntu run 'sudo apt-get install python$_v-venv' (or python3-venv), then run setup.sh again" "$EXIT_PREREQ"
        fi
        say "creating the runtime in $_rt with $_py (requirements.txt, hashes required; once, about a minute)"
        rm -rf "$_rt.part"
        "$_py" -m venv "$_rt.part" >&2 || err "could not create a virtual environment in $_rt.part" "$EXIT_PREREQ"
        if [ -n "$_bundle" ]; then  # offline: the bundle's wheels only (inside it, or in the store beside it)
            set -- --no-index
            for _w in "$_bundle/runtime/wheels" "$(dirname "$_bundle")/lorastrap-runtime/wheels"; do
                [ -d "$_w" ] && set -- "$@" --find-links "$_w"
            done
            [ "$#" -gt 1 ] || err "lorastrap's runtime wheels for $_bundle are missing: they are in lorastrap-runtime/ beside the bundle where it was built (one folder for all the bundles made there); copy it to $(dirname "$_bundle")/lorastrap-runtime and run setup.sh again" "$EXIT_INTEGRITY"
        else
            set --
        fi
        say "installing lorastrap's runtime packages (each named as pip fetches it)"
        runtime_pip "$_rt.part/bin/python" "$@" ||
            err "could not install lorastrap's runtime from requirements.txt (network or proxy? see above)" "$EXIT_NETWORK"
    else
        runtime_from_micromamba "$_root" "$_rt.part" || exit $?
    fi
    printf '%s\n' "$_want" >"$_rt.part/.requirements.sha256"
    rm -rf "$_rt"
    mv "$_rt.part" "$_rt" || err "could not move the runtime into $_rt" 1
    RUNTIME_PY="$_rt/bin/python"
}

find_micromamba() {
    for _m in "${MAMBA_EXE:-}" "$(command -v micromamba 2>/dev/null || true)" "$(data_dir)/bin/micromamba"; do
        if [ -n "$_m" ] && [ -x "$_m" ]; then
            printf '%s\n' "$_m"
            return 0
        fi
    done
    return 1
}

runtime_from_micromamba() {
    _root="$1"
    _dest="$2"
    if ! _mm=$(find_micromamba); then
        _plat=$(get_platform) || _plat=unknown
        _ver="${LORASTRAP_MICROMAMBA_VERSION:-$MICROMAMBA_VERSION_DEFAULT}"
        _url="${LORASTRAP_MICROMAMBA_URL:-https://github.com/mamba-org/micromamba-releases/releases/download/$_ver/micromamba-$_plat}"
        _sum="${LORASTRAP_MICROMAMBA_SHA256:-}"
        say "no python3 >= 3.10 with venv here: fetching micromamba from $_url"
        if [ -z "$_sum" ]; then
            if download "$_url.sha256" "$_tmp/micromamba.sha256"; then
                _sum=$(cut -d' ' -f1 <"$_tmp/micromamba.sha256")
            fi
        fi
        if [ -z "$_sum" ] || ! download "$_url" "$_tmp/micromamba" "$_sum"; then
            err "no python3 >= 3.10 (with venv) and no micromamba could be had. Ways out: install python3 (>= 3.10) and its venv package ('apt-get install python3 python3-venv', 'dnf install python3'); or put micromamba on PATH / set MAMBA_EXE; or set LORASTRAP_MICROMAMBA_URL (+ LORASTRAP_MICROMAMBA_SHA256) to a reachable copy" "$EXIT_PREREQ"
        fi
        mkdir -p "$(data_dir)/bin"
        chmod +x "$_tmp/micromamba"
        mv "$_tmp/micromamba" "$(data_dir)/bin/micromamba"
        _mm="$(data_dir)/bin/micromamba"
    fi
    say "creating the runtime with $_mm from envs/runtime.yml"
    MAMBA_ROOT_PREFIX="$(data_dir)/mamba-root" "$_mm" create --yes --no-rc --prefix "$_dest" \
        --file "$_root/envs/runtime.yml" >&2 || err "micromamba could not create the runtime (network? a mirror: --mirror)" "$EXIT_NETWORK"
    runtime_pip "$_dest/bin/python" || err "could not install lorastrap's runtime requirements" "$EXIT_NETWORK"
}

# pip install -r requirements.txt into the runtime: its progress (one line a package) on stderr and in the log.
runtime_pip() {
    _rpy="$1"
    shift
    if [ -n "${LORASTRAP_QUIET:-}" ]; then
        set -- --quiet "$@"
    fi
    _pst="$_tmp/pip-status"
    {
        "$_rpy" -m pip install --disable-pip-version-check --progress-bar off --require-hashes "$@" \
            -r "$_root/requirements.txt" 2>&1
        echo "$?" >"$_pst"
    } | while IFS= read -r _l; do
        case "$_l" in
            Collecting*) printf 'lorastrap:   %s\n' "${_l%% (from*}" >&2 ;;
            Installing*) printf 'lorastrap:   installing the packages collected\n' >&2 ;;
            ERROR* | error*) printf 'lorastrap:   %s\n' "$_l" >&2 ;;
        esac
        to_log "$_l"
    done
    [ "$(cat "$_pst" 2>/dev/null)" = 0 ]
}

# --- the lorastrap command on the PATH -----------------------------------------------------------------------
# Everything written outside the data dir is recorded in DATA/shell-setup ("launcher|profile|created|dir PATH"),
# which `lorastrap self uninstall` reads to take it all back.

bin_dir() {
    printf '%s\n' "${XDG_BIN_HOME:-$HOME/.local/bin}"
}

# A word single-quoted for sh.
sq() {
    printf "'%s'" "$(printf '%s' "$1" | sed "s/'/'\\\\''/g")"
}

record_edit() {
    _rec="$(data_dir)/shell-setup"
    if ! grep -qxF "$1 $2" "$_rec" 2>/dev/null; then
        printf '%s %s\n' "$1" "$2" >>"$_rec"
    fi
}

# mkdir -p that records the folders it created (outside the data dir), deepest last.
make_dir() {
    _new=""
    _d="$1"
    while [ -n "$_d" ] && [ "$_d" != / ] && [ ! -d "$_d" ]; do
        _new="$_d
$_new"
        _d=$(dirname "$_d")
    done
    mkdir -p "$1" || return 1
    printf '%s' "$_new" | while IFS= read -r _d; do
        [ -n "$_d" ] && record_edit dir "$_d"
    done
    return 0
}

# Write FILE with CONTENT only when it differs, so a rerun changes nothing.
write_if_changed() {
    if [ -f "$1" ] && [ "$(cat "$1")" = "$2" ]; then
        return 0
    fi
    printf '%s\n' "$2" >"$1.tmp.$$" && mv "$1.tmp.$$" "$1"
}

# Append LINE to FILE once; returns 1 when it was there already.
add_line() {
    if [ -f "$1" ] && grep -qF "$2" "$1"; then
        return 1
    fi
    if [ -f "$1" ]; then
        record_edit profile "$1"
        if [ -n "$(tail -c 1 "$1")" ]; then
            printf '\n' >>"$1"
        fi
    else
        record_edit created "$1"
    fi
    printf '%s\n' "$2" >>"$1"
}

# The folder of the launcher on the PATH: the shell profiles source DATA/env (DATA/env.fish for fish), which adds
# it once; or, with --no-modify-path, the line to add is printed.
ensure_on_path() {
    _bin="$1"
    case ":${PATH:-}:" in
        *":$_bin:"*) return 0 ;;
    esac
    if [ -n "$_no_modify_path" ]; then
        say "$_bin is not on your PATH; add this line where setup.sh would have (~/.profile, ~/.bashrc, and ~/.zshenv for zsh):"
        say "    export PATH=\"$_bin:\$PATH\""
        say "(fish: fish_add_path $(sq "$_bin"))"
        return 0
    fi
    _env="$(data_dir)/env"
    write_if_changed "$_env" "# lorastrap: puts $_bin on the PATH (setup.sh wrote it; your shell profile sources it)
case \":\${PATH}:\" in
    *:$(sq "$_bin"):*) ;;
    *) export PATH=$(sq "$_bin")\"\${PATH:+:\$PATH}\" ;;
esac"
    _line="if [ -f $(sq "$_env") ]; then . $(sq "$_env"); fi  $SETUP_MARKER"
    _changed=""
    _zshenv="${ZDOTDIR:-$HOME}/.zshenv"
    for _prof in "$HOME/.profile" "$HOME/.bash_profile" "$HOME/.bash_login" "$HOME/.bashrc" "$_zshenv"; do
        if [ "$_prof" = "$_zshenv" ]; then
            [ -f "$_prof" ] || check_cmd zsh || continue
        elif [ "$_prof" != "$HOME/.profile" ]; then
            [ -f "$_prof" ] || continue
        fi
        if add_line "$_prof" "$_line"; then
            _changed="$_changed $_prof"
        fi
    done
    _fishconf="${XDG_CONFIG_HOME:-$HOME/.config}/fish"
    if check_cmd fish || [ -d "$_fishconf" ]; then
        write_if_changed "$_env.fish" "# lorastrap: puts $_bin on the PATH (setup.sh wrote it; fish's conf.d sources it)
contains -- $(sq "$_bin") \$PATH; or set -gx PATH $(sq "$_bin") \$PATH"
        make_dir "$_fishconf/conf.d" || return 0
        if add_line "$_fishconf/conf.d/lorastrap.fish" "if test -f $(sq "$_env.fish"); source $(sq "$_env.fish"); end  $SETUP_MARKER"; then
            _changed="$_changed $_fishconf/conf.d/lorastrap.fish"
        fi
    fi
    if [ -n "$_changed" ]; then
        say "added $_bin to the PATH in$_changed (--no-modify-path leaves them alone)"
    fi
    say "open a new terminal for the lorastrap command, or run now: . $(sq "$_env")"
}

# The lorastrap command: the runtime imports the source through a .pth file, and a launcher in $XDG_BIN_HOME or
# ~/.local/bin runs it.  Piped mode keeps the source in the data dir (src/), so the command outlives the download.
install_launcher() {
    _root="$1"
    _sp=$("$RUNTIME_PY" -c 'import sysconfig; print(sysconfig.get_path("purelib"))') || return 1
    write_if_changed "$_sp/lorastrap-source.pth" "$_root/installer"
    _bin=$(bin_dir)
    if ! make_dir "$_bin"; then
        warn "cannot create $_bin: no lorastrap command (run it as: $RUNTIME_PY -m lorastrap)"
        return 0
    fi
    _launcher="$_bin/lorastrap"
    if [ -e "$_launcher" ] && ! grep -q 'lorastrap launcher' "$_launcher" 2>/dev/null; then
        warn "$_launcher exists and is not lorastrap's launcher: left as it is (run lorastrap as: $RUNTIME_PY -m lorastrap)"
        return 0
    fi
    write_if_changed "$_launcher" "#!/bin/sh
# lorastrap launcher, written by setup.sh: the lorastrap command, run by its runtime in $(data_dir)
LORASTRAP_HOME=\"\${LORASTRAP_HOME:-\"$(data_dir)\"}\"
LORASTRAP_COMMAND=\"\$0\"  # how fix lines name this command
export LORASTRAP_HOME LORASTRAP_COMMAND
exec $(sq "$RUNTIME_PY") -m lorastrap \"\$@\""
    chmod +x "$_launcher"
    record_edit launcher "$_launcher"
    ensure_on_path "$_bin"
}

# Run lorastrap with the full narration copied to a log file; the log's path is printed on failure.
run_logged() {
    _log="$1"
    shift
    _status="$_tmp/status"
    {
        "$@"
        echo "$?" >"$_status"
    } 2>&1 1>&3 | tee -a "$_log" >&2
    _rc=$(cat "$_status" 2>/dev/null || echo 1)
    if [ "$_rc" != 0 ]; then
        printf 'lorastrap: failed (exit %s); the full log is %s\n' "$_rc" "$_log" >&2
    fi
    return "$_rc"
}

main() {
    _prefix="${LORASTRAP_PREFIX:-}"
    _name="${LORASTRAP_NAME:-}"
    _profile="${LORASTRAP_PROFILE:-}"
    _engine="${LORASTRAP_ENGINE:-}"
    _channel="${LORASTRAP_CHANNEL:-}"
    _mirror="${LORASTRAP_MIRROR:-}"
    _pipidx="${LORASTRAP_PIP_INDEX_URL:-}"
    _envs="${LORASTRAP_ENVS_DIR:-}"
    _frozen="${LORASTRAP_FROZEN:-}"
    _reverify="${LORASTRAP_REVERIFY:-}"
    _dry="${LORASTRAP_DRY_RUN:-}"
    _json="${LORASTRAP_JSON:-}"
    _report="${LORASTRAP_REPORT:-}"
    _verbose="${LORASTRAP_DEBUG:-${LORASTRAP_VERBOSE:-}}"
    _bundle="${LORASTRAP_BUNDLE:-}"
    _no_modify_path="${LORASTRAP_NO_MODIFY_PATH:-}"
    _no_verify="${LORASTRAP_NO_VERIFY:-}"
    _keep_backup="${LORASTRAP_KEEP_BACKUP:-}"
    _link_mode="${LORASTRAP_LINK_MODE:-}"
    _no_wait="${LORASTRAP_NO_WAIT:-}"
    _min_free="${LORASTRAP_MIN_FREE_MIB:-}"
    for _a in "$@"; do  # --json anywhere: an argument error before it is printed as JSON too
        [ "$_a" = --json ] && _json=1
    done
    while [ $# -gt 0 ]; do
        case "$1" in
            --prefix=* | --name=* | --profile=* | --engine=* | --channel=* | --mirror=* | --pip-index-url=* | \
                --envs-dir=* | --report=* | --bundle=* | --link-mode=* | --min-free-mib=*)
                _a="$1"
                shift
                set -- "${_a%%=*}" "${_a#*=}" "$@"  # --flag=VALUE is --flag VALUE
                continue
                ;;
            --frozen=* | --no-verify=* | --keep-backup=* | --no-wait=* | --yes=* | --dry-run=* | --json=* | \
                --debug=* | --verbose=* | --quiet=* | --no-modify-path=* | --help=*)
                usage_err "${1%%=*} takes no value (see 'sh setup.sh --help')" ;;
        esac
        case "$1" in
            --help | -h)
                usage
                return 0
                ;;
            --prefix | --name | --profile | --engine | --channel | --mirror | --pip-index-url | --envs-dir | --report | --bundle | --link-mode | --min-free-mib)
                [ $# -ge 2 ] || usage_err "$1 needs a value (see 'sh setup.sh --help')"
                case "$1" in
                    --prefix) _prefix="$2" ;;
                    --name) _name="$2" ;;
                    --profile) _profile="$2" ;;
                    --engine) _engine="$2" ;;
                    --channel) _channel="$2" ;;
                    --mirror) _mirror="$2" ;;
                    --pip-index-url) _pipidx="$2" ;;
                    --envs-dir) _envs="$2" ;;
                    --report) _report="$2" ;;
                    --bundle) _bundle="$2" ;;
                    --link-mode) _link_mode="$2" ;;
                    --min-free-mib) _min_free="$2" ;;
                esac
                shift
                ;;
            --frozen) _frozen=1 ;;
            --reverify) _reverify=1 ;;
            --no-verify) _no_verify=1 ;;
            --keep-backup) _keep_backup=1 ;;
            --no-wait) _no_wait=1 ;;
            --yes | -y) LORASTRAP_YES=1 ;;
            --dry-run) _dry=1 ;;
            --json) _json=1 ;;
            --debug | --verbose | -v) _verbose=1 ;;
            --quiet | -q) LORASTRAP_QUIET=1 ;;
            --no-modify-path) _no_modify_path=1 ;;
            *) usage_err "unknown flag '$1' (see 'sh setup.sh --help')" ;;
        esac
        shift
    done
    case "$_link_mode" in
        "" | hardlink | copy) ;;
        *) usage_err "--link-mode '$_link_mode' is not hardlink or copy" ;;
    esac
    case "$_min_free" in
        "" | *[!0-9]*) [ -z "$_min_free" ] || usage_err "--min-free-mib '$_min_free' is not a whole number of MiB" ;;
    esac
    if [ -n "$_report" ]; then  # checked before any work, as lorastrap checks it
        [ -d "$_report" ] && usage_err "--report $_report is a folder (name a file in an existing folder)"
        _rdir=$(dirname "$_report")
        [ -d "$_rdir" ] || usage_err "--report $_report: $_rdir does not exist (name a file in an existing folder)"
        _report="$(cd "$_rdir" && pwd)/${_report##*/}"
    fi
    export LORASTRAP_QUIET
    : "${LORASTRAP_YES:=}"

    _plat=$(get_platform) || err "unsupported platform $(uname -s)/$(uname -m): lorastrap supports linux-64, linux-aarch64, osx-arm64, osx-64 (on Windows: use WSL2)" "$EXIT_USAGE"
    _tmp=$(make_tmp) || err "cannot create a temporary folder (TMPDIR=${TMPDIR:-/tmp})" 1
    TMPDIR="$_tmp"  # pip and lorastrap use it too (a noexec or small TMPDIR breaks them as well)
    export TMPDIR
    trap 'rm -rf "$_tmp"' EXIT
    trap 'rm -rf "$_tmp"; exit 130' INT TERM
    make_dir "$(data_dir)/logs" || err "cannot create $(data_dir)/logs (set LORASTRAP_HOME to a writable folder)" 1
    _log="$(data_dir)/logs/setup-$(date +%Y%m%d-%H%M%S)-$$.log"
    say "platform $_plat; data dir $(data_dir)"

    if [ -n "$_bundle" ]; then
        case "$_bundle" in
            *.tar)
                need_cmd tar
                _unpacked="${_bundle%.tar}"
                # X/ beside X.tar is used only when it is this tar's unpacked copy (the same manifest, which holds
                # every file's sha256); an older build's X/ is replaced.
                if ! tar -xOf "$_bundle" "${_unpacked##*/}/manifest.json" 2>/dev/null | cmp -s - "$_unpacked/manifest.json"; then
                    say "unpacking $_bundle"
                    _tmpd=$(mktemp -d "$(dirname "$_bundle")/.unpack-XXXXXX") || err "cannot unpack $_bundle beside it" "$EXIT_INTEGRITY"
                    if ! tar -xf "$_bundle" -C "$_tmpd" || [ ! -f "$_tmpd/${_unpacked##*/}/manifest.json" ]; then
                        rm -rf "$_tmpd"
                        err "cannot unpack $_bundle (a damaged or truncated tar, or not a lorastrap bundle)" "$EXIT_INTEGRITY"
                    fi
                    rm -rf "$_unpacked" || err "cannot replace $_unpacked" "$EXIT_INTEGRITY"
                    mv "$_tmpd/${_unpacked##*/}" "$_unpacked" || err "cannot replace $_unpacked" "$EXIT_INTEGRITY"
                    rm -rf "$_tmpd"
                fi
                _bundle="$_unpacked"
                ;;
        esac
        [ -f "$_bundle/manifest.json" ] || err "$_bundle is not a lorastrap bundle (no manifest.json)" "$EXIT_USAGE"
        _bundle=$(cd "$_bundle" && pwd)
        [ -n "$_envs" ] || _envs="$_bundle/envs"  # the profiles the bundle was made from
    fi
    _root=$(find_root) || exit $?
    RUNTIME_PY=""
    ensure_runtime "$_root"

    # lorastrap's flags (set -- rebuilds the argument list without word-splitting values).
    if [ -n "$_dry" ]; then
        set -- plan
        [ -n "$_report" ] && set -- "$@" --report "$_report"
    else
        set -- install
        [ -n "$_prefix" ] && set -- "$@" --prefix "$_prefix"
        [ -n "$_name" ] && set -- "$@" --name "$_name"
        [ -n "$_engine" ] && set -- "$@" --engine "$_engine"
        [ -n "$_channel" ] && set -- "$@" --channel "$_channel"
        [ -n "$_mirror" ] && set -- "$@" --mirror "$_mirror"
        [ -n "$_pipidx" ] && set -- "$@" --pip-index-url "$_pipidx"
        [ -n "$_frozen" ] && set -- "$@" --frozen
        [ -n "$_reverify" ] && set -- "$@" --reverify
        [ -n "$_report" ] && set -- "$@" --report "$_report"
        [ -n "$_bundle" ] && set -- "$@" --bundle "$_bundle"
        [ -n "$LORASTRAP_YES" ] && set -- "$@" --yes
        [ -n "$_no_verify" ] && set -- "$@" --no-verify
        [ -n "$_keep_backup" ] && set -- "$@" --keep-backup
        [ -n "$_link_mode" ] && set -- "$@" --link-mode "$_link_mode"
        [ -n "$_no_wait" ] && set -- "$@" --no-wait
        [ -n "$_min_free" ] && set -- "$@" --min-free-mib "$_min_free"
    fi
    [ -n "$_profile" ] && set -- "$@" --profile "$_profile"
    [ -n "$_envs" ] && set -- "$@" --envs-dir "$_envs"
    [ -n "$_json" ] && set -- "$@" --json
    [ -n "$_verbose" ] && set -- "$@" --debug

    if [ -n "$_dry" ]; then
        say "dry run: detecting this machine and planning; nothing is installed"
        if [ -z "$_json" ]; then  # with --json, plan's output carries the detection too
            PYTHONPATH="$_root/installer" "$RUNTIME_PY" -m lorastrap detect || return $?
        fi
        PYTHONPATH="$_root/installer" run_logged "$_log" "$RUNTIME_PY" -m lorastrap "$@" 3>&1
        return $?
    fi
    # How lorastrap's hints and fix lines name the command: `lorastrap` where the launcher will be on the PATH.
    LORASTRAP_COMMAND=lorastrap
    if [ -n "$_no_modify_path" ]; then
        case ":${PATH:-}:" in
            *":$(bin_dir):"*) ;;
            *) LORASTRAP_COMMAND="$(bin_dir)/lorastrap" ;;
        esac
    fi
    export LORASTRAP_COMMAND
    PYTHONPATH="$_root/installer" run_logged "$_log" "$RUNTIME_PY" -m lorastrap "$@" 3>&1
    _status_code=$?
    if [ "$_status_code" != 0 ]; then  # nothing outside the data dir changes unless the install worked
        say "the lorastrap command and the shell profiles were left as they were (the install failed)"
        return "$_status_code"
    fi
    install_launcher "$_root" || warn "could not write the lorastrap command (run it as: $RUNTIME_PY -m lorastrap)"
    return 0
}

main "$@" || exit $?
