"""The randomized kill harness: installs, switches and repairs interrupted by SIGINT, SIGTERM or SIGKILL at a random
moment, each followed by its re-run (scripts/soak_kill.py; run it alone for a longer soak)."""

import os
import random

import pytest
import soak_kill

RUNS = int(os.environ.get("LORASTRAP_KILL_RUNS", "30"))


@pytest.mark.slow  # the randomized kill harness: .ci/run runs it (the slow tier) on every submission
def test_random_kills_never_lose_the_environment_or_the_users_file(channel, warm_home, tmp_path):
    seed = int(os.environ.get("LORASTRAP_KILL_SEED") or random.randrange(1 << 30))
    stats = soak_kill.soak(prefix=tmp_path / "env", home=warm_home, channel_url=channel["url"],
                           simple=channel["simple"], runs=RUNS, seed=seed)
    context = f"seed {seed} (LORASTRAP_KILL_SEED={seed} replays it): {stats}"
    assert stats.runs == RUNS, context
    assert not stats.failures, context
    assert not stats.leftovers, context
    assert stats.envs_lost == 0 and stats.user_files_lost == 0, context
    assert stats.survived == RUNS, context
    assert sum(stats.interrupted.values()) >= RUNS // 2, context  # most runs really were cut short
    print(f"kill harness, {context}")
