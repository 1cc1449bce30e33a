"""Which lock an install uses: the profile's committed lock, else one locked here earlier for the same inputs and
channels, else a lock made now (unless --frozen)."""

from __future__ import annotations

from pathlib import Path

from lorastrap.core import paths
from lorastrap.core.credentials import without_login
from lorastrap.core.errors import NoLockError
from lorastrap.locking.channels import channel_key
from lorastrap.locking.lockfile import Lock, is_stale, read_lock
from lorastrap.locking.spec import lock_path
from lorastrap.matrix.profiles import Profile


def choose(*, envs_dir: Path, name: str, profile: Profile, platform: str, frozen: bool,
           channels: list[str] | None, pip_index_url: str, narrate) -> Lock:
    """The profile's committed lock when it covers this platform and is current; else one locked here earlier
    for the same inputs and channels; else lock now (unless frozen) into the data dir."""
    committed = lock_path(envs_dir, name)
    local = paths.data_dir() / "locks" / f"{name}.{platform}.conda-lock.yml"
    reason = f"{committed.name} does not exist"
    if committed.exists():
        lk = read_lock(committed, keep=True)
        if platform not in lk.platforms:
            reason = f"{committed.name} has no {platform} section"
        elif is_stale(lk, envs_dir, profile):
            reason = f"{committed.name} is stale (its spec or virtual packages changed since it was written)"
        else:
            return lk
    if not frozen and local.exists():  # locked on an earlier run here, for the same spec and channels
        lk = read_lock(local, keep=True)
        wanted = [channel_key(c) for c in channels] if channels else None  # a lock's channels hold no login
        if not is_stale(lk, envs_dir, profile) and (wanted is None or (
                [channel_key(c) for c in lk.channels] == wanted
                and all(without_login(c) == c for c in lk.channels))):  # one written with a login: made anew
            return lk
    if frozen:
        raise NoLockError(f"--frozen: no committed lock for profile {name} on {platform} ({reason} in "
                          f"{envs_dir})",
                          why="--frozen installs only a lock committed beside the profiles (the locks workflow "
                              "writes them where conda-forge is reachable); this copy of lorastrap has none that "
                              "fits",
                          fix=f"Drop --frozen: lorastrap then locks {name} for {platform} on first use (from the "
                              "spec's channels, or --channel/--mirror) and keeps that lock with the environment; "
                              "or install an offline bundle made where the lock exists (`lorastrap bundle`, then "
                              "`--bundle`). Maintainers: `lorastrap lock --profile "
                              f"{name} --platform {platform}` and commit {lock_path(envs_dir, name).name}.")
    narrate(f"{reason}: locking {name} for {platform} now")
    if local.exists():
        local.unlink()  # stale or for other channels: start afresh
    from lorastrap.locking.lock import lock  # the solver and the pip side: only when a lock is made
    lock(envs_dir=envs_dir, name=name, profile=profile, platforms=[platform], channels=channels, out=local,
         pip_index_url=pip_index_url, narrate=narrate)
    return read_lock(local, keep=True)
