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


def _matrices(adata: AnnData) -> dict[str, Any]:
    """``X`` and every layer, keyed by their h5ad element path."""
    out: dict[str, Any] = {}
    if adata.X is not None:
        out["X"] = adata.X
    for name in adata.layers:
        out[f"layers/{name}"] = adata.layers[name]
    return out


def write_h5ad_atomic(
    path: Path, adata: AnnData, *, link: bool = True, chunk_size: int | None = None
) -> Path:
    """Write an AnnData atomically (uncompressed h5ad; sparse matrices stay sparse).

    When ``layers["counts"]`` is the very object in ``X`` (raw-count artifacts),
    the matrix is stored once, in ``X``, with a flag in ``uns``;
    :func:`read_h5ad_artifact` restores the layer. This halves the disk and the
    memory of reading ingest artifacts back.

    Matrices that are row sources (``backed`` mode; see :mod:`pipeline.io.ondisk`)
    are never loaded whole: one opened in place from another h5ad file becomes an
    HDF5 external link to it (a relative path, so the output directory can be
    moved as a whole) when ``link`` is true, and any other row source is written
    block by block (``chunk_size`` rows at a time). ``link=False`` gives a file that
    holds every matrix itself (the run's final AnnData).
    """
    from .io.ondisk import source_location, write_csr
    from .kernels.sparse import DEFAULT_CHUNK_SIZE, is_row_source

    shared = adata.layers.get(keys.COUNTS) is not None and adata.layers[keys.COUNTS] is adata.X
    lazy = {k: m for k, m in _matrices(adata).items() if is_row_source(m)}
    if shared:
        lazy.pop(f"layers/{keys.COUNTS}", None)
    target = adata
    if lazy:
        # a shallow skeleton without the lazy matrices; they are added below
        target = AnnData(
            X=None if "X" in lazy else adata.X,
            obs=adata.obs,
            var=adata.var,
            uns=adata.uns,
            obsm=dict(adata.obsm.items()),
            varm=dict(adata.varm.items()),
            obsp=dict(adata.obsp.items()),
            layers={k: v for k, v in adata.layers.items() if f"layers/{k}" not in lazy},
        )
    layer = None
    if shared:
        layer = target.layers[keys.COUNTS]
        del target.layers[keys.COUNTS]
        target.uns[X_IS_COUNTS] = True
    try:
        with atomic_path(path) as tmp:
            target.write_h5ad(tmp)
            if lazy:
                import h5py

                with h5py.File(tmp, "a") as f:
                    for elem, matrix in lazy.items():
                        where = source_location(matrix)
                        if link and where is not None:
                            rel = os.path.relpath(where[0], start=Path(path).parent)
                            f[elem] = h5py.ExternalLink(rel, where[1])
                        else:
                            parent, _, name = elem.rpartition("/")
                            group = f.require_group(parent) if parent else f
                            write_csr(
                                group, name, matrix, chunk_size=chunk_size or DEFAULT_CHUNK_SIZE
                            )
    finally:
        if shared:
            target.uns.pop(X_IS_COUNTS, None)
            target.layers[keys.COUNTS] = layer
    return Path(path)


def read_h5ad_artifact(
    path: Path, *, backed: bool = False, opened: list[Any] | None = None
) -> AnnData:
    """Read an artifact written by :func:`write_h5ad_atomic` (restoring ``layers["counts"]``).

    Parameters
    ----------
    path
        The h5ad file.
    backed
        Leave ``X`` and the layers on disk: they become on-disk CSR datasets
        (row sources, read a block of rows at a time; external links are
        followed); everything else (``obs``, ``var``, ``obsm``, ``obsp``,
        ``uns``) is read into memory.
    opened
        With ``backed``: the open :class:`h5py.File` is appended here, for the
        caller to close once the matrices are no longer needed.
    """
    import anndata as ad

    if not backed:
        adata = ad.read_h5ad(path)
    else:
        import h5py

        from .io.ondisk import open_csr

        f = h5py.File(path, "r")
        if opened is not None:
            opened.append(f)

        def matrix(elem: Any) -> Any:
            if (
                isinstance(elem, h5py.Group)
                and elem.attrs.get("encoding-type") == "csr_matrix"
                and min(elem.attrs["shape"]) > 0  # e.g. QC units: cells x 0 genes
            ):
                return open_csr(elem)
            return ad.io.read_elem(elem)

        parts = {
            k: ad.io.read_elem(f[k])
            for k in ("obs", "var", "uns", "obsm", "varm", "obsp", "varp")
            if k in f
        }
        layers = {k: matrix(f["layers"][k]) for k in f["layers"]} if "layers" in f else {}
        adata = AnnData(X=matrix(f["X"]) if "X" in f else None, layers=layers, **parts)
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
