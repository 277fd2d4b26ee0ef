"""Run the pipeline as a Slurm job graph (``immuneage slurm submit | status | cancel``).

Layout: :mod:`.graph` (job groups derived from the stage list), :mod:`.profile`
(resources per group, validated YAML), :mod:`.script` (sbatch text, a pure
function), :mod:`.submit` (plan from the runner's stamps, ``sbatch``),
:mod:`.status` (``scontrol``/``squeue``/``sacct``, failures, cancelling),
:mod:`.jobs` (``jobs.json``, calls to Slurm). Every job runs the ``immuneage
run`` command line on the shared output directory; nothing here imports stage
internals.
"""

from __future__ import annotations

from .graph import GROUP_NAMES, GROUP_TABLE, GraphError, JobGroup, job_groups
from .jobs import SlurmError
from .profile import Profile, ProfileError, load_profile
from .status import refresh
from .submit import plan_submission, submit

__all__ = [
    "GROUP_NAMES",
    "GROUP_TABLE",
    "GraphError",
    "JobGroup",
    "Profile",
    "ProfileError",
    "SlurmError",
    "job_groups",
    "load_profile",
    "plan_submission",
    "refresh",
    "submit",
]
