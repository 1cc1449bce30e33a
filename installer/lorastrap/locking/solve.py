"""Solving the conda side: py-rattler with the profile's own virtual packages — never conda-lock's defaults, so a CPU lock cannot pull CUDA builds.  A failed solve keeps the solver's
whole explanation; ``explain_solve`` reads its leaves into the fix.

py-rattler may crash at interpreter shutdown after its work succeeded (rattler_worker's docstring), so it solves in
this process only when the process will leave with os._exit — the console script sets ``lorastrap.ENGINE_EXITS_HARD``
and does (cli.run) — and in a worker child otherwise (a library caller, a test calling cli.main).  In the process
it saves a second interpreter, lorastrap's imports and the JSON hand-over (~0.15 s a platform)."""

from __future__ import annotations

import os
import re
from contextlib import contextmanager, nullcontext
from pathlib import Path

import lorastrap
from lorastrap.core import subproc
from lorastrap.core.credentials import netrc_login, origin, redacted, shown, without_login
from lorastrap.core.errors import ConfigError, NetworkError
from lorastrap.locking.spec import Spec

SOLVE_TIMEOUT_S = 900


VP_FACTS = {"__cuda": ("the driver's CUDA version", "driver_cuda_min"), "__glibc": ("glibc", "glibc_min"),
            "__osx": ("the macOS version", None), "__linux": ("the Linux kernel", None),
            "__cuda_arch": ("the GPU compute capability", "compute_capability")}
LEAF_RE = re.compile(r"(?:─\s*|^\s*|: )(?P<name>[A-Za-z0-9_.\-]+)(?: (?P<spec>[^\n]*?))?, for which no candidates "
                     r"were found", re.M)


def explain_solve(text: str, vps: dict[str, str], vps_file: Path) -> str:
    """The fix for a solver explanation, from its leaves: a virtual package the profile lacks or sets too low, a
    package the channel lacks, or (only then) pins in conflict."""
    fixes, others = [], []
    for m in LEAF_RE.finditer(text):
        name, spec = m.group("name"), (m.group("spec") or "").strip()
        if name.startswith("__"):
            fact, rule = VP_FACTS.get(name, (f"the machine's {name}", None))
            rule_txt = f" and requires.{rule} in profiles.yaml, with its source" if rule else ""
            if name not in vps:
                fixes.append(f"a package needs {name}{' ' + spec if spec else ''} ({fact}) and the profile's virtual "
                             f"packages ({vps_file}) have none: if the profile is meant for such machines add {name} "
                             f"there{rule_txt}; otherwise pin builds that do not need it")
            else:
                fixes.append(f"a package needs {name} {spec} ({fact}) but the profile sets {name}={vps[name]} in "
                             f"{vps_file}: raise it to the minimum needed{rule_txt} (plan then refuses older "
                             "machines), or pin an older build that fits")
        else:
            others.append(f"no {name}{' ' + spec if spec else ''} fits (the channel lacks it or another pin excludes "
                          f"it): check the spec's line for {name} and that the channel (or mirror) carries it")
    for m in re.finditer(r"No candidates were found for (?P<name>\S+)(?: (?P<spec>[^\n]*?))?\.?$", text, re.M):
        others.append(f"the channel has no {m.group('name')} matching {m.group('spec') or '*'}: check the spec's line "
                      f"for {m.group('name')} against what the channel (or mirror) carries")
    seen = []
    for f in fixes or others:  # a virtual package the profile lacks explains the rest of the tree
        if f not in seen:
            seen.append(f)
    if seen:
        return "; ".join(seen) + "."
    return ("The solver's explanation above names the spec lines in conflict: change the pins it names "
            "(or check that the channel has these packages).")


def _solve_error(answer: dict, channels: list[str], platform: str, vps: dict[str, str], vps_file: Path) -> Exception:
    text = redacted(answer.get("error", ""))
    low = text.lower()
    explained = "cannot be installed" in low or "for which no candidates were found" in low or "cannot solve" in low
    shown_channels = ", ".join(shown(c) for c in channels)
    # rattler's text: "HTTP status client error (401 Unauthorized) for url (…)"; over HTTP/2, which has no reason
    # phrase, "(401 ) for url" (prefix-dev/pixi-build-backends#288)
    if not explained and re.search(r"client error \(40[13]\b|\b40[13] (unauthorized|forbidden)\b", low):
        return NetworkError(f"could not read the channel(s) {shown_channels} for {platform}: the server wants "
                            "credentials", why=text.splitlines()[0][:500],
                            fix="Give them in ~/.netrc (or the file $NETRC names): `machine HOST login USER password "
                                "PASSWORD`, or in the channel's URL (https://USER:PASSWORD@HOST/…); a lock keeps no "
                                "password, so later runs (update, repair) want .netrc or the flag again.")
    if not explained and any(w in low for w in ("connect", "dns", "resolve", "timed out", "network", "404",
                                                "not found", "io error", "failed to fetch", "no such file")):
        return NetworkError(f"could not read the channel(s) {shown_channels} for {platform}",
                            why=text.splitlines()[0][:500],
                            fix="Check the network or proxy (https_proxy); use --mirror URL for a reachable mirror, "
                                "--channel for a local channel (file:// or a path), or an offline bundle "
                                "(--bundle, made with `lorastrap bundle` on a connected machine).")
    return ConfigError(f"the spec cannot be solved for {platform} with "
                       f"{', '.join(f'{k}={v}' for k, v in vps.items())}", why=text.strip(),
                       fix=explain_solve(text, vps, vps_file))


@contextmanager
def _solver_logins(channels: list[str]):
    """(the channel URLs the solver gets, its credentials file or None), for the length of a solve.

    py-rattler's gateway reads a login from the URL, or from a credentials file (rattler_networking's
    RATTLER_AUTH_FILE: {host: {"BasicHTTP": …}}) that its auth middleware reads once, when it is made (the worker
    then removes it).  A login in a URL ends up in the solver's repodata cache (pkgs/repodata, which a shared
    LORASTRAP_PKGS_DIR exposes): so a host's login goes in that file — 0600, in a private folder, removed however
    the solve ends (SIGTERM and SIGHUP included) — and its URLs go without it.  The file keys a login by host alone
    (no port, path or scheme): a .netrc entry is a host's anyway; a URL's own login goes there only when every
    channel of that host has that same login and the same scheme and port — else it stays in its URL, as a login
    given for one channel never goes to another."""
    import json
    import shutil
    import signal
    import tempfile
    import threading
    import urllib.parse

    from lorastrap.core import signals
    from lorastrap.core.errors import Interrupted
    hosts: dict[str, list[tuple[urllib.parse.SplitResult, tuple[str, str] | None]]] = {}
    for c in channels:
        parts = urllib.parse.urlsplit(c)
        if parts.scheme.lower() in ("http", "https") and parts.hostname:
            own = ((urllib.parse.unquote(parts.username), urllib.parse.unquote(parts.password or ""))
                   if parts.username is not None else None)
            hosts.setdefault(parts.hostname, []).append((parts, own))
    filed: dict[str, tuple[str, str]] = {}
    for host, group in hosts.items():
        owns = [own for _, own in group if own is not None]
        if not owns:
            login = netrc_login(host)
        elif len(owns) == len(group) and len(set(owns)) == 1 and len({origin(p) for p, _ in group}) == 1:
            login = owns[0]  # one scheme, host and port for all
        else:
            continue  # logins of their own that differ on one host: each stays in its URL
        if login is not None:
            filed[host] = login
    urls = [without_login(c) if urllib.parse.urlsplit(c).hostname in filed else c for c in channels]
    if not filed:
        yield urls, None
        return

    def stopped(signum, frame):
        raise Interrupted(f"stopped by signal {signal.Signals(signum).name}", why="the solve was interrupted",
                          fix="Run the same command again.")
    folder = Path(tempfile.mkdtemp(prefix="lorastrap-auth-"))  # 0700
    try:
        with (signals.handled((signal.SIGTERM, signal.SIGHUP), stopped)
              if threading.current_thread() is threading.main_thread() else nullcontext()):
            path = folder / "credentials.json"
            fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
            with os.fdopen(fd, "w") as f:  # rattler's key of an IPv6 host is in brackets
                json.dump({(f"[{h}]" if ":" in h else h): {"BasicHTTP": {"username": u, "password": p}}
                           for h, (u, p) in filed.items()}, f)
            yield urls, path
    finally:
        shutil.rmtree(folder, ignore_errors=True)


def solve(spec: Spec, channels: list[str], platform: str, vps: dict[str, str], cache_dir: Path,
          vps_file: Path = Path("virtual-packages.yml")) -> list[dict]:
    request = {"op": "solve", "specs": spec.conda, "platform": platform, "virtual_packages": vps,
               "cache_dir": str(cache_dir / "repodata")}
    with _solver_logins(channels) as (request["channels"], auth):
        if auth:
            request["auth_file"] = str(auth)
        if getattr(lorastrap, "ENGINE_EXITS_HARD", False):
            from lorastrap.locking import rattler_worker
            answer = rattler_worker.answer({**request, "timeout": SOLVE_TIMEOUT_S})
        else:
            answer = subproc.worker("locking.rattler_worker", request, timeout=SOLVE_TIMEOUT_S)
    if not answer.get("ok"):
        raise _solve_error(answer, channels, platform, vps, vps_file)
    return answer["records"]
