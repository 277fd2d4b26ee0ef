"""Reliability: full and read-only output directories, determinism, concurrent runs."""

from __future__ import annotations

import hashlib
import os
import resource
import signal
import socket
import subprocess
import time
from pathlib import Path

import pytest
from conftest import run_argv, write_cohort

from pipeline.artifacts import TMP_MARKER


def _sha(p: Path) -> str:
    return hashlib.sha256(p.read_bytes()).hexdigest()


def _tables(out: Path) -> dict[str, str]:
    return {str(p.relative_to(out)): _sha(p) for p in sorted((out / "tables").rglob("*.tsv"))}


@pytest.fixture(scope="module")
def cohort(tmp_path_factory) -> Path:
    return write_cohort(tmp_path_factory.mktemp("rel") / "in")


@pytest.fixture(scope="module")
def reference_run(cohort, tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("rel_ref") / "out"
    subprocess.run(run_argv(cohort, out, "--until", "score"), check=True, timeout=600)
    return out


def test_same_seed_gives_byte_identical_tables(cohort, reference_run, tmp_path):
    out = tmp_path / "again"
    subprocess.run(run_argv(cohort, out, "--until", "score"), check=True, timeout=600)
    assert _tables(out) == _tables(reference_run)
    assert len(_tables(out)) >= 8


def _limit_file_size(max_bytes: int):
    def apply() -> None:
        signal.signal(signal.SIGXFSZ, signal.SIG_IGN)  # writes past the limit fail with EFBIG
        resource.setrlimit(resource.RLIMIT_FSIZE, (max_bytes, max_bytes))

    return apply


def test_full_disk_mid_run_is_a_clear_error_and_resumes(cohort, reference_run, tmp_path):
    out = tmp_path / "out"
    # small per-sample files fit, the merged cohort does not: a "full disk" mid-run
    proc = subprocess.run(
        run_argv(cohort, out, "--until", "score"),
        preexec_fn=_limit_file_size(120_000),
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert proc.returncode == 1, proc.stderr
    assert "could not write its outputs" in proc.stderr
    assert "run the same command" in proc.stderr
    # h5py may print an ignored exception from its own teardown; ours is the clear last word
    assert "internal error" not in proc.stderr
    last = proc.stderr.strip().splitlines()[-1]
    assert last.startswith("immuneage: error: ingest (merge): could not write"), last
    assert "File too large" in last
    assert not [p for p in out.rglob(f"*{TMP_MARKER}*")], "a temporary was left behind"
    # every file present is complete: stamped outputs match their recorded hashes
    import json

    for stamp in out.rglob("*.stamp.json"):
        for rel, meta in json.loads(stamp.read_text())["outputs"].items():
            assert _sha(out / rel) == meta["sha256"], rel
    # resume without the limit: same tables as an uninterrupted run
    subprocess.run(run_argv(cohort, out, "--until", "score"), check=True, timeout=600)
    assert _tables(out) == _tables(reference_run)


def test_read_only_outdir_is_an_input_error(cohort, tmp_path):
    mnt = tmp_path / "ro"
    mnt.mkdir()
    try:
        subprocess.run(
            ["mount", "-t", "tmpfs", "-o", "ro,size=1m", "tmpfs", str(mnt)],
            check=True,
            capture_output=True,
        )
    except (OSError, subprocess.CalledProcessError) as exc:
        if os.access(mnt, os.W_OK) and os.geteuid() == 0:
            pytest.skip(f"cannot mount a read-only file system here ({exc}); root ignores modes")
        mnt.chmod(0o555)  # not root: permissions make it read-only
    try:
        proc = subprocess.run(
            run_argv(cohort, mnt / "out"), capture_output=True, text=True, timeout=300
        )
        if proc.returncode == 0:
            pytest.fail("a run into a read-only directory succeeded")
        # the directory itself cannot be created: a clear input error
        assert proc.returncode == 2, proc.stderr
        assert str(mnt / "out") in proc.stderr
        assert "Traceback" not in proc.stderr
    finally:
        subprocess.run(["umount", str(mnt)], capture_output=True)


def test_two_runs_on_one_outdir_are_refused_not_interleaved(cohort, tmp_path):
    out = tmp_path / "out"
    first = subprocess.Popen(
        run_argv(cohort, out, "--until", "integrate"),
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
        text=True,
    )
    try:
        deadline = time.monotonic() + 120
        # wait until the first run is inside its lock, writing artifacts
        while not list(out.glob("ingest/samples/*.stamp.json")):
            assert time.monotonic() < deadline, "first run never took its lock"
            assert first.poll() is None, first.stderr.read() if first.stderr else ""
            time.sleep(0.05)
        second = subprocess.run(
            run_argv(cohort, out, "--until", "integrate"),
            capture_output=True,
            text=True,
            timeout=120,
        )
        assert first.poll() is None, "the first run ended before the second tried"
        assert second.returncode == 2, second.stderr
        assert f"pid {first.pid}" in second.stderr
        assert socket.gethostname() in second.stderr
    finally:
        assert first.wait(timeout=600) == 0, first.stderr.read() if first.stderr else ""
    # the first run completed alone: every stage stamped once
    assert (out / "integrate" / "integrate.h5ad.stamp.json").exists()
