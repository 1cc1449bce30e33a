"""The whole install as a command, a node of a fleet or a test runs it: choose the profile (a bundle's own, or the
plan's), install it through the transaction, register the environment, and say what happened.

``provision`` is what `lorastrap install` calls (cli/install.py only parses flags and prints); Slurm nodes and
Ansible run that command, so every path goes through here.
"""

from __future__ import annotations

from pathlib import Path

from lorastrap.core.errors import VERIFY, LorastrapError, NoProfileError
from lorastrap.core.records import NodeReport
from lorastrap.core.plain import Struct, struct
from lorastrap.install import bundles, generations, transaction, verify
from lorastrap.install.transaction import InstallResult
from lorastrap.locking import channels as chans
from lorastrap.machine.model import Machine
from lorastrap.matrix import plan as planner, profiles


@struct
class Provisioned(Struct):
    result: InstallResult
    report: NodeReport


def provision(*, prefix: Path, envs_dir: Path, machine: Machine, profile: str | None = None,
              bundle: Path | None = None, envs_dir_given: bool = False, asked_profile: bool = False,
              channels: list[str] | None = None, mirror: str | dict[str, str] | None = None,
              pip_index_url: str | None = None, engine: str | None = None, frozen: bool = False,
              keep_backup: bool = False, wait: bool = True, run_verify: bool = True, reverify: bool = False,
              link_mode: str = "hardlink", min_free_mib: int = 512, replace_foreign: bool = False,
              allow_link_scripts: bool = False, narrate=lambda m: None) -> Provisioned:
    """Plan (or take the bundle's profile), install atomically, verify, register.  ``bundle`` is a bundle folder
    or .tar: its profiles are used unless ``envs_dir_given``, and its lock points at its own files (no network).
    ``reverify``: verify the environment on this machine also when it was already up to date (fleets do)."""
    opened = bundles.open_bundle(bundle, narrate=narrate) if bundle else None
    if opened and not envs_dir_given:
        envs_dir = opened / "envs"  # the profiles the bundle was made from
    matrix = profiles.load(envs_dir, keep=True)
    if machine.platform is None:
        raise NoProfileError(f"this platform ({machine.os}/{machine.arch}) is not supported",
                             fix="lorastrap runs on linux-64, linux-aarch64, osx-arm64 and osx-64; on Windows, run "
                                 "it inside WSL2.")
    lock_file = None
    if opened:
        profile, lock_file = bundles.install_inputs(opened, machine)
        narrate(f"installing from bundle {opened} (profile {profile}, no network)")
    chosen = planner.plan(machine, matrix, profile=profile)
    if opened:
        bundles.refuse_unfit(opened, chosen, asked=asked_profile)
    name = planner.require_profile(chosen)
    for c in chosen.broken:
        narrate(f"warning: {name} breaks a requirement here: {c.message}")
    narrate(f"profile {name} for {machine.platform}" + (" (forced)" if chosen.forced else "") + f" → {prefix}")
    with bundles.damage_named(opened):
        result = transaction.install(
            prefix=prefix, envs_dir=envs_dir, name=name, profile=profiles.get(matrix, name), matrix=matrix,
            platform=machine.platform, lock_file=lock_file, engine=engine, frozen=frozen, channels=channels,
            mirror=mirror, pip_index_url=pip_index_url or chans.DEFAULT_PIP_INDEX, keep_backup=keep_backup,
            wait=wait, run_verify=run_verify,
            link_mode=link_mode, min_free_mib=min_free_mib, replace_foreign=replace_foreign,
            allow_link_scripts=allow_link_scripts, driver_cuda=machine.cuda, narrate=narrate,
            plan_info=chosen.model_dump(mode="json", include={"profile", "forced", "reasons", "warnings"}))
    if reverify and run_verify and not result.changed and not result.verify:
        result.verify = _verify_again(Path(result.prefix), profiles.get(matrix, name), matrix, machine, envs_dir,
                                      narrate)
    generations.register(Path(result.prefix))
    report = transaction.node_report(result, machine)
    report.bundle = bundles.identity(opened) if opened else None
    return Provisioned(result, report)


def _verify_again(prefix: Path, profile, matrix, machine: Machine, envs_dir: Path, narrate) -> dict:
    """The profile's verification of an environment that was already up to date (nothing was changed, so a
    failure leaves it as it is and says how to repair it)."""
    narrate(f"already up to date; verifying {prefix} on this machine again")
    try:
        return verify.verify_profile(prefix, profile, matrix=matrix, driver_cuda=machine.cuda)
    except LorastrapError as exc:
        where = f"--prefix {prefix} --envs-dir {envs_dir}"
        raise LorastrapError(f"the environment at {prefix} failed verification on this machine: "
                             + " ".join(profile.verify), why=exc.why,
                             fix=f"It was already up to date, so nothing was changed. `lorastrap doctor {where}` "
                                 f"says why; `lorastrap repair {where} --yes` rebuilds it from its own lock.",
                             exit_code=VERIFY) from None
