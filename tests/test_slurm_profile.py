"""Slurm resource profiles: validation errors name the key path; shipped profiles load."""

from __future__ import annotations

from pathlib import Path

import pytest

from pipeline.slurm.graph import GROUP_NAMES
from pipeline.slurm.profile import (
    PROFILE_DIR,
    ProfileError,
    default_profile,
    load_profile,
    profile_yaml,
)

ROOT = Path(__file__).resolve().parents[1]


def _load(tmp_path: Path, text: str):
    p = tmp_path / "profile.yaml"
    p.write_text(text)
    return load_profile(p)


def test_generic_profile_file_is_the_default(tmp_path):
    from pipeline.slurm.profile import write_generic_profile

    written = write_generic_profile(tmp_path)
    assert written.read_text() == (ROOT / "slurm/profiles/generic.yaml").read_text(), (
        "slurm/profiles/generic.yaml is stale: run `python -m pipeline.slurm`"
    )
    prof, path = load_profile("generic")
    assert path == (PROFILE_DIR / "generic.yaml").resolve()
    assert prof == default_profile()


def test_localhost_profile_fits_the_test_cluster():
    prof, _ = load_profile("localhost")
    for g in GROUP_NAMES:
        r = prof.resources(g)
        assert r.cpus == 1 and r.partition in ("cpu", "gpu")
    assert prof.resources("integrate").partition == "gpu"
    assert prof.resources("integrate").gres == "gpu:1"
    assert prof.resources("samples").gres is None


def test_group_keys_override_defaults_only_where_set(tmp_path):
    prof, _ = _load(
        tmp_path,
        "defaults: {partition: short, cpus: 2, mem: 3G, account: lab}\n"
        "groups:\n  integrate: {partition: gpu, gres: 'gpu:1', extra: ['--constraint=a100']}\n",
    )
    r = prof.resources("integrate")
    assert (r.partition, r.cpus, r.mem, r.account, r.gres) == ("gpu", 2, "3G", "lab", "gpu:1")
    assert r.extra == ["--constraint=a100"]
    assert r.time == "01:00:00"  # built-in default
    other = prof.resources("report")
    assert (other.partition, other.gres, other.extra) == ("short", None, [])


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("defaults: {cpu: 2}", ["defaults.cpu: unknown key", "allowed keys here: account, cpus"]),
        ("groups: {integrat: {cpus: 2}}", ["groups: ", "unknown job group(s) integrat", "samples"]),
        ("groups: {integrate: {mem: 4 GB}}", ["groups.integrate.mem", "'4 GB'"]),
        ("defaults: {time: 1h}", ["defaults.time", "D-HH:MM:SS"]),
        ("defaults: {cpus: 0}", ["defaults.cpus", "greater than or equal to 1"]),
        ("defaults: {partition: 'a b'}", ["defaults.partition", "no spaces"]),
        ("groups: {samples: {extra: [constraint=a100]}}", ["groups.samples.extra", "long option"]),
        ("groups: {samples: {extra: ['--array=0-3']}}", ["--array is set by immuneage"]),
        ("setups: []", ["setups: unknown key", "max_array_tasks"]),
        ("max_array_tasks: 0", ["max_array_tasks"]),
    ],
)
def test_invalid_profiles_name_the_key(tmp_path, text, expected):
    with pytest.raises(ProfileError) as exc:
        _load(tmp_path, text)
    msg = str(exc.value)
    assert str(tmp_path / "profile.yaml") in msg
    for part in expected:
        assert part in msg
    assert exc.value.exit_code == 2


def test_unreadable_profiles(tmp_path):
    with pytest.raises(ProfileError, match=r"does not exist.*generic, localhost"):
        load_profile("nosuch")
    with pytest.raises(ProfileError, match="not valid YAML at line"):
        _load(tmp_path, "defaults: {cpus: [\n")
    with pytest.raises(ProfileError, match="must hold a mapping"):
        _load(tmp_path, "- cpus: 1\n")


def test_profile_yaml_round_trips(tmp_path):
    prof = default_profile()
    again, _ = _load(tmp_path, profile_yaml(prof, "a header"))
    assert again == prof
