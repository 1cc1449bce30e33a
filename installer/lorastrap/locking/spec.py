"""A lock's inputs: the profile's spec (an environment.yml with `pip:` entries and its `pip-dependencies` policy),
its virtual-packages file for each platform, the staleness key over both, and where the profile's lock lives."""

from __future__ import annotations

import hashlib
from dataclasses import field
from pathlib import Path

from lorastrap.core import yamlio
from lorastrap.core.errors import ConfigError
from lorastrap.core.plain import Struct, struct
from lorastrap.matrix.profiles import Profile

# How a pip entry's dependencies are found: locked from PyPI ("lock"), or required from the conda side ("conda").
POLICIES = ("lock", "conda")


def lock_path(envs_dir: Path, profile: str) -> Path:
    """micromamba treats a file as a lock only if its name ends in -lock.yml: this one does."""
    return envs_dir / f"{profile}.conda-lock.yml"


@struct
class Spec(Struct):
    path: Path
    channels: list[str]
    conda: list[str]
    pip: list[str] = field(default_factory=list)
    pip_dependencies: str = "lock"  # or "conda": every dependency of a pip entry must come from the conda side


def read_spec(path: Path) -> Spec:
    import yaml
    try:
        raw = yamlio.load(path.read_text())
    except FileNotFoundError:
        raise ConfigError(f"{path} does not exist", fix="Restore the profile's spec or correct profiles.yaml.")
    except yaml.YAMLError as exc:
        raise ConfigError(f"{path}: not valid YAML", why=str(exc), fix="Fix the YAML syntax.")
    if not isinstance(raw, dict) or not isinstance(raw.get("dependencies"), list):
        raise ConfigError(f"{path}: field 'dependencies' is missing or not a list",
                          fix="A spec is an environment.yml: channels: [...] and dependencies: [...].")
    conda, pip = [], []
    for i, dep in enumerate(raw["dependencies"]):
        if isinstance(dep, str):
            conda.append(dep)
        elif isinstance(dep, dict) and set(dep) == {"pip"} and isinstance(dep["pip"], list):
            pip += [str(p) for p in dep["pip"]]
        else:
            raise ConfigError(f"{path}: field 'dependencies[{i}]' is neither a spec string nor a pip: list")
    policy = str(raw.get("pip-dependencies", "lock"))
    if policy not in POLICIES:
        raise ConfigError(f"{path}: field 'pip-dependencies' is {policy!r}",
                          fix="Use `lock` (dependencies the conda side lacks are locked from PyPI) or `conda` "
                              "(they must be on the conda side).")
    return Spec(path=path, channels=[str(c) for c in raw.get("channels") or ["conda-forge"]], conda=conda, pip=pip,
                pip_dependencies=policy)


def inputs_sha256(envs_dir: Path, profile: Profile) -> str:
    """A cheap staleness key: the bytes of the spec and of the virtual-packages file."""
    h = hashlib.sha256()
    for name in (profile.spec, profile.virtual_packages):
        h.update((envs_dir / name).read_bytes())
        h.update(b"\0")
    return h.hexdigest()


def virtual_packages(envs_dir: Path, profile: Profile, platform: str) -> dict[str, str]:
    import yaml
    path = envs_dir / profile.virtual_packages
    try:
        raw = yamlio.load(path.read_text())
        return {str(k): str(v) for k, v in raw["subdirs"][platform]["packages"].items()}
    except KeyError:
        raise ConfigError(f"{path}: no 'subdirs.{platform}.packages'",
                          why=f"the profile is locked for {platform} with the virtual packages listed there",
                          fix=f"Add a subdirs: {platform}: packages: block, or lock for one of the listed platforms.")
    except (yaml.YAMLError, TypeError, AttributeError) as exc:
        raise ConfigError(f"{path}: not a virtual-packages file", why=str(exc),
                          fix="Use conda-lock's format: subdirs: PLATFORM: packages: {__cuda: '12.0', ...}")
