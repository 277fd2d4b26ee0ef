"""Stage ``integrate``: scVI latent space of the samples, corrected for the batch key.

Reads the preprocess AnnData and

1. checks that ``integrate.batch_key`` and every covariate are ``obs`` columns
   (an :class:`~pipeline.errors.InputError` listing the columns otherwise),
   without missing values, continuous covariates numeric and finite; warns
   (:class:`~pipeline.errors.ImmuneageWarning`) when the batch key is the donor,
   because correcting on the donor also removes donor-level biology;
2. trains scvi-tools' :class:`~scvi.model.SCVI` on the raw counts
   (``layers["counts"]``) of the highly variable genes, conditioned on the batch
   key and the covariates, with the model size, likelihood, epochs, minibatch
   size, learning rate and early stopping of ``cfg.integrate``;
   ``scvi.settings.seed = cfg.seed``; on the run's device (lightning
   accelerator ``gpu`` for a CUDA device, else ``cpu``; one device). The
   validation ELBO is computed every epoch (it feeds early stopping and the
   history table);
3. writes the posterior mean of the latent space to ``obsm["X_scVI"]`` and
   computes integration metrics of ``X_pca`` vs ``X_scVI``
   (:func:`pipeline.stats.integration.integration_metrics`, without cell-type
   labels, which do not exist yet; see that module for what is reported).

Progress (:mod:`pipeline.progress`): on a terminal scvi-tools draws its own
epoch bar (on stderr); elsewhere (Slurm logs, CI) one plain line per
:func:`pipeline.progress.interval` seconds, ``scVI: epoch 12/25 (48%), train
loss 1034.2, 41 s elapsed, ~44 s left``; nothing when the ``immuneage`` logger is
quiet. Lightning's and scvi-tools' informational chatter (GPU/TPU available,
``LOCAL_RANK``, data loader worker hints) is silenced while scVI trains; their
warnings and errors still show. The early-stopping message scvi-tools prints to
stdout goes to the ``immuneage`` logger instead.

Resume (with a :class:`~pipeline.stages.StageContext` from the runner): the
training is keyed by :func:`training_key` (what the stage is computed from, the
seed and every ``integrate`` key except the metrics-only ones,
:data:`METRICS_ONLY_KEYS`). When the key equals the one the previous completed
run in the same output directory recorded, and its ``scvi_model/`` and
``integrate.h5ad`` are there and agree, the model is not trained again: its
files are carried over byte for byte, ``X_scVI`` is read from the previous
artifact (bit-identical), and only the integration metrics are recomputed.

Determinism: on the CPU the same seed gives a bit-identical ``X_scVI`` (tested).
On CUDA, cuBLAS reductions are not bit-reproducible; expect small differences.
"""

from __future__ import annotations

import contextlib
import copy
import hashlib
import io
import json
import logging
import sys
import warnings
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import anndata as ad
import numpy as np
import pandas as pd

from .. import __version__, keys
from ..errors import ImmuneageWarning, InputError
from ..progress import interactive, lightning_callback, verbose
from ._base import StageContext, StageResult

if TYPE_CHECKING:
    import scvi
    import torch

    from ..config import Config, IntegrateConfig

__all__ = [
    "METRICS_ONLY_KEYS",
    "check_integrate_inputs",
    "run_integrate",
    "scvi_accelerator",
    "train_scvi",
    "training_key",
]

log = logging.getLogger("immuneage")

#: ``integrate`` keys that change only the integration metrics, not the trained model.
METRICS_ONLY_KEYS: frozenset[str] = frozenset({"metrics_max_cells"})

#: Where the model lives in the stage directory, and the stage's artifact there.
MODEL_DIR = "scvi_model"
ARTIFACT = "integrate.h5ad"

#: Loggers silenced (to WARNING) while scVI trains: "GPU available: ...",
#: "LOCAL_RANK: 0 - CUDA_VISIBLE_DEVICES", "Running sanity check", ... (INFO).
_CHATTY_LOGGERS = (
    "lightning",
    "lightning.pytorch",
    "lightning.pytorch.utilities.rank_zero",
    "lightning.pytorch.accelerators.cuda",
    "lightning.fabric",
    "lightning.fabric.utilities.rank_zero",
    "lightning_fabric",
    "pytorch_lightning",
    "scvi",
)
#: Warnings of lightning and torch that say nothing about the user's data.
_NOISE = (
    r".*does not have many workers.*",
    r".*LeafSpec.*",
    r".*litlogger.*",
    r".*smaller than the logging interval.*",
    r".*cells moved from training set to validation set.*",
    r".*The `srun` command is available on your system.*",  # Slurm installed, not in a job
    r".*num_workers.*",
    r".*GPU available but not used.*",
    r".*Trying to infer the `batch_size`.*",
)


def max_epochs_heuristic(n_cells: int) -> int:
    """scvi-tools' default epoch count: 400 up to 20k cells, then 400 * 20k / n (at least 1)."""
    return max(1, min(400, round(20_000 / max(n_cells, 1) * 400)))


def scvi_accelerator(device: torch.device | str) -> tuple[str, int | list[int]]:
    """Lightning ``(accelerator, devices)`` for the run's device.

    ``("gpu", [index])`` for ``cuda:<index>``, ``("gpu", 1)`` for ``cuda``,
    ``("cpu", 1)`` otherwise.
    """
    import torch

    dev = device if isinstance(device, torch.device) else torch.device(device)
    if dev.type == "cuda":
        return "gpu", ([dev.index] if dev.index is not None else 1)
    return "cpu", 1


def _columns_message(adata: ad.AnnData) -> str:
    return ", ".join(map(str, adata.obs.columns))


def check_integrate_inputs(adata: ad.AnnData, cfg: IntegrateConfig) -> None:
    """Check the columns, layers and genes scVI will read; warn about a donor batch key.

    Raises
    ------
    InputError
        A batch or covariate column is missing or has missing values, a
        continuous covariate is not numeric and finite, ``layers["counts"]``
        or ``var["highly_variable"]`` is missing, or fewer than two HVGs.
    """
    roles = [("integrate.batch_key", cfg.batch_key)]
    roles += [("integrate.categorical_covariates", c) for c in cfg.categorical_covariates]
    roles += [("integrate.continuous_covariates", c) for c in cfg.continuous_covariates]
    for where, col in roles:
        if col not in adata.obs.columns:
            raise InputError(
                f"{where} names obs column {col!r}, which this data does not have; "
                f"columns are: {_columns_message(adata)}. Extra sample sheet columns "
                "(e.g. a sequencing batch) become obs columns"
            )
        n_missing = int(adata.obs[col].isna().sum())
        if n_missing:
            raise InputError(
                f"{where}: obs column {col!r} has {n_missing} cells without a value; "
                "fill it in the sample sheet for every sample"
            )
    for col in cfg.continuous_covariates:
        values = pd.to_numeric(adata.obs[col], errors="coerce").to_numpy(dtype=float)
        if not np.isfinite(values).all():
            raise InputError(
                f"integrate.continuous_covariates: obs column {col!r} must be numeric and finite "
                f"in every cell (e.g. {adata.obs[col].iloc[int(np.argmin(np.isfinite(values)))]!r})"
            )
    if keys.COUNTS not in adata.layers:
        raise InputError(
            f"integrate needs raw counts in layers[{keys.COUNTS!r}]; this AnnData has layers "
            f"{sorted(adata.layers)}. Run the preprocess stage first"
        )
    if "highly_variable" not in adata.var:
        raise InputError(
            "integrate needs var['highly_variable'] from the preprocess stage; run it first"
        )
    n_hvg = int(adata.var["highly_variable"].to_numpy(bool).sum())
    if n_hvg < 2:
        raise InputError(f"integrate needs at least 2 highly variable genes, found {n_hvg}")
    if cfg.batch_key == keys.DONOR:
        warnings.warn(
            "integrate.batch_key is 'donor': scVI will remove the differences between donors, "
            "including real donor-level biology (age, genotype, baseline inflammation) that "
            "paired tests across donors rely on. Prefer the sample or a technical batch column",
            ImmuneageWarning,
            stacklevel=3,
        )
    n_batches = adata.obs[cfg.batch_key].nunique()
    if n_batches < 2:
        warnings.warn(
            f"integrate.batch_key {cfg.batch_key!r} has a single value: scVI has no batch to "
            "correct and iLISI cannot be computed",
            ImmuneageWarning,
            stacklevel=3,
        )


@contextlib.contextmanager
def _quiet_training(*, bar: bool = False) -> Iterator[None]:
    """Silence lightning/scvi info logs and noise warnings (their warnings and errors stay).

    What scvi-tools prints to stdout (the early-stopping reason) is logged at the
    end. With ``bar`` (a terminal), stdout goes to stderr instead: scvi-tools'
    tqdm bar writes to stdout, and stdout is for results, not for progress.
    """
    saved = {name: logging.getLogger(name).level for name in _CHATTY_LOGGERS}
    buf = io.StringIO()
    try:
        for name in _CHATTY_LOGGERS:
            logging.getLogger(name).setLevel(logging.WARNING)
        target = sys.stderr if bar else buf
        with contextlib.redirect_stdout(target), warnings.catch_warnings():
            for pattern in _NOISE:
                warnings.filterwarnings("ignore", message=pattern)
            yield
    finally:
        for name, level in saved.items():
            logging.getLogger(name).setLevel(level)
        for line in buf.getvalue().splitlines():
            if line.strip():
                log.info("integrate: scvi-tools: %s", line.strip())


def _scvi_input(
    adata: ad.AnnData,
    cfg: IntegrateConfig,
    stack: contextlib.ExitStack | None = None,
    *,
    chunk_size: int | None = None,
) -> ad.AnnData:
    """The HVG counts and the obs columns scVI reads, as a new (lean) AnnData.

    With on-disk counts (``backed`` mode) the HVG counts are written once, a
    block of cells at a time, to a scratch h5ad under ``$TMPDIR`` (node-local
    disk on most clusters), and the lean AnnData reads them from there: scvi-tools'
    data loader then fetches each minibatch's rows from disk, so training holds
    no cells x genes matrix. ``stack`` owns the scratch file (deleted when it closes).
    """
    import scipy.sparse as sp

    from ..io.ondisk import scratch_columns
    from ..kernels.sparse import DEFAULT_CHUNK_SIZE, is_row_source

    hv = adata.var["highly_variable"].to_numpy(bool)
    cols = list(
        dict.fromkeys([cfg.batch_key, *cfg.categorical_covariates, *cfg.continuous_covariates])
    )
    obs = pd.DataFrame(index=adata.obs_names.copy())
    for col in cols:
        if col in cfg.continuous_covariates:
            obs[col] = pd.to_numeric(adata.obs[col]).to_numpy(dtype=np.float32)
        else:
            values = adata.obs[col]
            if isinstance(values.dtype, pd.CategoricalDtype):
                values = values.cat.remove_unused_categories()
            obs[col] = values.astype(str).astype("category")
    counts = adata.layers[keys.COUNTS]
    if is_row_source(counts):
        if stack is None:
            raise ValueError("on-disk counts need an ExitStack to own the scratch file")
        counts = scratch_columns(
            counts,
            np.flatnonzero(hv),
            stack,
            chunk_size=chunk_size or DEFAULT_CHUNK_SIZE,
            prefix="immuneage-scvi-",
        )
        log.info("integrate: scVI reads its minibatches from a scratch h5ad (backed mode)")
    elif sp.issparse(counts):
        counts = sp.csr_matrix(counts[:, np.flatnonzero(hv)])
    else:
        counts = np.asarray(counts)[:, hv]
    lean = ad.AnnData(obs=obs, var=pd.DataFrame(index=adata.var_names[hv].copy()))
    lean.layers[keys.COUNTS] = counts
    return lean


def _history_table(history: dict[str, pd.DataFrame]) -> pd.DataFrame:
    """One row per epoch, one column per logged quantity (``epoch`` first)."""
    frames = [df.astype(float) for df in history.values() if len(df)]
    if not frames:
        return pd.DataFrame({"epoch": pd.Series(dtype=int)})
    table = pd.concat(frames, axis=1).sort_index()
    table.index = table.index.astype(int)
    return table.rename_axis("epoch").reset_index()


def _last(history: dict[str, pd.DataFrame], key: str) -> float:
    df = history.get(key)
    if df is None or not len(df):
        return float("nan")
    return float(df.iloc[-1, 0])


def _output(adata: ad.AnnData) -> ad.AnnData:
    """A new AnnData sharing the input's matrices (never modified) with its own obs/var/obsm/uns."""
    return ad.AnnData(
        X=adata.X,
        obs=adata.obs.copy(),
        var=adata.var.copy(),
        uns=copy.deepcopy(dict(adata.uns)),
        obsm=dict(adata.obsm.items()),
        varm=dict(adata.varm.items()),
        layers=dict(adata.layers.items()),
        obsp=dict(adata.obsp.items()),
    )


def train_scvi(
    adata: ad.AnnData,
    cfg: Config,
    *,
    device: torch.device | str = "cpu",
    max_epochs: int | None = None,
) -> scvi.model.SCVI:
    """Set up and train :class:`scvi.model.SCVI` on all genes of ``adata`` (quietly).

    Parameters
    ----------
    adata
        Counts in ``layers["counts"]`` (the genes to model, e.g. the HVGs) and
        the batch and covariate columns named in ``cfg.integrate`` in ``obs``;
        registered with scvi-tools in place.
    cfg
        Run configuration (reads ``integrate`` and ``seed``).
    device
        The run's device.
    max_epochs
        Overrides ``cfg.integrate.max_epochs``; ``None`` with a ``None`` config
        value uses scvi-tools' heuristic.

    Returns
    -------
    The trained model (its ``history`` holds the per-epoch losses).
    """
    import scvi

    ic = cfg.integrate
    accelerator, devices = scvi_accelerator(device)
    epochs = max_epochs if max_epochs is not None else ic.max_epochs
    if epochs is None:
        epochs = max_epochs_heuristic(adata.n_obs)
    bar = interactive()
    # a terminal gets scvi-tools' own bar; elsewhere plain lines (none when quiet)
    callbacks = [] if bar or not verbose() else [lightning_callback("scVI", epochs)]
    with _quiet_training(bar=bar):
        scvi.settings.seed = cfg.seed
        scvi.model.SCVI.setup_anndata(
            adata,
            layer=keys.COUNTS,
            batch_key=ic.batch_key,
            categorical_covariate_keys=list(ic.categorical_covariates) or None,
            continuous_covariate_keys=list(ic.continuous_covariates) or None,
        )
        model = scvi.model.SCVI(
            adata,
            n_latent=ic.n_latent,
            n_hidden=ic.n_hidden,
            n_layers=ic.n_layers,
            gene_likelihood=ic.gene_likelihood,
        )
        model.train(
            max_epochs=epochs,
            accelerator=accelerator,
            devices=devices,
            batch_size=ic.batch_size,
            early_stopping=ic.early_stopping,
            early_stopping_patience=ic.early_stopping_patience,
            check_val_every_n_epoch=1,
            enable_progress_bar=bar,
            callbacks=callbacks,
            plan_kwargs={
                "lr": ic.learning_rate,
                "n_epochs_kl_warmup": (
                    ic.kl_warmup_epochs if ic.kl_warmup_epochs is not None else min(400, epochs)
                ),
            },
        )
    return model


def training_key(cfg: Config, inputs: dict[str, str], *, accelerator: str) -> str:
    """Key of everything the trained scVI model depends on.

    Parameters
    ----------
    cfg
        Run configuration: ``seed`` and every ``integrate`` key except
        :data:`METRICS_ONLY_KEYS` join the key.
    inputs
        What the stage is computed from (:attr:`StageContext.inputs`: upstream
        stage -> stamp digest).
    accelerator
        ``"cpu"`` or ``"gpu"`` (a model trained on the other one differs).

    Returns
    -------
    A sha256 hex digest; also covers the immuneage and scvi-tools versions.
    """
    from importlib.metadata import PackageNotFoundError, version

    try:
        scvi_version = version("scvi-tools")
    except PackageNotFoundError:  # pragma: no cover - scvi-tools is a dependency
        scvi_version = "?"
    training = {
        k: v for k, v in cfg.integrate.model_dump(mode="json").items() if k not in METRICS_ONLY_KEYS
    }
    payload = {
        "inputs": dict(sorted(inputs.items())),
        "seed": cfg.seed,
        "integrate": training,
        "accelerator": accelerator,
        "immuneage": __version__,
        "scvi_tools": scvi_version,
    }
    return hashlib.sha256(json.dumps(payload, sort_keys=True).encode()).hexdigest()


@dataclass
class _Previous:
    """The previous run's training, read into memory (its files are replaced after the stage)."""

    latent: np.ndarray
    info: dict[str, Any]
    model_files: dict[str, bytes]
    model_dir: Path


def _previous_training(
    context: StageContext | None, key: str, adata: ad.AnnData
) -> _Previous | None:
    """The previous run's latent, run facts and model files when its training key is ``key``.

    ``None`` when there is no context or the key differs, and (with a log line
    saying why) when the model directory or the artifact is missing, unreadable,
    or belongs to another training or other cells (e.g. a run killed between
    writing the artifact and its stamp).
    """
    import h5py

    if context is None or context.stage_dir is None:
        return None
    if context.previous.get("training_key") != key:
        if context.previous:
            log.debug("integrate: training inputs changed since the previous run; training scVI")
        return None
    model_dir = context.stage_dir / MODEL_DIR
    artifact = context.stage_dir / ARTIFACT
    if not (model_dir / "model.pt").is_file() or not artifact.is_file():
        log.info("integrate: the previous scVI model or artifact is missing; training scVI")
        return None
    try:
        with h5py.File(artifact, "r") as f:
            info = dict(ad.io.read_elem(f["uns"][keys.UNS]["integrate"]))
            obs = f["obs"]
            names = ad.io.read_elem(obs[obs.attrs["_index"]])
            latent = np.asarray(ad.io.read_elem(f["obsm"][keys.X_SCVI]))
    except (OSError, KeyError) as exc:
        log.info("integrate: cannot read the previous run's latent (%s); training scVI", exc)
        return None
    if info.get("training_key") != key:
        log.info("integrate: the previous artifact is from another training; training scVI")
        return None
    if len(names) != adata.n_obs or not np.array_equal(
        np.asarray(names, dtype=str), adata.obs_names.to_numpy(dtype=str)
    ):
        log.info("integrate: the previous artifact holds other cells; training scVI")
        return None
    files = {
        str(p.relative_to(model_dir)): p.read_bytes()
        for p in sorted(model_dir.rglob("*"))
        if p.is_file()
    }
    info = {k: v.item() if isinstance(v, np.generic) else v for k, v in info.items()}
    return _Previous(latent=latent, info=info, model_files=files, model_dir=model_dir)


def run_integrate(
    adata: ad.AnnData,
    cfg: Config,
    *,
    device: torch.device | str = "cpu",
    context: StageContext | None = None,
) -> StageResult:
    """Train scVI on the HVG counts (or reuse the previous run's model) and add its latent space.

    Parameters
    ----------
    adata
        Preprocess output: ``layers["counts"]``, ``var["highly_variable"]``,
        the batch and covariate columns in ``obs``, ``obsm["X_pca"]`` (for the
        metrics; optional).
    cfg
        Run configuration (reads ``integrate`` and ``seed``).
    device
        The run's device; a CUDA device trains on the GPU.
    context
        From the runner: the stage directory, the stage's inputs and what the
        previous run recorded. When the :func:`training_key` is unchanged and the
        previous model and artifact are there, training is skipped (see the
        module docstring). ``None`` (e.g. in a notebook): always train.

    Returns
    -------
    StageResult with

    - ``adata``: the input (all genes, ``X`` and layers unchanged) plus
      ``obsm["X_scVI"]`` (float32, cells x ``n_latent``, posterior means) and
      ``uns["immuneage"]["integrate"]`` (``accelerator``, ``device``,
      ``max_epochs``, ``epochs_trained``, ``early_stopped``, ``n_cells``,
      ``n_hvg``, ``batch_key``, ``n_batches``, ``categorical_covariates``,
      ``continuous_covariates``, ``n_latent``, ``gene_likelihood``,
      ``elbo_train``, ``elbo_validation`` (final epoch), ``scvi_tools_version``,
      and with a context ``training_key``);
    - tables ``scvi_history`` (one row per epoch: ``epoch``, ``elbo_train``,
      ``elbo_validation``, ``reconstruction_loss_*``, ``kl_local_*``, ... as
      logged by scvi-tools) and ``integration_metrics`` (see
      :func:`pipeline.stats.integration.integration_metrics`);
    - dirs ``scvi_model``: the trained model (``model.pt``, saved without the
      AnnData; reload with ``scvi.model.SCVI.load(dir, adata=<HVG subset>)``);
    - provenance ``training_key`` (with a context) and ``model``
      (``"trained"`` or ``"reused"``).

    Raises
    ------
    InputError
        See :func:`check_integrate_inputs`.
    """

    ic = cfg.integrate
    check_integrate_inputs(adata, ic)
    with contextlib.ExitStack() as stack:
        lean = _scvi_input(adata, ic, stack, chunk_size=cfg.chunk_size)
        return _integrate(adata, lean, cfg, device, context)


def _integrate(
    adata: ad.AnnData,
    lean: ad.AnnData,
    cfg: Config,
    device: torch.device | str,
    context: StageContext | None,
) -> StageResult:
    """Train scVI on ``lean`` (the HVG counts), or reuse the previous model; build the result."""
    import scvi

    from ..stats.integration import integration_metrics

    ic = cfg.integrate
    accelerator = scvi_accelerator(device)[0]
    max_epochs = ic.max_epochs if ic.max_epochs is not None else max_epochs_heuristic(lean.n_obs)
    key = training_key(cfg, context.inputs, accelerator=accelerator) if context else None
    previous = _previous_training(context, key, adata) if key is not None else None
    model: scvi.model.SCVI | None = None
    if previous is not None:
        try:
            with _quiet_training():
                model = scvi.model.SCVI.load(str(previous.model_dir), adata=lean, accelerator="cpu")
        except Exception as exc:  # a damaged or incompatible model: train again
            log.info("integrate: cannot load the previous scVI model (%s); training scVI", exc)
            previous = None
    if previous is not None and model is not None:
        log.info(
            "integrate: reusing the scVI model trained by the previous run (training inputs "
            "unchanged); recomputing the integration metrics only"
        )
        latent = previous.latent
        info = dict(previous.info)
    else:
        log.info(
            "integrate: scVI on %d cells x %d HVGs, batch %r (%d levels), %s, up to %d epochs",
            lean.n_obs,
            lean.n_vars,
            ic.batch_key,
            lean.obs[ic.batch_key].nunique(),
            accelerator,
            max_epochs,
        )
        model = train_scvi(lean, cfg, device=device, max_epochs=max_epochs)
        with _quiet_training():
            latent = model.get_latent_representation(batch_size=max(ic.batch_size, 1024))
        info = {}

    history = {k: v for k, v in (model.history or {}).items() if isinstance(v, pd.DataFrame)}
    table = _history_table(history)
    epochs = len(table)
    out = _output(adata)
    out.obsm[keys.X_SCVI] = np.ascontiguousarray(latent, dtype=np.float32)
    if not info:
        info = {
            "accelerator": accelerator,
            "device": str(getattr(device, "type", device)),
            "max_epochs": int(max_epochs),
            "epochs_trained": int(epochs),
            "early_stopped": bool(epochs < max_epochs),
            "n_cells": int(lean.n_obs),
            "n_hvg": int(lean.n_vars),
            "batch_key": ic.batch_key,
            "n_batches": int(lean.obs[ic.batch_key].nunique()),
            "categorical_covariates": ",".join(ic.categorical_covariates),
            "continuous_covariates": ",".join(ic.continuous_covariates),
            "n_latent": int(ic.n_latent),
            "gene_likelihood": ic.gene_likelihood,
            "elbo_train": _last(history, "elbo_train"),
            "elbo_validation": _last(history, "elbo_validation"),
            "scvi_tools_version": scvi.__version__,
        }
        if key is not None:
            info["training_key"] = key
        log.info(
            "integrate: %d epochs (%s), ELBO train %.1f, validation %.1f",
            epochs,
            "early stop" if info["early_stopped"] else "max_epochs",
            info["elbo_train"],
            info["elbo_validation"],
        )
    out.uns.setdefault(keys.UNS, {})["integrate"] = info

    reps = tuple(r for r in (keys.X_PCA, keys.X_SCVI) if r in out.obsm)
    metrics = integration_metrics(
        out,
        batch_key=ic.batch_key,
        label_key=None,
        reps=reps,
        max_cells=ic.metrics_max_cells,
        seed=cfg.seed,
    )

    if previous is not None:
        files = previous.model_files

        def save_model(path: Path) -> None:
            """The previous model's files, byte for byte (read before the stage returned)."""
            for rel, data in files.items():
                target = Path(path) / rel
                target.parent.mkdir(parents=True, exist_ok=True)
                target.write_bytes(data)

    else:
        trained = model

        def save_model(path: Path) -> None:
            trained.save(str(path), overwrite=True, save_anndata=False)

    provenance: dict[str, Any] = {"model": "reused" if previous is not None else "trained"}
    if key is not None:
        provenance["training_key"] = key
    return StageResult(
        out,
        tables={"scvi_history": table, "integration_metrics": metrics},
        dirs={MODEL_DIR: save_model},
        provenance=provenance,
    )
