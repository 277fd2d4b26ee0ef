"""Slurm resource profiles: which partition, CPUs, memory and time each job group gets.

A profile is a YAML file with ``defaults`` (resources every job gets) and
``groups`` (per job group, only the keys that differ)::

    defaults: {partition: cpu, cpus: 1, mem: 4G, time: "01:00:00"}
    groups:
      samples: {cpus: 2, mem: 8G}
      integrate: {partition: gpu, gres: "gpu:1", time: "04:00:00"}
    setup: ["module load cuda/12.4"]   # shell lines run before immuneage in every job
    max_array_tasks: 50               # at most this many per-sample tasks at once

It is validated like the pipeline config: unknown keys and bad values are
errors naming the key path (:class:`ProfileError`, exit code 2).
``slurm/profiles/generic.yaml`` is :func:`default_profile` written out by
``python -m pipeline.slurm``; ``slurm/profiles/localhost.yaml`` is the
profile of the localhost test cluster (``slurm/localhost.sh``).
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator

from ..config import read_yaml_mapping
from ..errors import InputError
from .graph import GROUP_NAMES

__all__ = [
    "PROFILE_DIR",
    "GroupResources",
    "Profile",
    "ProfileError",
    "Resources",
    "default_profile",
    "load_profile",
    "profile_yaml",
]

#: The shipped profiles (``generic``, ``localhost``) in a source checkout.
PROFILE_DIR = Path(__file__).resolve().parents[2] / "slurm" / "profiles"

_MEM = re.compile(r"^[1-9][0-9]*[KMGT]?$")
_TIME = re.compile(r"^([0-9]+-)?[0-9]+(:[0-9]{1,2}){0,2}$")
_TOKEN = re.compile(r"^[A-Za-z0-9_.:,=+/@%-]+$")


class ProfileError(InputError):
    """The Slurm profile is missing, not YAML, or holds unknown keys or invalid values."""


class _Model(BaseModel):
    model_config = ConfigDict(extra="forbid")


def _check_mem(value: str | None) -> str | None:
    if value is not None and not _MEM.match(value):
        raise ValueError("memory per node as Slurm's --mem takes it: a number with K, M, G or T")
    return value


def _check_time(value: str | None) -> str | None:
    if value is not None and not _TIME.match(value):
        raise ValueError(
            "a Slurm time limit: minutes, MM:SS, HH:MM:SS, D-HH, D-HH:MM or D-HH:MM:SS"
        )
    return value


def _check_token(value: str | None) -> str | None:
    if value is not None and not _TOKEN.match(value):
        raise ValueError("a single word (letters, digits and _.:,=+/@%-), no spaces")
    return value


def _check_extra(value: list[str] | None) -> list[str] | None:
    for flag in value or []:
        if not flag.startswith("--") or "\n" in flag:
            raise ValueError(
                f"each extra sbatch flag is one long option such as --constraint=a100 (got {flag!r})"
            )
        if flag.split("=", 1)[0] in _MANAGED:
            raise ValueError(
                f"{flag.split('=', 1)[0]} is set by immuneage itself; it cannot be an extra flag"
            )
    return value


#: sbatch options immuneage writes itself (from the keys above or the job graph).
_MANAGED = {
    "--job-name",
    "--output",
    "--error",
    "--chdir",
    "--array",
    "--dependency",
    "--partition",
    "--cpus-per-task",
    "--mem",
    "--time",
    "--gres",
    "--account",
    "--qos",
    "--parsable",
}


class GroupResources(_Model):
    """Resources of one job group; unset keys take the profile's ``defaults``."""

    partition: str | None = Field(
        default=None, description="Slurm partition (--partition); null: the cluster's default."
    )
    cpus: int | None = Field(default=None, ge=1, description="CPUs per task (--cpus-per-task).")
    mem: str | None = Field(default=None, description="Memory per node (--mem), e.g. 4G.")
    time: str | None = Field(default=None, description="Time limit (--time), e.g. 01:00:00.")
    gres: str | None = Field(default=None, description="Generic resources (--gres), e.g. gpu:1.")
    account: str | None = Field(default=None, description="Account to charge (--account).")
    qos: str | None = Field(default=None, description="Quality of service (--qos).")
    extra: list[str] | None = Field(
        default=None,
        description="Further sbatch long options, one each, e.g. ['--constraint=a100'].",
    )

    @field_validator("mem")
    @classmethod
    def _valid_mem(cls, value: str | None) -> str | None:
        return _check_mem(value)

    @field_validator("time")
    @classmethod
    def _valid_time(cls, value: str | None) -> str | None:
        return _check_time(value)

    @field_validator("partition", "gres", "account", "qos")
    @classmethod
    def _valid_token(cls, value: str | None) -> str | None:
        return _check_token(value)

    @field_validator("extra")
    @classmethod
    def _valid_extra(cls, value: list[str] | None) -> list[str] | None:
        return _check_extra(value)


class Resources(_Model):
    """The resolved resources of one job (defaults overlaid with the group's keys)."""

    partition: str | None = None
    cpus: int = 1
    mem: str = "4G"
    time: str = "01:00:00"
    gres: str | None = None
    account: str | None = None
    qos: str | None = None
    extra: list[str] = Field(default_factory=list)


class Profile(_Model):
    """A Slurm resource profile."""

    defaults: GroupResources = Field(
        default_factory=lambda: GroupResources(cpus=1, mem="4G", time="01:00:00"),
        description="Resources of every job unless its group says otherwise.",
    )
    groups: dict[str, GroupResources] = Field(
        default_factory=dict,
        description=f"Per job group ({', '.join(GROUP_NAMES)}): the keys that differ from defaults.",
    )
    setup: list[str] = Field(
        default_factory=list,
        description="Shell lines run at the start of every job (e.g. 'module load cuda'); not quoted.",
    )
    max_array_tasks: int | None = Field(
        default=None,
        ge=1,
        description="At most this many per-sample array tasks run at once (--array=...%N); null: no limit.",
    )

    @field_validator("groups")
    @classmethod
    def _known_groups(cls, value: dict[str, GroupResources]) -> dict[str, GroupResources]:
        unknown = sorted(set(value) - set(GROUP_NAMES))
        if unknown:
            raise ValueError(
                f"unknown job group(s) {', '.join(unknown)}; job groups are: {', '.join(GROUP_NAMES)}"
            )
        return value

    def resources(self, group: str) -> Resources:
        """The resources of ``group``: ``defaults`` overlaid with the group's keys."""
        merged: dict[str, Any] = {}
        for source in (self.defaults, self.groups.get(group)):
            if source is None:
                continue
            merged.update({k: getattr(source, k) for k in source.model_fields_set})
        return Resources.model_validate({k: v for k, v in merged.items() if v is not None})


def default_profile() -> Profile:
    """The generic profile (``slurm/profiles/generic.yaml``).

    CPU groups run on the cluster's default partition; the GPU-capable groups
    (preprocess, integrate, cluster, score: torch kernels, scVI,
    rapids-singlecell) ask for one GPU on a partition called ``gpu``; rename it
    to your site's.
    """
    gpu = {"partition": "gpu", "gres": "gpu:1"}
    return Profile(
        defaults=GroupResources(cpus=1, mem="4G", time="01:00:00"),
        groups={
            "samples": GroupResources(cpus=2, mem="16G", time="02:00:00"),
            "preprocess": GroupResources(cpus=4, mem="64G", time="04:00:00", **gpu),
            "integrate": GroupResources(cpus=8, mem="64G", time="12:00:00", **gpu),
            "cluster": GroupResources(cpus=8, mem="64G", time="04:00:00", **gpu),
            "score": GroupResources(cpus=4, mem="64G", time="02:00:00", **gpu),
            "differential": GroupResources(cpus=8, mem="32G", time="04:00:00"),
            "report": GroupResources(cpus=1, mem="16G", time="01:00:00"),
        },
    )


def _format_errors(err: ValidationError, source: str) -> str:
    lines = [f"invalid Slurm profile in {source}:"]
    for e in err.errors():
        loc = tuple(e["loc"])
        path = ".".join(str(p) for p in loc) or "(top level)"
        if e["type"] == "extra_forbidden":
            parent = loc[:-1]
            if parent and parent[0] in ("defaults", "groups"):
                allowed = sorted(GroupResources.model_fields)
            else:
                allowed = sorted(Profile.model_fields)
            lines.append(f"  - {path}: unknown key; allowed keys here: {', '.join(allowed)}")
            continue
        given = e.get("input")
        msg = e["msg"].removeprefix("Value error, ")
        shown = "" if isinstance(given, dict) else f" (got {given!r})"
        lines.append(f"  - {path}: {msg}{shown}")
    lines.append(
        "Fix these keys (every key with its meaning: slurm/profiles/generic.yaml, slurm/README.md), "
        "then run again."
    )
    return "\n".join(lines)


def _resolve(profile: str | Path) -> Path:
    p = Path(profile)
    if p.is_file():
        return p
    shipped = PROFILE_DIR / f"{profile}.yaml"
    if p.suffix == "" and p.name == str(profile) and shipped.is_file():
        return shipped
    names = sorted(q.stem for q in PROFILE_DIR.glob("*.yaml")) if PROFILE_DIR.is_dir() else []
    hint = f" or the name of a shipped profile ({', '.join(names)})" if names else ""
    raise ProfileError(
        f"Slurm profile {profile} does not exist; pass an existing YAML file to --profile{hint}"
    )


def load_profile(profile: str | Path | None = None) -> tuple[Profile, Path | None]:
    """Load and validate a profile.

    Parameters
    ----------
    profile
        A YAML file, or the name of a shipped profile (``generic``, ``localhost``);
        ``None`` gives :func:`default_profile`.

    Returns
    -------
    The validated profile and the file it came from (``None`` for the default).

    Raises
    ------
    ProfileError
        Missing file, not YAML, unknown keys or invalid values (each named by key path).
    """
    if profile is None:
        return default_profile(), None
    path = _resolve(profile)
    data = read_yaml_mapping(
        path,
        what="Slurm profile",
        keys_hint="keys (defaults, groups, setup, max_array_tasks)",
        error=ProfileError,
    )
    try:
        return Profile.model_validate(data), path.resolve()
    except ValidationError as err:
        raise ProfileError(_format_errors(err, str(path))) from None


GENERIC_HEADER = """\
immuneage generic Slurm profile: `immuneage slurm submit ... --profile generic` (also the
default when --profile is not given). Generated by `python -m pipeline.slurm` from
pipeline.slurm.profile.default_profile(); copy it and change what your cluster needs.
Job groups: {groups}.
Keys per group (unset: taken from defaults): partition (null: the cluster's default), cpus,
mem, time, gres, account, qos, extra (further sbatch long options, e.g. --constraint=a100).
The GPU-capable groups ask for a partition called `gpu`: rename it to your site's."""


def profile_yaml(profile: Profile, header: str = "") -> str:
    """The profile as YAML (only keys that are set), preceded by ``header`` as comments."""
    data: dict[str, Any] = {
        "defaults": profile.defaults.model_dump(exclude_none=True),
        "groups": {
            g: profile.groups[g].model_dump(exclude_none=True)
            for g in GROUP_NAMES
            if g in profile.groups
        },
        "setup": list(profile.setup),
        "max_array_tasks": profile.max_array_tasks,
    }
    lines = [f"# {line}".rstrip() for line in header.splitlines()]
    body = yaml.safe_dump(data, sort_keys=False, default_flow_style=None, width=100)
    return "\n".join([*lines, body]) if lines else body


def write_generic_profile(root: Path) -> Path:
    """(Re)write ``slurm/profiles/generic.yaml`` under ``root``."""
    path = Path(root) / "slurm" / "profiles" / "generic.yaml"
    path.parent.mkdir(parents=True, exist_ok=True)
    text = profile_yaml(default_profile(), GENERIC_HEADER.format(groups=", ".join(GROUP_NAMES)))
    path.write_text(text)
    return path
