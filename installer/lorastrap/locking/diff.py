"""What changed between two locks, package by package (manager and name): added, removed, upgraded, downgraded
(conda's version ordering for conda packages, PEP 440 for pip ones: core/versions.compare) or rebuilt (same
version, another build or file).  ``update`` reports it for an environment; ``diff-locks`` per platform of two lock
files (the refresh workflow's summary)."""

from __future__ import annotations

from lorastrap.core import versions
from lorastrap.locking.lockfile import Entry, Lock

KINDS = {1: "upgraded", -1: "downgraded", 0: "rebuilt"}


def changes(old: list[Entry], new: list[Entry]) -> list[dict]:
    """What changes from the lock entries OLD to NEW, sorted by name then manager."""
    before = {(e.manager, e.name): e for e in old}
    after = {(e.manager, e.name): e for e in new}
    out = []
    for key in sorted(before.keys() | after.keys(), key=lambda k: (k[1], k[0])):
        o, n = before.get(key), after.get(key)
        if o and n and (o.version, o.build, o.sha256) == (n.version, n.build, n.sha256):
            continue
        if o is None:
            kind = "added"
        elif n is None:
            kind = "removed"
        else:
            kind = KINDS[versions.compare(n.version, o.version, key[0])]
        out.append({"kind": kind, "manager": key[0], "name": key[1],
                    "old": {"version": o.version, "build": o.build} if o else None,
                    "new": {"version": n.version, "build": n.build} if n else None})
    return out


def by_platform(old: Lock | None, new: Lock) -> dict[str, dict[str, list]]:
    """Per platform of either lock: the packages added, removed and changed (with how: upgraded, downgraded or
    rebuilt)."""
    out = {}
    for platform in sorted(set(new.platforms) | set(old.platforms if old else [])):
        found = changes(old.for_platform(platform) if old else [], new.for_platform(platform))
        side = {"added": "new", "removed": "old"}
        out[platform] = {
            **{kind: [{"name": c["name"], "manager": c["manager"], "version": c[side[kind]]["version"]}
                      for c in found if c["kind"] == kind] for kind in ("added", "removed")},
            "changed": [{"name": c["name"], "manager": c["manager"], "kind": c["kind"],
                         "from": f"{c['old']['version']} {c['old']['build'] or ''}".strip(),
                         "to": f"{c['new']['version']} {c['new']['build'] or ''}".strip()}
                        for c in found if c["kind"] in KINDS.values()]}
    return out


def format_by_platform(diff: dict[str, dict[str, list]]) -> str:
    lines = []
    for platform, d in diff.items():
        if not any(d.values()):
            lines.append(f"{platform}: no change")
            continue
        lines.append(f"{platform}: {len(d['added'])} added, {len(d['removed'])} removed, {len(d['changed'])} changed")
        lines += [f"  + {p['name']} {p['version']}" + (" (pip)" if p["manager"] == "pip" else "") for p in d["added"]]
        lines += [f"  - {p['name']} {p['version']}" + (" (pip)" if p["manager"] == "pip" else "") for p in d["removed"]]
        lines += [f"  ~ {p['name']} {p['from']} -> {p['to']} ({p['kind']})" + (" (pip)" if p["manager"] == "pip" else "")
                  for p in d["changed"]]
    return "\n".join(lines)


def _side(v: dict | None) -> str:
    return "-" if v is None else v["version"] + (f" ({v['build']})" if v.get("build") else "")


def format_changes(found: list[dict]) -> str:
    if not found:
        return "  no change"
    return "\n".join(f"  {c['kind']:<10} {c['name']:<24} {_side(c['old']):>28} -> {_side(c['new']):<28} {c['manager']}"
                     for c in found)
