"""Which config files make a method's run on a dataset: one rule for ``clipkd train --method``, ``clipkd sweep``
and the scripts in ``scripts/``, so a recipe cannot differ between the ways a run is launched.

The rule: ``configs/datasets/STEM.yaml``, then ``configs/methods/METHOD.yaml``, then
``configs/per_dataset/METHOD/STEM.yaml`` when it exists (what a method sets differently for one dataset). The
``configs/`` folder is the one that holds the method file; a method given by name is looked up in the source
checkout's ``configs/`` (beside the package, found from this file, so any working directory will do), else in
``./configs``. Torch-free.
"""

from __future__ import annotations

from pathlib import Path

from clipkd.errors import ConfigError

CHECKOUT_CONFIGS = Path(__file__).resolve().parents[2] / "configs"


def configs_dir() -> Path:
    """The ``configs/`` folder methods are named in: the checkout's, else the working directory's."""
    for folder in (CHECKOUT_CONFIGS, Path("configs")):
        if (folder / "methods").is_dir():
            return folder
    raise ConfigError(f"no configs/methods folder in {CHECKOUT_CONFIGS.parent} (clipkd's checkout) or in the "
                      "working directory; give the method as a file, --method path/to/configs/methods/METHOD.yaml")


def method_file(method: str | Path) -> Path:
    """``METHOD`` (a name in :func:`configs_dir`) or a path to ``.../methods/METHOD.yaml``: the method's file."""
    text = str(method)
    by_name = "/" not in text and not text.endswith((".yaml", ".yml"))
    path = configs_dir() / "methods" / f"{text}.yaml" if by_name else Path(text)
    if not path.is_file():
        known = _stems(path.parent)
        choices = f"; the methods in {path.parent}: {', '.join(known)}" if known else ""
        raise ConfigError(f"unknown method '{path.stem}': no {path}{choices}")
    return path.resolve()


def dataset_file(stem: str, method: str | Path | None = None) -> Path:
    """``configs/datasets/STEM.yaml`` of the ``configs/`` folder that holds ``method``'s file (else of
    :func:`configs_dir`)."""
    configs = method_file(method).parents[1] if method is not None else configs_dir()
    path = configs / "datasets" / f"{stem}.yaml"
    if not path.is_file():
        raise ConfigError(f"dataset config {path} not found; the dataset stems there: "
                          f"{', '.join(_stems(path.parent)) or 'none'}")
    return path


def _stems(folder: Path) -> list[str]:
    return sorted(p.stem for p in folder.glob("*.yaml")) if folder.is_dir() else []


def method_files(method: str | Path, stem: str) -> list[Path]:
    """The method's files for a dataset, in merge order: the method, then its per-dataset settings if any."""
    path = method_file(method)
    extra = path.parents[1] / "per_dataset" / path.stem / f"{stem}.yaml"
    return [path, extra] if extra.is_file() else [path]


def recipe_files(method: str | Path, stem: str) -> list[Path]:
    """Every file of ``method``'s run on dataset ``stem``, in merge order (dataset, method, per-dataset)."""
    return [dataset_file(stem, method), *method_files(method, stem)]


def command_files(method: str | None, dataset: str | None, dataset_config: str | None,
                  configs: list[str]) -> list[str | Path]:
    """The files a command's ``--method`` / ``--dataset STEM`` / ``--dataset-config`` / ``--config`` name, in
    merge order: the dataset, the method's recipe for it (:func:`method_files`), then each ``--config``."""
    if dataset and dataset_config:
        raise ConfigError("give the dataset once: --dataset STEM or --dataset-config FILE")
    if method and not (dataset or dataset_config):
        raise ConfigError(f"--method {method} needs the dataset its recipe is for: --dataset STEM or "
                          "--dataset-config configs/datasets/STEM.yaml")
    data: list[str | Path] = [dataset_file(dataset, method)] if dataset else [dataset_config] if dataset_config else []
    recipe: list[str | Path] = [*method_files(method, dataset or Path(dataset_config).stem)] if method else []
    return [*data, *recipe, *configs]
