"""`lorastrap detect` (what this machine has) and `lorastrap plan` (which profile fits, and why)."""

from __future__ import annotations

from pathlib import Path

from lorastrap.cli import base
from lorastrap.cli.base import emit
from lorastrap.core import errors


def add(sub, pp: dict) -> dict:
    """Register this group's commands on ``sub``; returns command name → function."""
    common, where, anywhere, sources, transaction, machine = (
        pp[k] for k in ("common", "where", "anywhere", "sources", "transaction", "machine"))
    p = sub.add_parser("detect", parents=[common], help="what this machine has (GPUs, driver, CUDA, platform)")
    p.add_argument("--prefix", type=Path, default=None, help="where the environment will go (for free disk)")

    p = sub.add_parser("plan", parents=[common, machine], help="which environment profile fits this machine, and why")
    p.add_argument("--profile", default=None, help="force a profile; the plan says which requirements it breaks")
    p.add_argument("--why-not", default=None, metavar="NAME", help="list each rule of profile NAME and whether it is met")
    p.add_argument("--report", type=base.path_arg, default=None,
                   help="also write the node report (check_mode: the plan only) to this file")

    return {"detect": cmd_detect, "plan": cmd_plan}


def cmd_detect(args) -> int:
    from lorastrap.machine.detect import detect
    from lorastrap.machine.render import format_table
    machine = detect(disk_path=args.prefix)
    print(machine.model_dump_json(indent=2) if args.json else format_table(machine))
    return errors.OK


def cmd_plan(args) -> int:
    from lorastrap.matrix import plan as planner, profiles
    base.report_target(args.report)
    matrix = profiles.load(args.envs_dir)
    if args.why_not:
        profiles.get(matrix, args.why_not)
    machine = base.machine(args)
    result = planner.plan(machine, matrix, profile=args.profile)
    if args.report:
        from lorastrap.core import fsutil
        from lorastrap.core.records import NodeReport
        base.write_report(args.report, NodeReport(host=fsutil.hostname(), ok=bool(result.profile), check_mode=True,
                                                  plan=result.model_dump(mode="json"), profile=result.profile,
                                                  platform=machine.platform).model_dump(mode="json"))
    emit(args, {"machine": machine.model_dump(mode="json"), "plan": result.model_dump(mode="json")},
         planner.format_plan(result, why_not=args.why_not,
                             profile=profiles.get(matrix, args.why_not) if args.why_not else None))
    return errors.OK if result.profile else errors.NO_PROFILE
