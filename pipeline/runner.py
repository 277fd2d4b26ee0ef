"""The stage runner: validation, device, locking, stamps, resume and provenance.

The runner is the only place that reads and writes pipeline artifacts. For a
run it

1. loads the config and the sample sheet and inspects every counts file
   (nothing is created when any of it is wrong);
2. resolves the device once (``auto|cpu|gpu``) and records it;
3. creates and locks the output directory, deletes temporaries left by killed
   runs;
4. runs each selected stage unless its stamp shows it is up to date, writing
   every artifact atomically followed by its stamp;
5. assembles ``provenance.json`` from the stamps.

A bad input found mid-run (an :class:`~pipeline.errors.InputError`) removes
everything this run created, so the user is left with no partial output.

Layout of an output directory::

    <outdir>/
      ingest/samples/<sample>.h5ad (+ .stamp.json)   one per sample
      ingest/ingest.h5ad (+ .stamp.json)            merged cohort
      tables/<name>.tsv                             result tables
      provenance.json
"""

from __future__ import annotations

import contextlib
import dataclasses
import hashlib
import importlib
import json
import logging
import os
import shutil
import sys
import tempfile
import time
import warnings
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pandas as pd

from . import __version__, keys
from .artifacts import (
    Stamp,
    atomic_path,
    path_sha256,
    path_signature,
    read_h5ad_artifact,
    read_stamp,
    remove_stale_temporaries,
    stamp_path,
    write_dir_atomic,
    write_h5ad_atomic,
    write_json_atomic,
    write_table_atomic,
)
from .config import Config, config_digest, dump_config, section_digest
from .errors import ImmuneageWarning, InputError, OutputWriteError
from .lock import outdir_lock
from .preflight import ValidationReport, validate_inputs
from .provenance import ResourceMeter, machine_info, package_versions
from .stages import STAGES, StageContext, StageResult, StageSpec, get_stage, stage_names
from .threads import limit_threads

__all__ = [
    "PILOT_STAGES",
    "RunSummary",
    "Runner",
    "StageStatus",
    "ValidationReport",
    "pilot_config",
    "validate_inputs",
]

log = logging.getLogger("immuneage")


#: Per stage (and per-sample unit) in provenance: when and how long it ran, and on what.
_TRACE_KEYS = ("started", "finished", "wall_s", "cpu_s", "peak_rss_mb", "host")


def _safe_name(text: str) -> str:
    return "".join(c if c.isalnum() or c in "._" else "_" for c in text)


# --------------------------------------------------------------------------- pilot runs
#: The stages a pilot run (``immuneage run --qc-only``) runs.
PILOT_STAGES = ("ingest", "qc")


def pilot_config(samplesheet: Path, cfg: Config) -> tuple[Config, list[str]]:
    """The config of a pilot run: ingest and QC only, no study design needed.

    A pilot checks a new batch (one sample, one timepoint, timepoint names the
    config does not know yet) before the design is settled. When the sheet's
    timepoints are all levels of ``design.timepoints`` and every donor has the
    baseline (or ``ingest.missing_baseline`` is ``warn``), the config is used as
    is, so a later full run reuses the pilot's ingest and QC. Otherwise the
    design becomes the sheet's timepoints in order of appearance (the first is
    the baseline, no contrasts) and donors without a baseline are only warned
    about; the notes say which.

    Returns
    -------
    The config to run with, and what was changed (empty when nothing).
    """
    try:
        table = pd.read_csv(samplesheet, dtype=str, keep_default_na=False, encoding="utf-8-sig")
    except Exception:  # unreadable: validation names the problem
        return cfg, []
    cols = {str(c).strip().lower(): c for c in table.columns}
    if keys.TIMEPOINT not in cols or keys.DONOR not in cols:
        return cfg, []
    tps = [t.strip() for t in table[cols[keys.TIMEPOINT]] if t.strip()]
    donors = [d.strip() for d in table[cols[keys.DONOR]]]
    levels = list(dict.fromkeys(tps))
    notes: list[str] = []
    design, ingest = cfg.design, cfg.ingest
    if not levels or not set(levels) <= set(design.timepoints):
        design = type(design).model_construct(
            timepoints=levels, baseline=levels[0] if levels else design.baseline, contrasts=[]
        )
        notes.append(
            f"pilot run: timepoints taken from the sample sheet ({', '.join(levels)}); "
            "no contrasts (design.timepoints in the config: "
            f"{', '.join(cfg.design.timepoints)})"
        )
    with_base = {
        d
        for d, t in zip(donors, table[cols[keys.TIMEPOINT]], strict=True)
        if t.strip() == design.baseline
    }
    if ingest.missing_baseline == "error" and any(d not in with_base for d in donors):
        ingest = ingest.model_copy(update={"missing_baseline": "warn"})
        notes.append(
            f"pilot run: donors without a {design.baseline!r} sample are kept "
            "(ingest.missing_baseline: warn)"
        )
    if not notes:
        return cfg, []
    return cfg.model_copy(update={"design": design, "ingest": ingest}), notes


# --------------------------------------------------------------------------- run summary
@dataclass
class RunSummary:
    """What a run did: per stage, ``ran`` or ``up to date``, and where outputs are."""

    outdir: Path
    stages: dict[str, str] = field(default_factory=dict)
    outputs: list[Path] = field(default_factory=list)
    device: str = "cpu"
    wall_s: float = 0.0
    log: Path | None = None


@dataclass
class StageStatus:
    """Whether a stage is up to date (:meth:`Runner.stage_status`).

    ``up_to_date``: its whole-cohort artifact (per-sample stages: the merge) is
    current; ``units``: per-sample stages only, sample -> its unit is current.
    """

    up_to_date: bool
    units: dict[str, bool] = field(default_factory=dict)


def _sha(obj: Any) -> str:
    return hashlib.sha256(json.dumps(obj, sort_keys=True, default=str).encode()).hexdigest()


class Runner:
    """Run pipeline stages over one output directory.

    Parameters
    ----------
    samplesheet
        CSV with ``sample, donor, timepoint, path``, optionally ``library``,
        ``counts_layer``, ``symbol_column`` (+ extra columns); see
        :mod:`pipeline.io.samplesheet`.
    config
        The validated configuration.
    outdir
        Output directory (created; resumed when it holds an earlier run).
    config_path
        The YAML the config came from (recorded in provenance).
    argv
        The command line (recorded in provenance).
    notes
        Lines logged when the run starts (e.g. what a pilot run changed in the config).
    """

    def __init__(
        self,
        samplesheet: Path,
        config: Config,
        outdir: Path,
        *,
        config_path: Path | None = None,
        argv: Sequence[str] | None = None,
        notes: Sequence[str] = (),
    ) -> None:
        self.samplesheet = Path(samplesheet).resolve()
        self.cfg = config
        self.outdir = Path(outdir).resolve()
        self.config_path = Path(config_path).resolve() if config_path else None
        self.argv = list(argv) if argv is not None else list(sys.argv)
        self.notes = list(notes)
        self._created: list[Path] = []
        self._report: ValidationReport | None = None
        self._device: Any = None
        self._device_info: dict[str, Any] = {}

    # ------------------------------------------------------------------ public
    def run(
        self,
        *,
        stage: str | None = None,
        until: str | None = None,
        from_stage: str | None = None,
        force: bool = False,
        sample: str | None = None,
    ) -> RunSummary:
        """Run the selected stages, skipping those whose stamps are current.

        Parameters
        ----------
        stage
            Run only this stage; its upstream stages must be up to date.
        until
            Run every stage up to and including this one (default: all).
        from_stage
            Re-run this stage and every later selected one even if up to date.
        force
            Re-run every selected stage.
        sample
            With a per-sample stage: process only this sample (one Slurm array task).

        Returns
        -------
        A :class:`RunSummary`.
        """
        t0 = time.perf_counter()
        selected = self._select(stage, until, from_stage)
        forced = set(selected) if force else set()
        if from_stage is not None:
            names = stage_names()
            forced |= {s for s in selected if names.index(s) >= names.index(from_stage)}
        if sample is not None and not (len(selected) == 1 and get_stage(selected[0]).per_sample):
            per_sample = [s.name for s in STAGES if s.per_sample]
            raise InputError(
                f"--sample works only with --stage set to a per-sample stage ({', '.join(per_sample)})"
            )

        self._report = validate_inputs(
            self.samplesheet, self.cfg, stages=selected, defer_stage_warnings=True
        )
        if sample is not None and sample not in self._report.sheet.samples:
            raise InputError(
                f"--sample {sample!r} is not in {self.samplesheet}; samples are: "
                f"{', '.join(self._report.sheet.samples)}"
            )
        self._resolve_device()

        created_outdir = not self.outdir.exists()
        if self.outdir.exists() and not self.outdir.is_dir():
            raise InputError(f"--outdir {self.outdir} exists and is not a directory")
        try:
            self.outdir.mkdir(parents=True, exist_ok=True)
            with tempfile.NamedTemporaryFile(dir=self.outdir, prefix=".write-probe-"):
                pass
        except OSError as exc:
            if created_outdir:
                shutil.rmtree(self.outdir, ignore_errors=True)
            raise InputError(
                f"--outdir {self.outdir} is not writable: {exc.strerror or exc}; choose a "
                "writable directory (or fix its permissions / remount it read-write)"
            ) from None
        summary = RunSummary(outdir=self.outdir, device=self._device_info["resolved"])
        current = ""
        try:
            with outdir_lock(self.outdir, sample=sample), self._run_log(stage, sample) as logf:
                summary.log = logf
                try:
                    if sample is None:
                        for p in remove_stale_temporaries(self.outdir):
                            log.info("removed a temporary left by an interrupted run: %s", p)
                    if stage is not None and not get_stage(stage).per_sample:
                        # per-sample stages check their upstream units sample by sample
                        self._upstream_inputs(get_stage(stage))
                    with limit_threads(self.cfg.threads):
                        for name in selected:
                            current = name
                            spec = get_stage(name)
                            status, outputs = self._run_stage(
                                spec, force=name in forced, sample=sample
                            )
                            if status == "ran":  # checks about this stage, issued when it runs
                                for text in self._report.stage_warnings.get(name, ()):
                                    warnings.warn(text, ImmuneageWarning, stacklevel=2)
                            summary.stages[name] = status
                            summary.outputs.extend(outputs)
                    current = ""
                    summary.wall_s = time.perf_counter() - t0
                    if sample is None:
                        self._write_provenance(summary)
                    log.info("finished in %.1f s", summary.wall_s, extra={"file_only": True})
                except BaseException as exc:
                    if not (created_outdir and not self._created):
                        self._stopped(exc, current, summary, sample, t0)
                    raise
        except BaseException:
            if created_outdir and not self._created:
                # this run created the directory and completed nothing in it
                shutil.rmtree(self.outdir, ignore_errors=True)
            raise
        return summary

    def _stopped(
        self,
        exc: BaseException,
        stage: str,
        summary: RunSummary,
        sample: str | None,
        t0: float,
    ) -> None:
        """A run stopped by ``exc``: keep every completed stage and say how to resume.

        (Nothing is kept only when this run created the output directory and
        completed nothing in it, e.g. ``--stage`` without its upstream outputs;
        :meth:`run` removes that directory.) Every stamped stage stays,
        provenance records the failure, the run log gets the error, and the error
        gets a note naming what is kept and how to resume.
        """
        kept = [n for n, st in summary.stages.items() if st in ("ran", "up to date")]
        where = f" in stage {stage!r}" if stage else ""
        if not isinstance(exc, Exception):  # Ctrl-C, SystemExit: the CLI says how to resume
            log.info("interrupted%s (%s)", where, type(exc).__name__, extra={"file_only": True})
            return
        summary.wall_s = time.perf_counter() - t0
        if stage:
            summary.stages[stage] = "failed"
        if sample is None:
            with contextlib.suppress(Exception):
                self._write_provenance(summary, failure={"stage": stage, "error": str(exc)})
        note = (
            f"The run stopped{where}. "
            + (
                f"Completed stages are kept ({', '.join(kept)}): "
                if kept
                else "Completed work is kept: "
            )
            + "fix the cause and run the same command again; what is up to date is skipped "
            + (f"and the run resumes at {stage!r}." if stage else "and the run resumes.")
        )
        if not isinstance(exc, OutputWriteError):  # that message says it already
            exc.add_note(note)
        log.error(
            "%s: %s",
            type(exc).__name__,
            exc,
            exc_info=None if isinstance(exc, InputError) else exc,
            extra={"file_only": True},
        )
        log.info("%s", note, extra={"file_only": True})

    @contextlib.contextmanager
    def _run_log(self, stage: str | None, sample: str | None) -> Iterator[Path]:
        """Append this invocation's log to ``<outdir>/logs/<time>-<what>-<pid>.log``.

        Every record of the ``immuneage`` logger at INFO and above goes to the
        file, also with ``--quiet`` (which only quiets the terminal). One file per
        invocation, so each Slurm task (``--stage``/``--sample``) has its own.
        """
        parts = [time.strftime("%Y%m%d-%H%M%S")]
        if stage:
            parts.append(stage)
        if sample:
            parts.append(sample)
        job = os.environ.get("SLURM_JOB_ID")
        if job:
            task = os.environ.get("SLURM_ARRAY_TASK_ID")
            parts.append(f"slurm{job}" + (f"_{task}" if task else ""))
        parts.append(str(os.getpid()))
        path = self.outdir / "logs" / ("-".join(_safe_name(p) for p in parts) + ".log")
        path.parent.mkdir(exist_ok=True)
        handler = logging.FileHandler(path, mode="a", encoding="utf-8")
        handler.setLevel(logging.INFO)
        handler.setFormatter(
            logging.Formatter("[%(asctime)s %(levelname)s] %(message)s", "%Y-%m-%d %H:%M:%S")
        )
        level, shown = log.level, log.getEffectiveLevel()
        handler_levels = {h: h.level for h in log.handlers}
        added = [handler]
        if not log.handlers:  # a library call: keep showing what logging's last resort would
            added.append(logging.StreamHandler())
            added[-1].setLevel(logging.WARNING)
        if shown > logging.INFO:
            log.setLevel(logging.INFO)  # the file takes INFO even when the terminal is quiet
            for h in handler_levels:
                h.setLevel(max(h.level, shown))
        for h in added:
            log.addHandler(h)
        try:
            log.info(
                "immuneage %s on %s (pid %d): %s",
                __version__,
                machine_info()["host"],
                os.getpid(),
                " ".join(self.argv),
                extra={"file_only": True},
            )
            log.info(
                "sample sheet %s; config %s; device %s",
                self.samplesheet,
                self.config_path or "(built-in defaults)",
                self._device_info.get("resolved"),
                extra={"file_only": True},
            )
            for note in self.notes:
                log.info("%s", note)
            yield path
        finally:
            for h in added:
                log.removeHandler(h)
            handler.close()
            log.setLevel(level)
            for h, h_level in handler_levels.items():
                h.setLevel(h_level)

    def stage_status(self) -> dict[str, StageStatus]:
        """Which stages (and per-sample units) a run would skip; reads only, writes nothing.

        A stage is up to date when its stamp matches what a run would expect and
        every stage it reads is up to date too (so a stage below one that will
        re-run counts as not up to date). Used to submit only missing Slurm jobs.

        Raises
        ------
        InputError
            The sheet, a counts file or a file named in the config is unusable.
        """
        self._report = validate_inputs(self.samplesheet, self.cfg, defer_stage_warnings=True)
        self._signatures = {}
        out: dict[str, StageStatus] = {}
        for spec in STAGES:
            cfg = section_digest(self.cfg, *spec.sections)
            if not spec.per_sample:
                files = self._config_file_inputs(spec)
                ok = all(out[n].up_to_date for n in spec.inputs)
                if ok:
                    inputs = {**self._upstream_inputs(spec), **files, **self._sheet_inputs(spec)}
                    ok = self._is_current(
                        Stamp(spec.name, None, __version__, inputs, cfg), self._artifact(spec)
                    )
                out[spec.name] = StageStatus(ok)
                continue
            units, digests = {}, {}
            for row in self._report.sheet.rows:
                artifact = self._unit_artifact(spec, row.sample)
                ok = all(out[n].units.get(row.sample, False) for n in spec.inputs)
                if ok:
                    inputs = self._sample_inputs(spec, row)
                    ok = self._is_current(
                        Stamp(spec.name, row.sample, __version__, inputs, cfg), artifact
                    )
                units[row.sample] = ok
                if ok:
                    digests[row.sample] = read_stamp(stamp_path(artifact)).digest()  # type: ignore[union-attr]
            merged = Stamp(spec.name, None, __version__, {"samples": _sha(digests)}, cfg)
            ok = all(units.values()) and self._is_current(merged, self._artifact(spec))
            out[spec.name] = StageStatus(ok, units)
        return out

    # ------------------------------------------------------------------ helpers
    def _select(self, stage: str | None, until: str | None, from_stage: str | None) -> list[str]:
        names = stage_names()
        for n in (stage, until, from_stage):
            if n is not None and n not in names:
                raise InputError(f"unknown stage {n!r}; stages are: {', '.join(names)}")
        if stage is not None and until is not None:
            raise InputError("give either --stage or --until, not both")
        if stage is not None:
            selected = [stage]
        elif until is not None:
            selected = names[: names.index(until) + 1]
        else:
            selected = names
        if from_stage is not None and names.index(from_stage) > names.index(selected[-1]):
            flag = f"--stage {stage}" if stage is not None else f"--until {until}"
            raise InputError(
                f"--from {from_stage} comes after {flag}: nothing would re-run; use --from "
                f"{selected[-1]} or an earlier stage, or raise --until"
            )
        return selected

    def _resolve_device(self) -> None:
        from .kernels._device import resolve_device

        dev = resolve_device(self.cfg.device)
        self._device = dev
        info: dict[str, Any] = {"requested": self.cfg.device, "resolved": dev.type}
        if dev.type == "cuda":
            import torch

            info["name"] = torch.cuda.get_device_name(dev)
        self._device_info = info
        log.info("device: %s (config device: %s)", dev.type, self.cfg.device)

    def _track(self, paths: list[Path], existed: set[Path]) -> None:
        self._created.extend(p for p in paths if p not in existed)

    @contextlib.contextmanager
    def _captured(self, where: str) -> Iterator[list[str]]:
        """Record warnings raised inside, log them, and keep their text for the stamp."""
        messages: list[str] = []
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            warnings.filterwarnings("ignore", category=DeprecationWarning)
            warnings.filterwarnings("ignore", category=FutureWarning)
            yield messages
        for w in caught:
            message = str(w.message)
            stage = where.split(" ", 1)[0]
            # one prefix: messages that already name the stage keep their own
            text = (
                message if message.startswith((f"{where}:", f"{stage}:")) else f"{where}: {message}"
            )
            if text not in messages:
                messages.append(text)
                log.warning("%s", text)

    def _upstream_inputs(self, spec: StageSpec) -> dict[str, str]:
        out = {}
        for name in spec.inputs:
            st = read_stamp(stamp_path(self._artifact(get_stage(name))))
            if st is None or not st.outputs_present(self.outdir):
                raise InputError(
                    f"stage {spec.name!r} needs the output of stage {name!r}, which is missing in "
                    f"{self.outdir}; run `immuneage run ... --until {name}` first"
                )
            out[name] = st.digest()
        return out

    def _artifact(self, spec: StageSpec) -> Path:
        if spec.artifact is not None:
            return self.outdir / spec.artifact
        return self.outdir / spec.name / f"{spec.name}.h5ad"

    def _unit_artifact(self, spec: StageSpec, sample: str) -> Path:
        return self.outdir / spec.name / "samples" / f"{sample}.h5ad"

    def _func(self, spec: StageSpec, attr: str) -> Callable[..., Any]:
        return getattr(importlib.import_module(spec.module), attr)

    def _is_current(self, expected: Stamp, artifact: Path) -> bool:
        have = read_stamp(stamp_path(artifact))
        return (
            have is not None and have.key() == expected.key() and have.outputs_present(self.outdir)
        )

    def _execute(
        self,
        spec: StageSpec,
        expected: Stamp,
        artifact: Path,
        compute: Callable[[], StageResult],
        label: str,
        extra_info: dict[str, Any] | None = None,
    ) -> list[Path]:
        """Compute, write the artifact, tables and stamp atomically; return paths written."""
        existed = {p for p in [artifact, stamp_path(artifact)] if p.exists()}
        with self._captured(label) as messages, ResourceMeter() as meter:
            result = compute()
        try:
            return self._write_outputs(
                spec, expected, artifact, result, label, existed, messages, meter, extra_info
            )
        except OSError as exc:
            reason = os.strerror(exc.errno) if exc.errno else str(exc).splitlines()[0]
            raise OutputWriteError(
                f"{label}: could not write its outputs under {self.outdir}: {reason}. Nothing "
                "half-written was left and earlier stages are kept: free disk space (or check "
                "quota and permissions, or choose another --outdir), then run the same command "
                "again to resume"
            ) from exc

    def _write_outputs(
        self,
        spec: StageSpec,
        expected: Stamp,
        artifact: Path,
        result: StageResult,
        label: str,
        existed: set[Path],
        messages: list[str],
        meter: ResourceMeter,
        extra_info: dict[str, Any] | None,
    ) -> list[Path]:
        written: list[Path] = []
        adata = result.adata
        run_info = adata.uns.setdefault(keys.UNS, {})
        dumped = self.cfg.model_dump(mode="json")
        run_info["version"] = __version__
        run_info["seed"] = self.cfg.seed
        run_info[f"{spec.name}_config"] = json.dumps(
            {name: dumped[name] for name in spec.sections}, sort_keys=True
        )
        write_h5ad_atomic(artifact, adata, link=not spec.standalone, chunk_size=self.cfg.chunk_size)
        written.append(artifact)
        for name, table in result.tables.items():
            tpath = self.outdir / "tables" / f"{name}.tsv"
            if tpath.exists():
                existed.add(tpath)
            write_table_atomic(tpath, table)
            written.append(tpath)
        for name, writer in result.dirs.items():
            final = artifact.parent / name
            if final.exists():
                existed |= set(final.rglob("*"))
            written += write_dir_atomic(final, writer)
        for name, writer in result.files.items():
            final = self.outdir / name.rstrip("/")
            if name.endswith("/"):
                if final.exists():
                    existed |= set(final.rglob("*"))
                written += write_dir_atomic(final, writer)
            else:
                if final.exists():
                    existed.add(final)
                with atomic_path(final) as tmp:
                    writer(tmp)
                written.append(final)
        expected.record_outputs(self.outdir, written)
        expected.info = {
            "started": meter.started,
            "wall_s": round(meter.wall_s, 3),
            "cpu_s": round(meter.cpu_s, 3),
            "peak_rss_mb": round(meter.peak_rss_mb, 1),
            "device": self._device_info,
            "warnings": messages,
            "finished": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
            "host": machine_info()["host"],
            **({"details": result.provenance} if result.provenance else {}),
            **(extra_info or {}),
        }
        write_json_atomic(stamp_path(artifact), expected.to_json())
        self._track([*written, stamp_path(artifact)], existed)
        log.info("%s: done in %.1f s (peak RSS %.0f MB)", label, meter.wall_s, meter.peak_rss_mb)
        return written

    # ------------------------------------------------------------------ stages
    def _run_stage(
        self, spec: StageSpec, *, force: bool, sample: str | None
    ) -> tuple[str, list[Path]]:
        if spec.per_sample:
            return self._run_per_sample(spec, force=force, only=sample)
        return self._run_cohort(spec, force=force)

    def _sample_inputs(self, spec: StageSpec, row: Any) -> dict[str, str]:
        """What one sample's unit is made from.

        For a source stage (no upstream), the content hash of the sample's
        file(s), reusing the last hash when size and mtime are unchanged, plus
        the sheet row. Otherwise the digests of the upstream units of the same
        sample.
        """
        if spec.inputs:
            out = {}
            for name in spec.inputs:
                up = get_stage(name)
                st = read_stamp(stamp_path(self._unit_artifact(up, row.sample)))
                if st is None or not st.outputs_present(self.outdir):
                    raise InputError(
                        f"stage {spec.name!r} for sample {row.sample!r} needs the output of "
                        f"stage {name!r} for that sample, which is missing in {self.outdir}; run "
                        f"`immuneage run ... --stage {name} --sample {row.sample}` first"
                    )
                out[name] = st.digest()
            return out
        libs = row.libraries
        names = ["file"] if len(libs) == 1 else [f"file:{lib.library}" for lib in libs]
        sigs = [path_signature(lib.path) for lib in libs]
        sig: Any = sigs[0] if len(libs) == 1 else sigs
        old = read_stamp(stamp_path(self._unit_artifact(spec, row.sample)))
        if (
            old is not None
            and old.info.get("source_signature") == sig
            and all(n in old.inputs for n in names)
        ):
            hashes = [old.inputs[n] for n in names]
        else:
            hashes = [path_sha256(lib.path) for lib in libs]
        self._signatures[row.sample] = sig
        # extra sheet columns (age, sex, ...) are not read here: stages that read one
        # get it joined in (see _sheet_frame), so adding a column re-runs only them
        row_json: dict[str, Any] = {
            "sample": row.sample,
            "donor": row.donor,
            "timepoint": row.timepoint,
        }
        if any(lib.library or lib.counts_layer or lib.symbol_column for lib in libs):
            # sheet options change what is read; absent, the record is as it always was
            row_json["libraries"] = [
                [lib.library, lib.counts_layer, lib.symbol_column] for lib in libs
            ]
        return {**dict(zip(names, hashes, strict=True)), "row": _sha(row_json)}

    def _run_per_sample(
        self, spec: StageSpec, *, force: bool, only: str | None
    ) -> tuple[str, list[Path]]:
        assert self._report is not None
        sheet = self._report.sheet
        cfg_digest = section_digest(self.cfg, *spec.sections)
        sample_func = self._func(spec, spec.sample_func or "")
        self._signatures: dict[str, Any] = {}
        unit_digests: dict[str, str] = {}
        outputs: list[Path] = []
        ran = 0
        rows = [r for r in sheet.rows if only is None or r.sample == only]
        for i, row in enumerate(rows, 1):
            artifact = self._unit_artifact(spec, row.sample)
            expected = Stamp(
                spec.name, row.sample, __version__, self._sample_inputs(spec, row), cfg_digest
            )
            label = f"{spec.name} [{i}/{len(rows)}] {row.sample}"
            if not force and self._is_current(expected, artifact):
                log.info("%s: up to date", label)
            else:

                def compute(row: Any = row) -> StageResult:
                    if not spec.inputs:
                        out = sample_func(dataclasses.replace(row, extra={}), self.cfg)
                    else:
                        ups = [
                            read_h5ad_artifact(self._unit_artifact(get_stage(n), row.sample))
                            for n in spec.inputs
                        ]
                        out = sample_func(*ups, self.cfg, device=self._device)
                    return out if isinstance(out, StageResult) else StageResult(out)

                info: dict[str, Any] = {"source": "; ".join(map(str, row.paths))}
                if row.sample in self._signatures:
                    info["source_signature"] = self._signatures[row.sample]
                outputs += self._execute(spec, expected, artifact, compute, label, info)
                ran += 1
            st = read_stamp(stamp_path(artifact))
            assert st is not None
            unit_digests[row.sample] = st.digest()
        if only is not None:
            return ("ran" if ran else "up to date"), outputs

        # merge step
        artifact = self._artifact(spec)
        expected = Stamp(spec.name, None, __version__, {"samples": _sha(unit_digests)}, cfg_digest)
        if not force and ran == 0 and self._is_current(expected, artifact):
            log.info("%s: up to date", spec.name)
            return "up to date", outputs
        merge = self._func(spec, spec.func)

        opened: list[Any] = []

        def compute_merge() -> StageResult:
            adatas = [self._read(self._unit_artifact(spec, r.sample), opened) for r in sheet.rows]
            out = merge(adatas, self.cfg)
            return out if isinstance(out, StageResult) else StageResult(out)

        with self._closing(opened):
            outputs += self._execute(
                spec, expected, artifact, compute_merge, f"{spec.name} (merge)"
            )
        return "ran", outputs

    def _config_file_inputs(self, spec: StageSpec) -> dict[str, str]:
        """Content hashes of files named in the config that the stage reads."""
        out = {}
        for dotted in spec.config_files:
            value: Any = self.cfg
            for part in dotted.split("."):
                value = getattr(value, part)
            if value is None:
                continue
            path = Path(value)
            if not path.exists():
                raise InputError(
                    f"{dotted}: file {path} does not exist; fix the path in the config"
                )
            out[f"config_file:{dotted}"] = path_sha256(path)
        return out

    def _sheet_columns(self, spec: StageSpec) -> list[str]:
        """The sheet's extra columns the stage reads (``StageSpec.sheet_columns``)."""
        assert self._report is not None
        extra = self._report.sheet.extra_columns
        if "*" in spec.sheet_columns:
            return list(extra)
        named: list[str] = []
        for dotted in spec.sheet_columns:
            value: Any = self.cfg
            for part in dotted.split("."):
                value = getattr(value, part)
            for v in [value] if isinstance(value, str) else list(value or []):
                if v in extra and v not in named:
                    named.append(v)
        return [c for c in extra if c in named]

    def _sheet_frame(self, spec: StageSpec) -> Any:
        """The extra sheet columns the stage reads, typed, one row per sample."""
        assert self._report is not None
        return self._report.sheet.metadata(self._sheet_columns(spec))

    def _sheet_inputs(self, spec: StageSpec) -> dict[str, str]:
        """The stamp input for the sheet columns the stage reads (none: no entry)."""
        frame = self._sheet_frame(spec)
        if frame.shape[1] == 0:
            return {}
        return {"sheet_columns": _sha(frame.astype(object).where(frame.notna(), None).to_dict())}

    @staticmethod
    def _join_sheet(adata: Any, frame: Any) -> None:
        """Add the sheet columns to ``obs`` by ``obs["sample"]`` (typed, blanks missing)."""
        if frame.shape[1] == 0:
            return
        samples = adata.obs[keys.SAMPLE].astype(str).to_numpy()
        for column in frame.columns:
            mapped = frame[column].reindex(samples)  # a categorical stays categorical
            if isinstance(mapped.dtype, pd.CategoricalDtype):
                adata.obs[column] = mapped.cat.remove_unused_categories().array
            else:
                adata.obs[column] = mapped.to_numpy()

    def _run_cohort(self, spec: StageSpec, *, force: bool) -> tuple[str, list[Path]]:
        artifact = self._artifact(spec)
        inputs = {
            **self._upstream_inputs(spec),
            **self._config_file_inputs(spec),
            **self._sheet_inputs(spec),
        }
        expected = Stamp(
            spec.name, None, __version__, inputs, section_digest(self.cfg, *spec.sections)
        )
        if not force and self._is_current(expected, artifact):
            log.info("%s: up to date", spec.name)
            return "up to date", []
        func = self._func(spec, spec.func)
        opened: list[Any] = []

        def compute() -> StageResult:
            upstream = [self._read(self._artifact(get_stage(n)), opened) for n in spec.inputs]
            if upstream:
                self._join_sheet(upstream[0], self._sheet_frame(spec))
            kwargs: dict[str, Any] = {"device": self._device}
            if spec.context:
                before = read_stamp(stamp_path(artifact))
                kwargs["context"] = StageContext(
                    self.outdir,
                    self._provenance(summary=None),
                    stage_dir=artifact.parent,
                    inputs=dict(inputs),
                    # --force recomputes everything, reusable parts included
                    previous=(
                        dict(before.info.get("details") or {})
                        if before is not None and not force
                        else {}
                    ),
                )
            out = func(*upstream, self.cfg, **kwargs)
            return out if isinstance(out, StageResult) else StageResult(out)

        with self._closing(opened):
            return "ran", self._execute(spec, expected, artifact, compute, spec.name)

    def _read(self, path: Path, opened: list[Any]) -> Any:
        """An upstream artifact; with ``backed: true`` its matrices stay on disk."""
        return read_h5ad_artifact(path, backed=self.cfg.backed, opened=opened)

    @staticmethod
    @contextlib.contextmanager
    def _closing(opened: list[Any]) -> Iterator[None]:
        """Close the h5ad files a stage read in backed mode once its outputs are written."""
        try:
            yield
        finally:
            for f in opened:
                with contextlib.suppress(Exception):
                    f.close()
            opened.clear()

    # ------------------------------------------------------------------ provenance
    def _write_provenance(self, summary: RunSummary, failure: dict[str, str] | None = None) -> None:
        prov = self._provenance(summary)
        if failure is not None:
            prov["failed"] = failure
        path = self.outdir / "provenance.json"
        existed = path.exists()
        write_json_atomic(path, prov)
        if not existed:
            self._created.append(path)
        summary.outputs.append(path)

    def _provenance(self, summary: RunSummary | None) -> dict[str, Any]:
        """The provenance record from the stamps on disk (``summary``: this invocation)."""
        assert self._report is not None
        ran = summary.stages if summary is not None else {}
        stages: dict[str, Any] = {}
        all_warnings: list[str] = list(self._report.warnings)
        all_warnings += [w for ws in self._report.stage_warnings.values() for w in ws]
        trace: list[dict[str, Any]] = []

        def traced(stage: str, sample: str | None, st: Stamp) -> None:
            dev = st.info.get("device") or {}
            trace.append(
                {
                    "stage": stage,
                    "sample": sample,
                    **{k: st.info.get(k) for k in _TRACE_KEYS},
                    "device": dev.get("resolved") if isinstance(dev, dict) else dev,
                }
            )

        for spec in STAGES:
            st = read_stamp(stamp_path(self._artifact(spec)))
            if st is None:
                continue
            entry: dict[str, Any] = {
                "status": ran.get(spec.name, "not run in this invocation"),
                **{k: st.info.get(k) for k in _TRACE_KEYS},
                "outputs": st.outputs,
                "config_digest": st.config,
            }
            if st.info.get("details"):
                entry["details"] = st.info["details"]
            units = {}
            if spec.per_sample:
                for row in self._report.sheet.rows:
                    ust = read_stamp(stamp_path(self._unit_artifact(spec, row.sample)))
                    if ust is not None:
                        units[row.sample] = {k: ust.info.get(k) for k in _TRACE_KEYS}
                        all_warnings += ust.info.get("warnings", [])
                        traced(spec.name, row.sample, ust)
                entry["units"] = units
            traced(spec.name, None, st)
            all_warnings += st.info.get("warnings", [])
            stages[spec.name] = entry
        inputs = []
        for row in self._report.sheet.rows:
            ust = read_stamp(stamp_path(self._unit_artifact(get_stage("ingest"), row.sample)))
            if len(row.libraries) == 1:
                inputs.append(
                    {
                        "sample": row.sample,
                        "path": str(row.path),
                        "sha256": ust.inputs.get("file") if ust else None,
                    }
                )
                continue
            libs = [
                {
                    "library": lib.library,
                    "path": str(lib.path),
                    "sha256": ust.inputs.get(f"file:{lib.library}") if ust else None,
                }
                for lib in row.libraries
            ]
            inputs.append(
                {
                    "sample": row.sample,
                    "path": "; ".join(x["path"] for x in libs),
                    "sha256": "; ".join(x["sha256"] or "" for x in libs) if ust else None,
                    "libraries": libs,
                }
            )
        prov = {
            "schema": "immuneage.provenance/1",
            "version": __version__,
            "command": self.argv,
            "finished": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
            "wall_s_this_invocation": round(summary.wall_s, 3) if summary is not None else None,
            "seed": self.cfg.seed,
            "device": self._device_info,
            "config": self.cfg.model_dump(mode="json"),
            "config_yaml": dump_config(self.cfg),
            "config_digest": config_digest(self.cfg),
            "config_path": str(self.config_path) if self.config_path else None,
            "samplesheet": {"path": str(self.samplesheet), "sha256": path_sha256(self.samplesheet)},
            "inputs": inputs,
            "stages": stages,
            "trace": trace,
            "warnings": list(dict.fromkeys(all_warnings)),
            "packages": package_versions(),
            "machine": machine_info(),
        }
        return prov
