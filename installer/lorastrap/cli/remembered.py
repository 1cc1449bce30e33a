"""What an environment remembers of how it was built (EnvRecord.built_with), filled into the flags the user did not
give: `update`, `repair`, `doctor` and `verify` work on the environment as it was installed — its --envs-dir,
channels, mirror, pip index, engine and link mode — and a flag given now still wins."""

from __future__ import annotations

import os
from pathlib import Path

from lorastrap.cli.base import say
from lorastrap.core.credentials import shown

SOURCES = ("envs_dir", "channel", "mirror", "pip_index_url", "engine", "link_mode")


def built_with(prefix: Path | None):
    """PREFIX's recorded build options (BuiltWith), or None (no record, or one written before they were kept)."""
    if prefix is None:
        return None
    from lorastrap.install import prefix as pfx
    try:
        record = pfx.read_record(prefix)
    except Exception:  # a damaged record is doctor's finding, not a reason to fail here
        return None
    return record.built_with if record else None


def apply(args, prefix: Path | None, fields: tuple[str, ...] = SOURCES, narrate=say) -> list[str]:
    """Set each of FIELDS the user left unset from PREFIX's record; returns the flags taken (also narrated)."""
    bw = built_with(prefix)
    if bw is None:
        return []
    taken = []
    if "envs_dir" in fields and getattr(args, "envs_dir", None) is None and bw.envs_dir:
        if (Path(bw.envs_dir) / "profiles.yaml").is_file():
            args.envs_dir = Path(bw.envs_dir)
            taken.append(f"--envs-dir {bw.envs_dir}")
        else:
            narrate(f"{prefix} was built with --envs-dir {bw.envs_dir}, which is gone: using lorastrap's own envs/")
    given_source = any(getattr(args, f, None) for f in ("channel", "mirror"))
    if "channel" in fields and not given_source and bw.channels:
        args.channel = list(bw.channels)
        taken.append(" ".join(f"--channel {shown(c)}" for c in bw.channels))
    if "mirror" in fields and not given_source and bw.mirror:
        args.mirror = ([bw.mirror] if isinstance(bw.mirror, str)
                       else [f"{channel}={url}" for channel, url in bw.mirror.items()])
        taken.append(" ".join(f"--mirror {_shown_mirror(m)}" for m in args.mirror))
    if "pip_index_url" in fields and getattr(args, "pip_index_url", None) is None and bw.pip_index_url:
        from lorastrap.locking.channels import DEFAULT_PIP_INDEX
        args.pip_index_url = bw.pip_index_url
        if bw.pip_index_url != DEFAULT_PIP_INDEX:
            taken.append(f"--pip-index-url {shown(bw.pip_index_url)}")
    if ("engine" in fields and getattr(args, "engine", None) is None and not os.environ.get("LORASTRAP_ENGINE")
            and bw.engine and bw.engine != "auto"):
        args.engine = bw.engine
        taken.append(f"--engine {bw.engine}")
    if "link_mode" in fields and getattr(args, "link_mode", None) is None and bw.link_mode:
        args.link_mode = bw.link_mode
        if bw.link_mode != "hardlink":
            taken.append(f"--link-mode {bw.link_mode}")
    if taken:
        narrate(f"as {prefix} was built: " + " ".join(taken) + " (a flag given now wins)")
    return taken


def _shown_mirror(value: str) -> str:
    """A --mirror value (a URL, or CHANNEL=URL) as it may be printed: no password."""
    channel, sep, url = value.partition("=")
    return f"{channel}={shown(url)}" if sep and "://" not in channel else shown(value)


def link_mode(args) -> str:
    return getattr(args, "link_mode", None) or "hardlink"
