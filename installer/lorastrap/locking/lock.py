"""A profile's spec + its virtual packages → its conda-lock file: the conda side solved for each platform
(solve.py), the `pip:` entries resolved with their dependencies against it (pipside.py) and locked with their
sha256, written with conda-lock's writer (lockfile.py)."""

from __future__ import annotations

from pathlib import Path

from lorastrap.core import paths
from lorastrap.core.errors import ConfigError
from lorastrap.core.plain import Struct, struct
from lorastrap.locking.channels import DEFAULT_PIP_INDEX, channel_url
from lorastrap.locking.lockfile import write
from lorastrap.locking.solve import solve
from lorastrap.locking.spec import inputs_sha256, lock_path, read_spec, virtual_packages
from lorastrap.locking.wheels import wheel_platforms
from lorastrap.matrix.profiles import Profile


def _python_version(records: list[dict]) -> str:
    py = next((r for r in records if r["name"] == "python"), None)
    if py is None:
        raise ConfigError("the spec has pip: entries but no python", fix="Add python to the spec's dependencies.")
    return py["version"]


def _split_dep(dep: str) -> tuple[str, str]:
    name, _, rest = dep.partition(" ")
    return name, rest.strip() or "*"


@struct
class Locked(Struct):
    """A lock just written: where, and how many packages it holds for each of its platforms."""
    path: Path
    packages: dict[str, int]


def lock(*, envs_dir: Path, name: str, profile: Profile, platforms: list[str] | None = None,
         channels: list[str] | None = None, out: Path | None = None, cache_dir: Path | None = None,
         pip_index_url: str = DEFAULT_PIP_INDEX, narrate=lambda msg: None) -> Path:
    """Solve the profile for each platform and write (or update) its lock file.  Returns the lock's path."""
    spec_path = envs_dir / profile.spec
    spec = read_spec(spec_path)
    platforms = platforms or list(profile.platforms)
    bad = [p for p in platforms if p not in profile.platforms]
    if bad:
        raise ConfigError(f"profile {name!r} is not for {', '.join(bad)}",
                          why=f"envs/profiles.yaml lists the platforms each profile is built for; {name} has "
                              f"{', '.join(profile.platforms)}",
                          fix=f"Lock for one of {', '.join(profile.platforms)} (profiles.yaml lists them).")
    urls = [channel_url(c) for c in (channels or spec.channels)]
    cache_dir = cache_dir or paths.cache_dir()
    out = (out or lock_path(envs_dir, name)).absolute()

    packages: list[dict] = []
    for platform in platforms:
        vps = virtual_packages(envs_dir, profile, platform)
        narrate(f"solving {name} for {platform} with {', '.join(f'{k}={v}' for k, v in vps.items())}")
        records = solve(spec, urls, platform, vps, cache_dir, envs_dir / profile.virtual_packages)
        packages += [{"name": r["name"], "version": r["version"], "manager": "conda", "platform": platform,
                      "dependencies": dict(_split_dep(d) for d in r["depends"]), "url": r["url"],
                      "md5": r["md5"], "sha256": r["sha256"], "build": r["build"]} for r in records]
        if spec.pip:
            from lorastrap.locking import pipside  # packaging, urllib: only for pip entries
            ctx = pipside.Context(platform=platform, python=_python_version(records),
                                  wheel_platforms=wheel_platforms(platform, vps), policy=spec.pip_dependencies,
                                  vps_file=envs_dir / profile.virtual_packages, spec_file=spec_path,
                                  envs_dir=envs_dir)
            narrate(f"resolving pip entries for {platform} (Python {ctx.python}) against the conda side: "
                    f"{', '.join(spec.pip)}")
            packages += [{"name": p["name"], "version": p["version"], "manager": "pip", "platform": platform,
                          "url": p["url"], "sha256": p["sha256"]}
                         for p in pipside.resolve(spec.pip, records, ctx, pip_index_url, cache_dir)]
    counts = write(out, spec=spec_path.absolute(), virtual_packages=(envs_dir / profile.virtual_packages).absolute(),
           channels=urls, platforms=platforms, packages=packages,
           custom_metadata={"lorastrap_profile": name, "lorastrap_inputs_sha256": inputs_sha256(envs_dir, profile)})
    return Locked(out, counts)
