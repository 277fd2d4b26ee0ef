"""Command-line interface: ``immuneage run | demo | validate | stages | config``.

Exit codes: 0 success, 2 bad input (message names the culprit), 1 internal error.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import sys
import time
import warnings
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from . import __version__
from .errors import ImmuneageError, InputError, OutputWriteError

__all__ = ["main"]

log = logging.getLogger("immuneage")


class _StderrHandler(logging.StreamHandler):
    """The terminal's handler: writes to ``sys.stderr`` as it is at each message, not as
    it was at setup (a later ``main()`` in the same process, or a notebook that swapped
    stderr, gets the lines); records marked ``file_only`` (the run log's header) are
    left to the run log."""

    console = True  # pipeline.progress draws bars only when this handler shows INFO

    @property  # type: ignore[override]
    def stream(self) -> Any:
        return sys.stderr

    @stream.setter
    def stream(self, value: Any) -> None:
        pass

    def filter(self, record: logging.LogRecord) -> bool:  # type: ignore[override]
        return not getattr(record, "file_only", False) and super().filter(record)


_shown_warnings: set[str] = set()


def _show_warning(
    message: Warning | str,
    category: type[Warning],
    filename: str,
    lineno: int,
    file: Any = None,
    line: str | None = None,
) -> None:
    """Warnings as one log line each, once per text, without Python source lines.

    A library's numeric warning (e.g. numpy's ``RuntimeWarning``) names its category
    and origin so it can be reported; immuneage's own warnings are plain text.
    """
    from .errors import ImmuneageWarning

    text = str(message).strip()
    if not issubclass(category, ImmuneageWarning):
        origin = Path(filename).parent.name + "/" + Path(filename).name if filename else "?"
        text = f"{text} ({category.__name__} from {origin}:{lineno})"
    if text in _shown_warnings:
        return
    _shown_warnings.add(text)
    log.warning("warning: %s", text)


def _setup_logging(quiet: bool, verbose: bool = False) -> None:
    handler = _StderrHandler()
    handler.setFormatter(logging.Formatter("[immuneage %(asctime)s] %(message)s", "%H:%M:%S"))
    handler.setLevel(logging.WARNING if quiet else (logging.DEBUG if verbose else logging.INFO))
    log.handlers[:] = [handler]
    # the run log (<outdir>/logs/) takes INFO even when the terminal is quiet
    log.setLevel(logging.DEBUG if verbose else logging.INFO)
    log.propagate = False
    logging.captureWarnings(False)
    _shown_warnings.clear()
    warnings.showwarning = _show_warning


def _add_run_args(p: argparse.ArgumentParser) -> None:
    from .stages import stage_names

    names = stage_names()
    p.add_argument(
        "--samplesheet",
        required=True,
        type=Path,
        help="CSV: sample, donor, timepoint, path; optional library, counts_layer, "
        "symbol_column (per line); extra columns (age, batch, ...) go into obs",
    )
    p.add_argument(
        "--config",
        type=Path,
        default=None,
        help="YAML config (default: built-in defaults = configs/default.yaml)",
    )
    p.add_argument(
        "--outdir",
        required=True,
        type=Path,
        help="output directory (resumed if it holds an earlier run)",
    )
    sel = p.add_mutually_exclusive_group()
    sel.add_argument(
        "--stage", choices=names, help="run only this stage (its upstream stages must be done)"
    )
    sel.add_argument("--until", choices=names, help="run all stages up to and including this one")
    p.add_argument(
        "--from", dest="from_stage", choices=names, help="re-run this stage and all later ones"
    )
    p.add_argument(
        "--force", action="store_true", help="re-run every selected stage even if up to date"
    )
    p.add_argument(
        "--qc-only",
        action="store_true",
        help="pilot run: ingest and QC only, then OUTDIR/qc_report.html; needs no study design "
        "(one sample, any timepoint names)",
    )
    p.add_argument(
        "--sample",
        help="with --stage of a per-sample stage: process only this sample (Slurm array task)",
    )
    p.add_argument(
        "--threads",
        type=int,
        default=None,
        metavar="N",
        help="use at most N threads (BLAS/OpenMP, torch, numba); default: config 'threads'",
    )
    p.add_argument(
        "--quiet",
        action="store_true",
        help="only warnings and errors on the terminal (the run log under OUTDIR/logs/ keeps all)",
    )


def _build_parser() -> argparse.ArgumentParser:
    from .stages import stage_names

    parser = argparse.ArgumentParser(
        prog="immuneage",
        description="Single-cell immune profiling of longitudinal (exercise) cohorts.",
    )
    parser.add_argument("--version", action="version", version=f"immuneage {__version__}")
    parser.add_argument("--debug", action="store_true", help="show tracebacks of internal errors")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    p_run = sub.add_parser(
        "run",
        help="run the pipeline on a sample sheet",
        description="Run the pipeline; stages whose stamps are current are skipped (resume).",
    )
    _add_run_args(p_run)

    p_demo = sub.add_parser(
        "demo",
        help="generate the built-in demo cohort and run the pipeline on it",
        description="Write the synthetic demo cohort (13 donors x 3 timepoints, planted truth) under OUTDIR/cohort and run the pipeline into OUTDIR/results.",
    )
    p_demo.add_argument(
        "--outdir",
        type=Path,
        default=Path("immuneage_demo"),
        help="where the cohort and the results go (default: ./immuneage_demo)",
    )
    p_demo.add_argument(
        "--size",
        choices=["ci", "default", "large"],
        default="default",
        help="cohort size: ci (~3k cells), default (~30k), large (--n-cells)",
    )
    p_demo.add_argument("--n-cells", type=int, default=None, help="total cells for --size large")
    p_demo.add_argument("--seed", type=int, default=0, help="seed of the cohort generator")
    p_demo.add_argument(
        "--config",
        type=Path,
        default=None,
        help="YAML config (default: the built-in demo config = configs/demo.yaml)",
    )
    p_demo.add_argument("--no-run", action="store_true", help="only write the cohort")
    p_demo.add_argument(
        "--threads", type=int, default=None, metavar="N", help="use at most N threads"
    )
    p_demo.add_argument("--quiet", action="store_true", help="only warnings and errors")

    p_val = sub.add_parser(
        "validate",
        help="check a sample sheet, config and counts files without running anything",
        description="Fast checks of everything a run needs before compute (no matrix is loaded; "
        "a sampled block of values per file): the files each line reads and how, counts that are "
        "counts, genes shared by the samples, the species (the shipped panels are human), the QC "
        "gene prefixes, and, for the stages up to --until: covariate and batch columns, gene sets "
        "and marker panel against the cohort's genes, donors per contrast vs min_donors.",
    )
    p_val.add_argument("--samplesheet", required=True, type=Path, help="as for `immuneage run`")
    p_val.add_argument("--config", type=Path, default=None)
    p_val.add_argument(
        "--until",
        choices=stage_names(),
        default=None,
        help="check only what the stages up to this one need (as `run --until`)",
    )
    p_val.add_argument(
        "--qc-only", action="store_true", help="check what a pilot run (`run --qc-only`) needs"
    )
    p_val.add_argument("--quiet", action="store_true")

    sub.add_parser(
        "stages",
        help="list the stages in run order",
        description="List the stages, their inputs, config sections and outputs.",
    )

    p_cfg = sub.add_parser(
        "config",
        help="print the effective config or its JSON schema",
        description="Print a config after validation (defaults filled in), or the JSON schema.",
    )
    p_cfg.add_argument(
        "--config",
        type=Path,
        default=None,
        help="YAML to validate and print (default: the defaults)",
    )
    p_cfg.add_argument("--demo", action="store_true", help="print the demo config")
    p_cfg.add_argument("--schema", action="store_true", help="print the JSON schema instead")

    p_gs = sub.add_parser(
        "genesets",
        help="list the built-in gene sets (name, size, source) or print one",
        description="List the built-in gene sets scored by the `score` stage, or print one set's "
        "genes; --gmt writes the selected sets as a GMT file to start your own.",
    )
    p_gs.add_argument("names", nargs="*", help="sets to print (default: list all)")
    p_gs.add_argument("--gmt", action="store_true", help="print the sets in GMT format")
    _add_slurm_parser(sub)
    return parser


def _add_slurm_parser(sub: argparse._SubParsersAction) -> None:
    p_slurm = sub.add_parser(
        "slurm",
        help="run the pipeline as a Slurm job graph (submit, status, cancel)",
        description="Submit the pipeline as dependent Slurm jobs (per-sample array, then one job "
        "per stage group), follow them, cancel them. See slurm/README.md.",
    )
    ssub = p_slurm.add_subparsers(dest="slurm_command", required=True, metavar="SUBCOMMAND")
    p_sub = ssub.add_parser(
        "submit",
        help="submit the job graph (only what is not up to date)",
        description="Validate the inputs, then submit one Slurm job per stage group with "
        "sbatch --dependency=afterok; groups and samples already up to date are left out.",
    )
    p_sub.add_argument("--samplesheet", required=True, type=Path, help="as for `immuneage run`")
    p_sub.add_argument("--config", type=Path, default=None, help="as for `immuneage run`")
    p_sub.add_argument("--outdir", required=True, type=Path, help="as for `immuneage run`")
    p_sub.add_argument(
        "--profile",
        default=None,
        help="resource profile YAML, or a shipped one by name (generic, localhost); "
        "default: generic",
    )
    p_sub.add_argument(
        "--dry-run", action="store_true", help="print the graph and the scripts, submit nothing"
    )
    p_sub.add_argument("--quiet", action="store_true", help="print only the job table")
    p_st = ssub.add_parser(
        "status",
        help="state of each job; explain failures, cancel jobs that can never run",
        description="Show each job group's state (scontrol/squeue; sacct when available). A "
        f"failed job: its stage and log are shown and the dependents stuck behind it are "
        f"cancelled. Exit code {_SLURM_EXIT_FAILED} when a job failed.",
    )
    p_st.add_argument("outdir", type=Path, help="the --outdir of the submission")
    p_st.add_argument(
        "--no-cancel", action="store_true", help="do not cancel dependents of a failed job"
    )
    p_st.add_argument("--lines", type=int, default=15, help="log lines to quote per failed job")
    p_can = ssub.add_parser(
        "cancel",
        help="cancel the submission's queued and running jobs",
        description="scancel every job of the last submission to OUTDIR that has not finished.",
    )
    p_can.add_argument("outdir", type=Path, help="the --outdir of the submission")


#: Exit code of ``immuneage slurm status`` when a job failed (see pipeline.slurm.status).
_SLURM_EXIT_FAILED = 3


def _cmd_slurm(args: argparse.Namespace, argv: Sequence[str]) -> int:
    from .slurm.status import EXIT_FAILED, cancel_all, refresh
    from .slurm.submit import plan_submission, submit

    if args.slurm_command == "submit":
        plan = plan_submission(args.samplesheet, args.config, args.outdir, args.profile)
        if not plan.jobs:
            print(f"everything is up to date in {plan.paths.outdir}; nothing to submit")
            return 0
        if args.dry_run:
            print(f"dry run: {len(plan.jobs)} job(s) would be submitted for {plan.paths.outdir}")
            print(plan.graph_text())
            for job in plan.jobs:
                print(f"\n==> {job.script_path} <==")
                print(job.script, end="")
            return 0
        record = submit(plan, argv=["immuneage", *argv])
        ids = {g: e["job_id"] for g, e in record["groups"].items()}
        print(f"submitted {len(ids)} job(s) for {plan.paths.outdir}:")
        print(plan.graph_text(ids))
        if not args.quiet:
            print(f"scripts, logs and jobs.json in {plan.paths.outdir / 'slurm'}")
            print(f"follow with: immuneage slurm status {plan.paths.outdir}")
        return 0
    if args.slurm_command == "status":
        report = refresh(args.outdir, cancel=not args.no_cancel, n_lines=args.lines)
        print(report.text())
        return EXIT_FAILED if report.failed else 0
    cancelled = cancel_all(args.outdir)
    print(f"cancelled: {', '.join(cancelled)}" if cancelled else "no job left to cancel")
    return 0


def _cmd_run(args: argparse.Namespace, argv: Sequence[str]) -> int:
    from .config import load_config
    from .runner import Runner

    cfg = _with_threads(load_config(args.config), args.threads)
    until = args.until
    notes: list[str] = []
    if args.qc_only:
        from .runner import PILOT_STAGES, pilot_config

        if args.stage is not None or (args.until and args.until not in PILOT_STAGES):
            flag = f"--stage {args.stage}" if args.stage else f"--until {args.until}"
            raise InputError(f"--qc-only runs {' and '.join(PILOT_STAGES)}; drop {flag}")
        until = args.until or PILOT_STAGES[-1]
        cfg, notes = pilot_config(args.samplesheet, cfg)
    runner = Runner(
        args.samplesheet,
        cfg,
        args.outdir,
        config_path=args.config,
        argv=["immuneage", *argv],
        notes=notes,
    )
    summary = runner.run(
        stage=args.stage,
        until=until,
        from_stage=args.from_stage,
        force=args.force,
        sample=args.sample,
    )
    _print_summary(summary)
    if args.qc_only and (summary.outdir / "qc_report.html").exists():
        print(f"QC report: {summary.outdir / 'qc_report.html'}")
    return 0


def _with_threads(cfg: Any, threads: int | None) -> Any:
    """The config with ``threads`` from ``--threads`` (validated like the config key)."""
    if threads is None:
        return cfg
    if threads < 1:
        raise InputError(f"--threads {threads}: give a positive number of threads")
    return cfg.model_copy(update={"threads": threads})


def _print_summary(summary: object) -> None:
    stages = getattr(summary, "stages", {})
    width = max((len(s) for s in stages), default=5)
    print(f"immuneage {__version__}: outputs in {summary.outdir}")  # type: ignore[attr-defined]
    for name, status in stages.items():
        print(f"  {name:<{width}}  {status}")
    prov = summary.outdir / "provenance.json"  # type: ignore[attr-defined]
    if prov.exists():
        print(f"  provenance: {prov}")
    print(f"  device: {summary.device}; wall time {summary.wall_s:.1f} s")  # type: ignore[attr-defined]
    if getattr(summary, "log", None) is not None:
        print(f"  log: {summary.log}")  # type: ignore[attr-defined]
    report = summary.outdir / "report.html"  # type: ignore[attr-defined]
    if report.exists():
        print(f"report: {report}")


def _cmd_demo(args: argparse.Namespace, argv: Sequence[str]) -> int:
    from .config import demo_config, load_config
    from .datasets import SIZES, demo_cohort
    from .runner import Runner

    outdir = args.outdir.resolve()
    cohort_dir = outdir / "cohort"
    truth = cohort_dir / "truth.json"
    reuse = False
    if truth.exists():
        meta = json.loads(truth.read_text())
        wanted = args.n_cells if args.n_cells is not None else SIZES[args.size]
        reuse = (
            meta.get("size") == args.size
            and meta.get("seed") == args.seed
            and meta.get("n_cells_requested") == wanted
        )
    if reuse:
        log.info("reusing the demo cohort in %s", cohort_dir)
        sheet = cohort_dir / "samplesheet.csv"
    else:
        t0 = time.perf_counter()
        cohort = demo_cohort(cohort_dir, size=args.size, seed=args.seed, n_cells=args.n_cells)
        sheet = cohort.samplesheet
        log.info(
            "demo cohort (%s cells) written in %.1f s", cohort.n_cells, time.perf_counter() - t0
        )
    print(f"demo cohort: {cohort_dir} (sample sheet {sheet}, planted truth {truth})")
    if args.no_run:
        return 0
    cfg = _with_threads(load_config(args.config) if args.config else demo_config(), args.threads)
    covariates = cohort_dir / "covariates.csv"
    if not args.config and covariates.exists():
        # the demo's plasma betaine per sample: the covariate-association analysis runs too
        cfg.differential.covariates = str(covariates)
    runner = Runner(
        sheet, cfg, outdir / "results", config_path=args.config, argv=["immuneage", *argv]
    )
    _print_summary(runner.run())
    return 0


def _cmd_validate(args: argparse.Namespace) -> int:
    from .config import load_config
    from .preflight import validate_inputs
    from .runner import PILOT_STAGES, pilot_config
    from .stages import stage_names

    cfg = load_config(args.config)
    names = stage_names()
    until = args.until or (PILOT_STAGES[-1] if args.qc_only else names[-1])
    if args.qc_only:
        if until not in PILOT_STAGES:
            raise InputError(f"--qc-only checks {' and '.join(PILOT_STAGES)}; drop --until {until}")
        cfg, notes = pilot_config(args.samplesheet, cfg)
        for note in notes:
            print(note)
    with warnings.catch_warnings(record=True) as caught:  # listed once below, on stdout
        warnings.simplefilter("always")
        try:
            report = validate_inputs(args.samplesheet, cfg, stages=names[: names.index(until) + 1])
        except InputError:
            for w in caught:  # what was found before the error still helps
                _show_warning(w.message, w.category, w.filename, w.lineno)
            raise
    table = report.table()
    if not args.quiet:
        print(table.drop(columns=["path"]).to_string(index=False))
    sheet = report.sheet
    libraries = f" ({len(table)} libraries)" if len(table) > len(sheet.rows) else ""
    print(
        f"OK: {len(sheet.rows)} samples{libraries}, {len(sheet.donors)} donors, "
        f"{int(table['n_cells'].sum())} cells, {report.shared_genes} genes shared by all samples"
    )
    for w in report.warnings:
        print(f"warning: {w}")
    return 0


def _cmd_stages() -> int:
    from .stages import STAGES

    for i, s in enumerate(STAGES, 1):
        kind = "per sample, then merged" if s.per_sample else "whole cohort"
        print(f"{i}. {s.name}: {s.summary}")
        print(
            f"   runs: {kind}; reads: {', '.join(s.inputs) or 'the sample sheet'}; config: {', '.join(s.sections) or '-'}"
        )
        print(f"   writes: {', '.join(s.outputs)}")
    return 0


def _cmd_genesets(args: argparse.Namespace) -> int:
    from .genesets import builtin_sets

    sets = builtin_sets()
    unknown = [n for n in args.names if n not in sets]
    if unknown:
        raise InputError(
            f"no built-in gene set {', '.join(map(repr, unknown))}; available: {', '.join(sets)}"
        )
    chosen = [sets[n] for n in args.names] if args.names else list(sets.values())
    if args.gmt:
        for gs in chosen:
            print("\t".join([gs.name, f"{gs.label} ({gs.version})", *gs.genes]))
    elif args.names:
        for gs in chosen:
            print(f"{gs.name}: {gs.label} ({len(gs.genes)} genes, {gs.version})")
            print(f"  source: {gs.source}")
            print(f"  genes: {' '.join(gs.genes)}")
    else:
        width = max(len(gs.name) for gs in chosen)
        for gs in chosen:
            print(f"{gs.name:<{width}}  {len(gs.genes):>4} genes  {gs.label}")
        print("\n`immuneage genesets NAME` shows a set's genes and source; --gmt exports them.")
    return 0


def _cmd_config(args: argparse.Namespace) -> int:
    from .config import config_json_schema, demo_config, dump_config, load_config

    if args.schema:
        print(json.dumps(config_json_schema(), indent=2))
        return 0
    cfg = demo_config() if args.demo else load_config(args.config)
    print(dump_config(cfg), end="")
    return 0


def _message(exc: BaseException) -> str:
    """The error's text and its notes (e.g. the runner's note on what is kept and how to resume)."""
    notes = [n for n in getattr(exc, "__notes__", ()) if n]
    return "\n".join([str(exc), *notes])


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of the ``immuneage`` console script; returns the exit code."""
    argv = list(sys.argv[1:] if argv is None else argv)
    parser = _build_parser()
    args = parser.parse_args(argv)
    _setup_logging(getattr(args, "quiet", False))
    try:
        if args.command == "run":
            return _cmd_run(args, argv)
        if args.command == "demo":
            return _cmd_demo(args, argv)
        if args.command == "validate":
            return _cmd_validate(args)
        if args.command == "stages":
            return _cmd_stages()
        if args.command == "config":
            return _cmd_config(args)
        if args.command == "genesets":
            return _cmd_genesets(args)
        if args.command == "slurm":
            return _cmd_slurm(args, argv)
    except InputError as exc:
        print(f"immuneage: error: {_message(exc)}", file=sys.stderr)
        return exc.exit_code
    except OutputWriteError as exc:
        print(f"immuneage: error: {_message(exc)}", file=sys.stderr)
        global _HARD_EXIT
        _HARD_EXIT = True
        return exc.exit_code
    except BrokenPipeError:  # e.g. `immuneage stages | head`
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return 0
    except KeyboardInterrupt:
        print("immuneage: interrupted; rerun the same command to resume", file=sys.stderr)
        return 130
    except (ImmuneageError, Exception) as exc:  # internal error
        if args.debug:
            raise
        print(
            f"immuneage: internal error: {type(exc).__name__}: {_message(exc)}\n"
            "This is a bug in immuneage, not in your input: rerun with --debug for the traceback "
            "and report it.",
            file=sys.stderr,
        )
        return 1
    parser.error(f"unknown command {args.command}")
    return 2


#: Set when an output write failed: HDF5 may still hold a file it cannot flush,
#: and its teardown at interpreter exit can crash; the console entry then exits
#: without that teardown (the error is already reported, nothing is half-written).
_HARD_EXIT = False


def console_main() -> None:
    """The ``immuneage`` console script: :func:`main`, then exit with its code."""
    code = main()
    if _HARD_EXIT:
        sys.stdout.flush()
        sys.stderr.flush()
        logging.shutdown()
        os._exit(code)
    sys.exit(code)


if __name__ == "__main__":
    console_main()
