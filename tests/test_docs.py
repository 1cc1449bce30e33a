"""The README as a contract: its examples that can run here are run (the plan examples with conda's overrides,
detect, every flag the command table names, the exit codes, setup.sh's flags, the commands it tells users to type),
so a line that stops being true fails the tests.  Fast: each is one short lorastrap process."""

import os
import re
import shlex
import subprocess
import sys

import pytest
from conftest import ROOT, run_cli

README = (ROOT / "README.md").read_text()


def console_blocks() -> list[list[tuple[str, list[str]]]]:
    """Each ```console block as [(command, its output lines)]."""
    blocks = []
    for body in re.findall(r"```console\n(.*?)```", README, re.S):
        cmds: list[tuple[str, list[str]]] = []
        for line in body.splitlines():
            stripped = line.strip()
            if stripped.startswith("$ "):
                cmds.append((stripped[2:], []))
            elif cmds:
                cmds[-1][1].append(line)
        blocks.append(cmds)
    return blocks


def _expect(lines: list[str], out: str) -> None:
    """Each shown line is a line of OUT; a line ending in '...' (or '…') is a prefix; '...' alone skips."""
    have = [ln.rstrip() for ln in out.splitlines()]
    for want in lines:
        want = want.rstrip()
        if want.strip() in ("...", "…", ""):
            continue
        head = re.sub(r"\s*(\.\.\.|…)$", "", want)
        cut = re.split(r" \.\.\.|…", head)[0]  # "(sm_75 sm_80 ... PTX)": the part before the elision
        assert any(h.startswith(cut) for h in have), f"README line not in the output:\n{want}\n--- output:\n{out}"


PLAN_EXAMPLES = [(cmd, out) for block in console_blocks() for cmd, out in block
                 if re.fullmatch(r"(CONDA_OVERRIDE_\w+=\S+ )+lorastrap plan", cmd)]


def test_the_readme_has_the_plan_examples():
    assert len(PLAN_EXAMPLES) >= 3


@pytest.mark.parametrize("cmd,out", PLAN_EXAMPLES, ids=[c for c, _ in PLAN_EXAMPLES])
def test_plan_examples_print_what_the_readme_shows(cmd, out):
    words = shlex.split(cmd)
    env = dict(w.split("=", 1) for w in words if "=" in w)
    res = run_cli(*words[len(env) + 1:], env=env)
    assert res.returncode == 0, res.stderr
    # the hint's source is cut in the README ("source: ..."); compare up to it
    _expect([ln.split("source: ")[0] if "source: " in ln else ln for ln in out], res.stdout)


def test_detect_prints_the_rows_the_readme_shows():
    (out,) = [o for block in console_blocks() for c, o in block if c == "lorastrap detect"]
    res = run_cli("detect", env={"CONDA_OVERRIDE_CUDA": ""})
    assert res.returncode == 0, res.stderr
    keys = [ln[:14].strip() for ln in out if ln and not ln.startswith("[")]
    got = [ln[:14].strip() for ln in res.stdout.splitlines()]
    assert keys and all(k in got for k in keys), (keys, got)


def test_every_flag_in_the_command_table_exists():
    rows = re.findall(r"^\| [^|]+ \| (`lorastrap (?:[^|]|\\\|)*?)\s*\| `installer", README, re.M)
    assert len(rows) >= 14
    checked = 0
    for row in rows:
        for usage in re.findall(r"`(lorastrap [^`]+)`", row):
            words = usage.split()
            sub = [w for w in words[1:3] if re.fullmatch(r"[a-z-]+", w) and w not in ("uninstall",)] or words[1:2]
            if words[1] == "self":
                sub = ["self", "uninstall"]
            elif words[1] == "fleet":
                sub = ["fleet", words[2]]
            else:
                sub = [words[1]]
            helptext = run_cli(*sub, "--help").stdout
            for flag in re.findall(r"--[a-z][a-z-]*", usage):
                assert flag in helptext, f"README names `{usage}`, but `lorastrap {' '.join(sub)}` has no {flag}"
                checked += 1
    assert checked >= 25


def test_exit_codes_table_is_the_clis():
    from lorastrap.core import errors
    table = dict(re.findall(r"^\| (\d+) \| (.+) \|$", README.split("## Exit codes", 1)[1].split("\n## ")[0], re.M))
    assert {int(c) for c in table} == set(errors.EXIT_CODES), "README's exit codes differ from core/errors.py"
    helptext = run_cli("--help").stdout
    for code in errors.EXIT_CODES:
        assert re.search(rf"^\s+{code}\s", helptext, re.M), code


def test_setup_sh_takes_the_flags_the_readme_names():
    helptext = subprocess.run(["sh", str(ROOT / "setup.sh"), "--help"], capture_output=True, text=True).stdout
    section = README.split("## setup.sh", 1)[1].split("\n## ")[0]
    flags = set(re.findall(r"`(--[a-z][a-z-]*)", section)) | {
        f for cmd, _ in console_blocks()[0] for f in re.findall(r"(--[a-z][a-z-]*)", cmd)}
    assert {"--no-modify-path", "--debug", "--no-verify", "--link-mode", "--dry-run", "--report"} <= flags
    for flag in flags:
        assert flag in helptext, f"README's setup.sh section names {flag}; `sh setup.sh --help` does not"
    for var in re.findall(r"`(LORASTRAP_[A-Z_]+)", section):
        assert var in helptext or var in ("LORASTRAP_HOME",), var


def test_the_commands_the_readme_tells_users_to_run_exist():
    for path in re.findall(r"`(?:sh |python )?(scripts/[a-z_]+\.(?:py|sh))", README):
        assert (ROOT / path).is_file(), path
    trying = README.split("Trying it here without a conda channel", 1)[1].split("```console\n", 1)[1].splitlines()[0]
    assert trying == "$ sh scripts/try.sh"  # run end to end by test_first_hour.py
    assert "Today no lock is committed" in README and not list((ROOT / "envs").glob("*.conda-lock.yml")), \
        "a lock is committed now: say what users get in the README's lock section"


def test_diff_locks_recipe_runs_for_a_lock_never_committed(tmp_path):
    recipe = re.search(r"`(lorastrap diff-locks <\(git show HEAD:envs/P\.conda-lock\.yml\) envs/P\.conda-lock\.yml)`",
                       README)
    assert recipe, "the README's diff-locks recipe moved"
    cmd = recipe.group(1).replace("envs/P.conda-lock.yml)", "envs/no-such.conda-lock.yml 2>/dev/null)")
    cmd = cmd.replace(" envs/P.conda-lock.yml", " /dev/null").replace("lorastrap", f"{sys.executable} -m lorastrap", 1)
    res = subprocess.run(["bash", "-c", cmd], capture_output=True, text=True, cwd=ROOT, env=dict(os.environ))
    # NEW (/dev/null) is no lock: the error is about NEW, not the empty OLD
    assert "/dev/null" in res.stderr and "/dev/fd" not in res.stderr, res.stderr
