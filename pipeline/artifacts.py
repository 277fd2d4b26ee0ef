"""Atomic artifact writing, content hashing and stage stamps.

Every file the pipeline writes goes to a temporary name in the destination
directory first and is then renamed over the final name (``os.replace``), so a
process killed at any instant leaves either the old file, the new file, or a
stray temporary (``.<name>.tmp-<pid>...``) that the next run deletes — never a
half-written artifact under a final name.

A *stamp* (``<artifact>.stamp.json``) is written after the artifact. It records
what the artifact was made from (input hashes, the digest of the config
sections the stage reads, the package version) and what was written (size and
SHA-256 of every output). A stage is up to date when its stamp exists, its
recorded inputs equal the current ones and every output is present with the
recorded size.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pandas as pd
from anndata import AnnData

from . import keys

__all__ = [
    "TMP_MARKER",
    "Stamp",
    "atomic_path",
    "file_sha256",
    "path_sha256",
    "read_h5ad_artifact",
    "read_stamp",
    "remove_stale_temporaries",
    "write_dir_atomic",
    "write_h5ad_atomic",
    "write_json_atomic",
    "write_table_atomic",
    "write_text_atomic",
]

TMP_MARKER = ".tmp-"
_CHUNK = 1 << 20


def _fsync_dir(directory: Path) -> None:
    with contextlib.suppress(OSError):
        fd = os.open(directory, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)


@contextlib.contextmanager
def atomic_path(final: Path) -> Iterator[Path]:
    """Yield a temporary path beside ``final``; on success rename it over ``final``.

    The temporary keeps ``final``'s suffix (some writers look at it). On any
    exception the temporary is removed and ``final`` is untouched.
    """
    final = Path(final)
    final.parent.mkdir(parents=True, exist_ok=True)
    tmp = final.with_name(f".{final.stem}{TMP_MARKER}{os.getpid()}{final.suffix}")
    try:
        yield tmp
        with open(tmp, "rb+") as fh:
            os.fsync(fh.fileno())
        os.replace(tmp, final)
        _fsync_dir(final.parent)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            tmp.unlink()
        raise


def write_text_atomic(path: Path, text: str) -> Path:
    """Write ``text`` to ``path`` atomically."""
    with atomic_path(path) as tmp:
        tmp.write_text(text)
    return Path(path)


def write_json_atomic(path: Path, obj: Any) -> Path:
    """Write ``obj`` as indented, key-sorted JSON atomically."""
    return write_text_atomic(path, json.dumps(obj, indent=2, sort_keys=True, default=str) + "\n")


def write_table_atomic(path: Path, table: pd.DataFrame, *, index: bool = False) -> Path:
    """Write a tab-separated table atomically (deterministic float formatting)."""
    with atomic_path(path) as tmp:
        table.to_csv(tmp, sep="\t", index=index, float_format="%.6g", lineterminator="\n")
    return Path(path)


#: uns flag: the file stores the counts once, in ``X`` (see :func:`write_h5ad_atomic`).
X_IS_COUNTS = "immuneage_x_is_counts"


def write_h5ad_atomic(path: Path, adata: AnnData) -> Path:
    """Write an AnnData atomically (uncompressed h5ad; sparse matrices stay sparse).

    When ``layers["counts"]`` is the very object in ``X`` (raw-count artifacts),
    the matrix is stored once, in ``X``, with a flag in ``uns``;
    :func:`read_h5ad_artifact` restores the layer. This halves the disk and the
    memory of reading ingest artifacts back.
    """
    shared = adata.layers.get(keys.COUNTS) is not None and adata.layers[keys.COUNTS] is adata.X
    if shared:
        layer = adata.layers[keys.COUNTS]
        del adata.layers[keys.COUNTS]
        adata.uns[X_IS_COUNTS] = True
    try:
        with atomic_path(path) as tmp:
            adata.write_h5ad(tmp)
    finally:
        if shared:
            adata.uns.pop(X_IS_COUNTS, None)
            adata.layers[keys.COUNTS] = layer
    return Path(path)


def read_h5ad_artifact(path: Path) -> AnnData:
    """Read an artifact written by :func:`write_h5ad_atomic` (restoring ``layers["counts"]``)."""
    import anndata as ad

    adata = ad.read_h5ad(path)
    if adata.uns.pop(X_IS_COUNTS, False):
        adata.layers[keys.COUNTS] = adata.X
    return adata


def write_dir_atomic(final: Path, writer: Callable[[Path], None]) -> list[Path]:
    """Fill a temporary directory with ``writer`` and rename it to ``final``; return its files.

    An existing ``final`` is replaced (moved aside, then deleted) only after the
    new directory is complete.
    """
    import shutil

    final = Path(final)
    final.parent.mkdir(parents=True, exist_ok=True)
    tmp = final.with_name(f".{final.name}{TMP_MARKER}{os.getpid()}")
    old = final.with_name(f".{final.name}{TMP_MARKER}old-{os.getpid()}")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir()
    try:
        writer(tmp)
        if final.exists():
            os.replace(final, old)
        os.replace(tmp, final)
        _fsync_dir(final.parent)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    finally:
        shutil.rmtree(old, ignore_errors=True)
    return sorted(p for p in final.rglob("*") if p.is_file())


def file_sha256(path: Path) -> str:
    """SHA-256 of a file's bytes."""
    h = hashlib.sha256()
    with open(path, "rb") as fh:
        while chunk := fh.read(_CHUNK):
            h.update(chunk)
    return h.hexdigest()


def path_sha256(path: Path) -> str:
    """SHA-256 of a file, or of a directory's files (names and bytes, sorted by name)."""
    path = Path(path)
    if path.is_dir():
        h = hashlib.sha256()
        for child in sorted(p for p in path.rglob("*") if p.is_file()):
            h.update(str(child.relative_to(path)).encode() + b"\0")
            h.update(file_sha256(child).encode())
        return h.hexdigest()
    return file_sha256(path)


def path_signature(path: Path) -> list[list[Any]]:
    """Cheap change detector: (relative name, size, mtime_ns) of a file or a directory's files."""
    path = Path(path)
    files = sorted(p for p in path.rglob("*") if p.is_file()) if path.is_dir() else [path]
    out = []
    for f in files:
        st = f.stat()
        name = str(f.relative_to(path)) if path.is_dir() else f.name
        out.append([name, st.st_size, st.st_mtime_ns])
    return out


def remove_stale_temporaries(root: Path) -> list[Path]:
    """Delete temporaries (files and directories) left by killed runs under ``root``."""
    import shutil

    removed: list[Path] = []
    if not Path(root).is_dir():
        return removed
    for p in sorted(Path(root).rglob(f".*{TMP_MARKER}*")):
        if any(parent in removed for parent in p.parents):
            continue
        if p.is_dir():
            shutil.rmtree(p, ignore_errors=True)
        else:
            p.unlink(missing_ok=True)
        removed.append(p)
    return removed


@dataclass
class Stamp:
    """What an artifact was made from and what was written.

    Attributes
    ----------
    stage
        Stage name.
    unit
        Sample id for per-sample units, ``None`` for whole-cohort stages.
    version
        immuneage version that wrote it.
    inputs
        Input name -> content hash (upstream artifacts, user files, sheet rows).
    config
        Digest of the config sections the stage reads.
    outputs
        Path relative to the output directory -> ``{"size": int, "sha256": str}``.
    info
        Run facts for provenance (wall time, peak memory, device, warnings, ...).
    """

    stage: str
    unit: str | None
    version: str
    inputs: dict[str, str]
    config: str
    outputs: dict[str, dict[str, Any]] = field(default_factory=dict)
    info: dict[str, Any] = field(default_factory=dict)

    def key(self) -> dict[str, Any]:
        """The part that decides whether a stage must run again."""
        return {
            "stage": self.stage,
            "unit": self.unit,
            "version": self.version,
            "inputs": self.inputs,
            "config": self.config,
        }

    def to_json(self) -> dict[str, Any]:
        return {**self.key(), "outputs": self.outputs, "info": self.info}

    @classmethod
    def from_json(cls, obj: dict[str, Any]) -> Stamp:
        return cls(
            stage=obj["stage"],
            unit=obj.get("unit"),
            version=obj["version"],
            inputs=dict(obj["inputs"]),
            config=obj["config"],
            outputs=dict(obj.get("outputs", {})),
            info=dict(obj.get("info", {})),
        )

    def outputs_present(self, outdir: Path) -> bool:
        """Every recorded output exists with its recorded size."""
        for rel, meta in self.outputs.items():
            p = outdir / rel
            if not p.is_file() or p.stat().st_size != meta["size"]:
                return False
        return bool(self.outputs)

    def record_outputs(self, outdir: Path, paths: list[Path]) -> None:
        """Hash and record the given output files."""
        for p in paths:
            self.outputs[str(Path(p).relative_to(outdir))] = {
                "size": Path(p).stat().st_size,
                "sha256": file_sha256(Path(p)),
            }

    def digest(self) -> str:
        """One hash over all outputs: what downstream stamps record as their input."""
        payload = json.dumps(sorted((k, v["sha256"]) for k, v in self.outputs.items()))
        return hashlib.sha256(payload.encode()).hexdigest()


def read_stamp(path: Path) -> Stamp | None:
    """Read a stamp; a missing or unreadable stamp (e.g. from an older layout) is ``None``."""
    try:
        return Stamp.from_json(json.loads(Path(path).read_text()))
    except (FileNotFoundError, json.JSONDecodeError, KeyError, TypeError):
        return None


def stamp_path(artifact: Path) -> Path:
    """Where the stamp of ``artifact`` lives."""
    return Path(artifact).with_name(Path(artifact).name + ".stamp.json")


Writer = Callable[[Path], None]
