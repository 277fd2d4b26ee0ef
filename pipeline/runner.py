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

__all__ = ["RunSummary", "Runner", "StageStatus", "ValidationReport", "validate_inputs"]

log = logging.getLogger("immuneage")


# --------------------------------------------------------------------------- run summary
@dataclass
class RunSummary:
    """What a run did: per stage, ``ran`` or ``up to date``, and where outputs are."""

    outdir: Path
    stages: dict[str, str] = field(default_factory=dict)
    outputs: list[Path] = field(default_factory=list)
    device: str = "cpu"
    wall_s: float = 0.0


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
    """

    def __init__(
        self,
        samplesheet: Path,
        config: Config,
        outdir: Path,
        *,
        config_path: Path | None = None,
        argv: Sequence[str] | None = None,
    ) -> None:
        self.samplesheet = Path(samplesheet).resolve()
        self.cfg = config
        self.outdir = Path(outdir).resolve()
        self.config_path = Path(config_path).resolve() if config_path else None
        self.argv = list(argv) if argv is not None else list(sys.argv)
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
        selected = self._select(stage, until)
        forced = set(selected) if force else set()
        if from_stage is not None:
            names = stage_names()
            get_stage(from_stage)
            forced |= {s for s in selected if names.index(s) >= names.index(from_stage)}
        if sample is not None and not (len(selected) == 1 and get_stage(selected[0]).per_sample):
            per_sample = [s.name for s in STAGES if s.per_sample]
            raise InputError(
                f"--sample works only with --stage set to a per-sample stage ({', '.join(per_sample)})"
            )

        self._report = validate_inputs(self.samplesheet, self.cfg, defer_stage_warnings=True)
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
        try:
            with outdir_lock(self.outdir, sample=sample):
                if sample is None:
                    for p in remove_stale_temporaries(self.outdir):
                        log.info("removed a temporary left by an interrupted run: %s", p)
                if stage is not None and not get_stage(stage).per_sample:
                    # per-sample stages check their upstream units sample by sample
                    self._upstream_inputs(get_stage(stage))
                for name in selected:
                    spec = get_stage(name)
                    status, outputs = self._run_stage(spec, force=name in forced, sample=sample)
                    if status == "ran":  # checks about this stage, issued when it runs
                        for text in self._report.stage_warnings.get(name, ()):
                            warnings.warn(text, ImmuneageWarning, stacklevel=2)
                    summary.stages[name] = status
                    summary.outputs.extend(outputs)
                summary.wall_s = time.perf_counter() - t0
                if sample is None:
                    self._write_provenance(summary)
        except InputError:
            self._discard_created(created_outdir)
            raise
        return summary

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
                    inputs = {**self._upstream_inputs(spec), **files}
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
    def _select(self, stage: str | None, until: str | None) -> list[str]:
        names = stage_names()
        for n in (stage, until):
            if n is not None and n not in names:
                raise InputError(f"unknown stage {n!r}; stages are: {', '.join(names)}")
        if stage is not None and until is not None:
            raise InputError("give either --stage or --until, not both")
        if stage is not None:
            return [stage]
        if until is not None:
            return names[: names.index(until) + 1]
        return names

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

    def _discard_created(self, created_outdir: bool) -> None:
        if created_outdir:
            shutil.rmtree(self.outdir, ignore_errors=True)
            return
        for p in reversed(self._created):
            with contextlib.suppress(FileNotFoundError):
                p.unlink()

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
            text = f"{where}: {w.message}"
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
            "wall_s": round(meter.wall_s, 3),
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
        row_json: dict[str, Any] = {
            "sample": row.sample,
            "donor": row.donor,
            "timepoint": row.timepoint,
            "extra": row.extra,
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
                        out = sample_func(row, self.cfg)
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

    def _run_cohort(self, spec: StageSpec, *, force: bool) -> tuple[str, list[Path]]:
        artifact = self._artifact(spec)
        inputs = {**self._upstream_inputs(spec), **self._config_file_inputs(spec)}
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
            kwargs: dict[str, Any] = {"device": self._device}
            if spec.context:
                before = read_stamp(stamp_path(artifact))
                kwargs["context"] = StageContext(
                    self.outdir,
                    self._provenance(summary=None),
                    stage_dir=artifact.parent,
                    inputs=dict(inputs),
                    previous=dict(before.info.get("details") or {}) if before is not None else {},
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
    def _write_provenance(self, summary: RunSummary) -> None:
        prov = self._provenance(summary)
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
        for spec in STAGES:
            st = read_stamp(stamp_path(self._artifact(spec)))
            if st is None:
                continue
            entry: dict[str, Any] = {
                "status": ran.get(spec.name, "not run in this invocation"),
                **{k: st.info.get(k) for k in ("wall_s", "peak_rss_mb", "finished", "host")},
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
                        units[row.sample] = {
                            k: ust.info.get(k) for k in ("wall_s", "peak_rss_mb", "host")
                        }
                        all_warnings += ust.info.get("warnings", [])
                entry["units"] = units
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
            "warnings": list(dict.fromkeys(all_warnings)),
            "packages": package_versions(),
            "machine": machine_info(),
        }
        return prov
