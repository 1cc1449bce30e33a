"""The randomized kill harness: installs, switches and repairs interrupted by SIGINT, SIGTERM or SIGKILL at a random
moment, each followed by its re-run (scripts/soak_kill.py; run it alone for a longer soak)."""

import os
import random

import pytest
import soak_kill

RUNS = int(os.environ.get("LORASTRAP_KILL_RUNS", "30"))
SHORT_RUNS = int(os.environ.get("LORASTRAP_KILL_SHORT_RUNS", "8"))


def test_a_short_weighted_kill_run(channel, warm_home, tmp_path):
    """The default tier's share of the harness: most signals land inside a critical window (the transaction's pause
    points: download, aside, linked, verify, commit), some runs start from a cold cache, rollbacks among them; no
    environment, user file or unrelated process is lost and nothing is left over."""
    seed = int(os.environ.get("LORASTRAP_KILL_SEED") or random.randrange(1 << 30))
    stats = soak_kill.soak(prefix=tmp_path / "env", home=warm_home, channel_url=channel["url"],
                           simple=channel["simple"], runs=SHORT_RUNS, seed=seed, weighted=0.75, cold=0.3)
    context = f"seed {seed} (LORASTRAP_KILL_SEED={seed} replays it): {stats}"
    assert stats.runs == SHORT_RUNS and not stats.failures and not stats.leftovers, context
    assert stats.envs_lost == 0 and stats.user_files_lost == 0 and stats.unrelated_killed == 0, context
    assert stats.survived == SHORT_RUNS, context
    print(f"short kill run, {context}")


@pytest.mark.slow  # the randomized kill harness: .ci/run runs it (the slow tier) on every submission
def test_random_kills_never_lose_the_environment_or_the_users_file(channel, warm_home, tmp_path):
    seed = int(os.environ.get("LORASTRAP_KILL_SEED") or random.randrange(1 << 30))
    stats = soak_kill.soak(prefix=tmp_path / "env", home=warm_home, channel_url=channel["url"],
                           simple=channel["simple"], runs=RUNS, seed=seed, weighted=0.3, cold=0.1)
    context = f"seed {seed} (LORASTRAP_KILL_SEED={seed} replays it): {stats}"
    assert stats.runs == RUNS, context
    assert not stats.failures, context
    assert not stats.leftovers, context
    assert stats.envs_lost == 0 and stats.user_files_lost == 0, context
    assert stats.survived == RUNS, context
    assert sum(stats.interrupted.values()) >= RUNS // 2, context  # most runs really were cut short
    print(f"kill harness, {context}")
