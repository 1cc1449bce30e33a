"""Write a lock file with conda-lock's own models, writer and content hash.  Run as a script, in a child process.

Why a child: importing conda_lock imports pypa's `installer` distribution (its vendored poetry does), and inside
lorastrap that name is this package.  So this file is run by path (`python .../condalock_writer.py`), drops its
own folder from sys.path, imports nothing of lorastrap, reads one JSON request on stdin and writes the lock.

Request: {"spec": path, "virtual_packages": path, "mapping_url": path, "channels": [url], "platforms": [p],
          "packages": [{name, version, manager, platform, dependencies, url, md5, sha256, build}],
          "custom_metadata": {...}, "output": path}
Platforms already in the output lock and not re-locked now are kept (if its channels are the same).
"""

import json
import os
import sys

# Neither this folder (lorastrap's modules) nor the checkout (lorastrap's `installer`, e.g. via PYTHONPATH) may
# shadow a third-party module here.
sys.path[:] = [p for p in sys.path[1:]
               if not os.path.exists(os.path.join(p or ".", "installer", "condalock_writer.py"))]


def main() -> int:
    req = json.load(sys.stdin)
    import pathlib

    from conda_lock.content_hash import compute_content_hashes
    from conda_lock.lockfile import parse_conda_lock_file, write_conda_lock_file
    from conda_lock.lockfile.v2prelim.models import HashModel, LockedDependency, Lockfile, LockMeta
    from conda_lock.models.channel import Channel
    from conda_lock.src_parser import make_lock_spec
    from conda_lock.virtual_package import virtual_package_repo_from_specification

    out = pathlib.Path(req["output"])
    spec = pathlib.Path(req["spec"])
    packages = [LockedDependency(
        name=p["name"], version=p["version"], manager=p["manager"], platform=p["platform"],
        dependencies=p.get("dependencies", {}), url=p["url"],
        hash=HashModel(md5=p.get("md5"), sha256=p["sha256"]), categories={"main"}, build=p.get("build"))
        for p in req["packages"]]
    platforms = set(req["platforms"])
    if out.exists():
        old = parse_conda_lock_file(out)
        if [c.url for c in old.metadata.channels] == req["channels"]:
            packages += [p for p in old.package if p.platform not in platforms]
            platforms |= set(old.metadata.platforms)
    platforms = sorted(platforms)
    lock_spec = make_lock_spec(src_files=[spec], channel_overrides=req["channels"], platform_overrides=platforms,
                               mapping_url=req["mapping_url"])
    vp_repo = virtual_package_repo_from_specification(pathlib.Path(req["virtual_packages"]))
    meta = LockMeta(content_hash=compute_content_hashes(lock_spec, vp_repo),
                    channels=[Channel.from_string(u) for u in req["channels"]], platforms=platforms,
                    sources=[os.path.relpath(spec, out.parent)], custom_metadata=req["custom_metadata"])
    lockfile = Lockfile(package=packages, metadata=meta)
    lockfile.toposort_inplace()
    out.parent.mkdir(parents=True, exist_ok=True)
    import tempfile
    tmpdir = pathlib.Path(tempfile.mkdtemp(prefix=".lock-", dir=out.parent))
    try:  # same name (the writer's help text quotes it), then an atomic rename into place
        write_conda_lock_file(lockfile, tmpdir / out.name, metadata_choices=set())
        os.replace(tmpdir / out.name, out)
    finally:
        if (tmpdir / out.name).exists():
            (tmpdir / out.name).unlink()
        tmpdir.rmdir()
    print(json.dumps({"ok": True, "output": str(out), "platforms": platforms}))
    return 0


if __name__ == "__main__":
    sys.exit(main())
