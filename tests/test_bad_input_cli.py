"""Bad input through the real CLI: exit code 2, a message naming the culprit, no output, inputs untouched."""

from __future__ import annotations

import gzip
from collections.abc import Callable
from pathlib import Path

import anndata as ad
import pandas as pd
import pytest
from conftest import tree_checksums, write_cohort

from pipeline.cli import main


def _sheet(root: Path) -> pd.DataFrame:
    return pd.read_csv(root / "samplesheet.csv", dtype=str, keep_default_na=False)


def _save(root: Path, df: pd.DataFrame) -> None:
    df.to_csv(root / "samplesheet.csv", index=False)


def missing_column(root: Path) -> str:
    _save(root, _sheet(root).drop(columns=["donor"]))
    return "donor"


def empty_sheet(root: Path) -> str:
    _save(root, _sheet(root).iloc[:0])
    return "no samples"


def duplicate_sample(root: Path) -> str:
    df = _sheet(root)
    df.loc[1, "sample"] = df.loc[0, "sample"]
    df.loc[1, "timepoint"] = "acute"
    _save(root, df)
    return "D1_baseline"


def missing_path(root: Path) -> str:
    df = _sheet(root)
    df.loc[4, "path"] = "data/nope.h5ad"
    _save(root, df)
    return "nope.h5ad"


def unknown_timepoint(root: Path) -> str:
    df = _sheet(root)
    df.loc[2, "timepoint"] = "week4"
    _save(root, df)
    return "week4"


def same_donor_timepoint_twice(root: Path) -> str:
    df = _sheet(root)
    df.loc[1, "timepoint"] = "baseline"
    _save(root, df)
    return "'library' column"


def libraries_of_one_sample_at_two_timepoints(root: Path) -> str:
    df = _sheet(root)
    df.insert(3, "library", "")
    df.loc[0, "library"], df.loc[1, "library"] = "L1", "L2"
    df.loc[1, "sample"] = df.loc[0, "sample"]  # line 3 claims to be a library of line 2's sample
    _save(root, df)
    return "line 3, column 'timepoint': 'acute' differs from 'baseline' on line 2"


def mouse_sample(root: Path) -> str:
    p = root / "data" / "D2_baseline.h5ad"
    a = ad.read_h5ad(p)
    a.var_names = [f"Gene{i}" for i in range(a.n_vars - 2)] + ["mt-Co1", "mt-Nd1"]
    a.write_h5ad(p)
    return "ingest.species_check: warn"


def truncated_h5(root: Path) -> str:
    p = root / "data" / "D1_acute.h5"
    data = p.read_bytes()
    p.write_bytes(data[: len(data) // 2])
    return "D1_acute.h5"


def corrupt_mtx_dims(root: Path) -> str:
    p = root / "data" / "D1_longterm_mtx" / "matrix.mtx.gz"
    lines = gzip.decompress(p.read_bytes()).decode().splitlines()
    i = next(k for k, line in enumerate(lines) if not line.startswith("%"))
    g, c, n = lines[i].split()
    lines[i] = f"{int(g) + 7} {c} {n}"
    p.write_bytes(gzip.compress(("\n".join(lines) + "\n").encode()))
    return "D1_longterm_mtx"


def non_integer_counts(root: Path) -> str:
    p = root / "data" / "D2_baseline.h5ad"
    a = ad.read_h5ad(p)
    a.X.data[:3] = 0.25
    a.layers["counts"] = a.X.copy()
    a.write_h5ad(p)
    return "D2_baseline"


def negative_counts(root: Path) -> str:
    p = root / "data" / "D3_baseline.h5ad"
    a = ad.read_h5ad(p)
    a.X.data[0] = -1
    a.layers["counts"] = a.X.copy()
    a.write_h5ad(p)
    return "D3_baseline"


def nan_counts(root: Path) -> str:
    p = root / "data" / "D3_baseline.h5ad"
    a = ad.read_h5ad(p)
    a.X.data[0] = float("nan")
    a.layers["counts"] = a.X.copy()
    a.write_h5ad(p)
    return "D3_baseline"


def unknown_format(root: Path) -> str:
    (root / "data" / "x.loom").write_text("not counts")
    df = _sheet(root)
    df.loc[0, "path"] = "data/x.loom"
    _save(root, df)
    return "x.loom"


def bad_config_key(root: Path) -> str:
    (root / "config.yaml").write_text("qc:\n  nmad: 3\n")
    return "qc.nmad"


def bad_config_value(root: Path) -> str:
    (root / "config.yaml").write_text("preprocess:\n  n_top_genes: many\n")
    return "preprocess.n_top_genes"


def gpu_without_gpu(root: Path) -> str:
    import yaml

    cfg = yaml.safe_load((root / "config.yaml").read_text()) or {}
    (root / "config.yaml").write_text(yaml.safe_dump({**cfg, "device": "gpu"}))
    return "no usable CUDA device"


def _config_with(root: Path, extra: dict) -> None:
    import yaml

    cfg = yaml.safe_load((root / "config.yaml").read_text()) or {}
    for section, values in extra.items():
        cfg.setdefault(section, {}).update(values)
    (root / "config.yaml").write_text(yaml.safe_dump(cfg))


def unknown_geneset(root: Path) -> str:
    _config_with(root, {"score": {"genesets": ["tbk1_stingg"]}})
    return "tbk1_stingg"


def gmt_line_without_genes(root: Path) -> str:
    (root / "sets.gmt").write_text("ok\tfine\tG1\tG2\tG3\nbroken_set\n")
    _config_with(root, {"score": {"gmt": str(root / "sets.gmt")}})
    return "sets.gmt, line 2"


def gmt_missing_file(root: Path) -> str:
    _config_with(root, {"score": {"gmt": str(root / "nope.gmt")}})
    return "nope.gmt"


def geneset_too_small(root: Path) -> str:
    # found before compute, against the genes of the input files
    small = {"custom": {"tiny": ["G1", "G2", "NOTAGENE"]}, "on_small_set": "error"}
    _config_with(root, {"score": small})
    return "'tiny' has 2 of its 3 genes"


def _covariates(root: Path, text: str) -> None:
    (root / "covariates.csv").write_text(text)
    _config_with(root, {"differential": {"covariates": str(root / "covariates.csv")}})


def _samples(root: Path) -> list[str]:
    return list(_sheet(root)["sample"])


def covariates_missing_sample(root: Path) -> str:
    rows = [f"{s},{i}.5" for i, s in enumerate(_samples(root)[:-1])]
    _covariates(root, "sample,betaine\n" + "\n".join(rows) + "\n")
    return _samples(root)[-1]


def covariates_not_numeric(root: Path) -> str:
    rows = [f"{s},{'high' if i == 4 else i}" for i, s in enumerate(_samples(root))]
    _covariates(root, "sample,betaine\n" + "\n".join(rows) + "\n")
    return "high"


def covariates_without_sample_column(root: Path) -> str:
    rows = [f"{s},{i}" for i, s in enumerate(_samples(root))]
    _covariates(root, "id,betaine\n" + "\n".join(rows) + "\n")
    return "sample"


def covariates_file_missing(root: Path) -> str:
    _config_with(root, {"differential": {"covariates": str(root / "no_such_covariates.csv")}})
    return "no_such_covariates.csv"


CASES: list[Callable[[Path], str]] = [
    missing_column,
    empty_sheet,
    duplicate_sample,
    missing_path,
    unknown_timepoint,
    same_donor_timepoint_twice,
    libraries_of_one_sample_at_two_timepoints,
    mouse_sample,
    truncated_h5,
    corrupt_mtx_dims,
    non_integer_counts,
    negative_counts,
    nan_counts,
    unknown_format,
    bad_config_key,
    bad_config_value,
    gpu_without_gpu,
    unknown_geneset,
    gmt_line_without_genes,
    gmt_missing_file,
    geneset_too_small,
    covariates_missing_sample,
    covariates_not_numeric,
    covariates_without_sample_column,
    covariates_file_missing,
]


@pytest.mark.parametrize("case", CASES, ids=lambda c: c.__name__)
def test_bad_input_exit_2_names_culprit_no_output(tmp_path, capsys, case):
    import torch

    if case is gpu_without_gpu and torch.cuda.is_available():
        pytest.skip("a GPU is present")
    root = tmp_path / "in"
    sheet = write_cohort(root, n_cells=25)
    culprit = case(root)
    before = tree_checksums(root)
    out = tmp_path / "out"
    code = main(
        [
            "run",
            "--samplesheet",
            str(sheet),
            "--config",
            str(root / "config.yaml"),
            "--outdir",
            str(out),
        ]
    )
    err = capsys.readouterr().err
    assert code == 2, err
    assert culprit in err, err
    assert "immuneage: error:" in err
    assert not out.exists()
    assert tree_checksums(root) == before
    # validate finds the same problem without running anything
    if case is not gpu_without_gpu:  # the device is resolved only by a run
        assert (
            main(["validate", "--samplesheet", str(sheet), "--config", str(root / "config.yaml")])
            == 2
        )
        assert culprit in capsys.readouterr().err


SLURM_PROFILES = {
    "unknown_group": ("groups:\n  integrat: {partition: gpu}\n", "integrat"),
    "bad_memory": ("defaults: {mem: lots}\n", "mem"),
    "negative_cpus": ("defaults: {cpus: -2}\n", "cpus"),
}


@pytest.mark.parametrize("case", sorted(SLURM_PROFILES))
def test_bad_slurm_profile_exit_2_names_key_submits_nothing(tmp_path, capsys, case):
    text, culprit = SLURM_PROFILES[case]
    root = tmp_path / "in"
    sheet = write_cohort(root, n_cells=25)
    profile = root / "profile.yaml"
    profile.write_text(text)
    before = tree_checksums(root)
    out = tmp_path / "out"
    argv = ["slurm", "submit", "--samplesheet", str(sheet), "--config", str(root / "config.yaml")]
    code = main([*argv, "--outdir", str(out), "--profile", str(profile), "--dry-run"])
    err = capsys.readouterr().err
    assert code == 2, err
    assert culprit in err and str(profile) in err, err
    assert not out.exists()
    assert tree_checksums(root) == before
