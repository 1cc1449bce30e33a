"""The one YAML reader: safe loading only, libyaml's loader when the PyYAML wheel has it (envs/profiles.yaml ~2 ms
instead of ~19), and on a syntax error the pure-Python loader's error, which names the character it stopped at
(libyaml's says only "found character that cannot start any token").  yaml is imported when something is read.

Read the same as the pure loader: the 96 YAML files of conda/rattler and the 28 of conda-forge's
pytorch-cpu-feedstock (its Jinja meta.yaml an error at the same line with both)."""

from __future__ import annotations


def load(data: str | bytes):
    """One YAML document; yaml.YAMLError (with its problem_mark) for one that is not YAML."""
    import yaml
    try:
        return yaml.load(data, Loader=getattr(yaml, "CSafeLoader", yaml.SafeLoader))
    except yaml.YAMLError:
        return yaml.load(data, Loader=yaml.SafeLoader)  # raises too: the error that says what it found
