"""The 11 benchmark datasets, described as data.

Three layouts cover all of them: a CoOp split JSON (9 datasets), FGVCAircraft's official txt files, and
ImageNet's wnid folders. Everything that differs between datasets of one layout is a field here.
"""

from __future__ import annotations

from dataclasses import dataclass

LAYOUT_SPLIT_JSON = "split_json"
LAYOUT_FGVC = "fgvc"
LAYOUT_IMAGENET = "imagenet"


@dataclass(frozen=True)
class DatasetSpec:
    stem: str  # config file stem and CLI name
    name: str  # Dassl's DATASET.NAME
    folder: str  # folder under the DATA root
    layout: str  # one of the LAYOUT_* constants
    image_dir: str  # folder (relative to `folder`) that split paths are relative to; "" = `folder` itself
    split_file: str | None  # CoOp split JSON inside `folder`, if the layout uses one
    num_classes: int
    template: str  # CoOp's zero-shot prompt template
    sizes: tuple[int, int, int]  # published train/val/test sizes (val 0 = none), for orientation


_SPECS = (
    DatasetSpec("imagenet", "ImageNet", "imagenet", LAYOUT_IMAGENET, "images", None, 1000,
                "a photo of a {}.", (1281167, 0, 50000)),
    DatasetSpec("caltech101", "Caltech101", "caltech-101", LAYOUT_SPLIT_JSON, "101_ObjectCategories",
                "split_zhou_Caltech101.json", 100, "a photo of a {}.", (4128, 1649, 2465)),
    DatasetSpec("oxford_pets", "OxfordPets", "oxford_pets", LAYOUT_SPLIT_JSON, "images",
                "split_zhou_OxfordPets.json", 37, "a photo of a {}, a type of pet.", (2944, 736, 3669)),
    DatasetSpec("stanford_cars", "StanfordCars", "stanford_cars", LAYOUT_SPLIT_JSON, "",
                "split_zhou_StanfordCars.json", 196, "a photo of a {}.", (6509, 1635, 8041)),
    DatasetSpec("oxford_flowers", "OxfordFlowers", "oxford_flowers", LAYOUT_SPLIT_JSON, "jpg",
                "split_zhou_OxfordFlowers.json", 102, "a photo of a {}, a type of flower.", (4093, 1633, 2463)),
    DatasetSpec("food101", "Food101", "food-101", LAYOUT_SPLIT_JSON, "images",
                "split_zhou_Food101.json", 101, "a photo of {}, a type of food.", (50500, 20200, 30300)),
    DatasetSpec("fgvc_aircraft", "FGVCAircraft", "fgvc_aircraft", LAYOUT_FGVC, "images", None, 100,
                "a photo of a {}, a type of aircraft.", (3334, 3333, 3333)),
    DatasetSpec("sun397", "SUN397", "sun397", LAYOUT_SPLIT_JSON, "SUN397",
                "split_zhou_SUN397.json", 397, "a photo of a {}.", (15880, 3970, 19850)),
    DatasetSpec("dtd", "DescribableTextures", "dtd", LAYOUT_SPLIT_JSON, "images",
                "split_zhou_DescribableTextures.json", 47, "{} texture.", (2820, 1128, 1692)),
    DatasetSpec("eurosat", "EuroSAT", "eurosat", LAYOUT_SPLIT_JSON, "2750",
                "split_zhou_EuroSAT.json", 10, "a centered satellite photo of {}.", (13500, 5400, 8100)),
    DatasetSpec("ucf101", "UCF101", "ucf101", LAYOUT_SPLIT_JSON, "UCF-101-midframes",
                "split_zhou_UCF101.json", 101, "a photo of a person doing {}.", (7639, 1898, 3783)),
)

# The embedded offline benchmark (clipkd demo): a generated colour x shape world in the CoOp layout.
TOY_SPEC = DatasetSpec("toy", "Toy", "toy", LAYOUT_SPLIT_JSON, "images", "split_toy.json", 36,
                       "a photo of a {}.", (720, 288, 900))

STEMS: tuple[str, ...] = tuple(s.stem for s in _SPECS)  # the 11 benchmark datasets
DATASETS: dict[str, DatasetSpec] = {**{s.stem: s for s in _SPECS}, TOY_SPEC.stem: TOY_SPEC}

# FGVCAircraft's official files, inside its folder.
FGVC_CLASSES_FILE = "variants.txt"
FGVC_SPLIT_FILES = {
    "train": "images_variant_train.txt",
    "val": "images_variant_val.txt",
    "test": "images_variant_test.txt",
}
# ImageNet: val images (re-organised into wnid folders) serve as the test set.
IMAGENET_CLASSNAMES_FILE = "classnames.txt"
IMAGENET_SPLIT_DIRS = {"train": "train", "test": "val"}


def get_spec(name: str) -> DatasetSpec:
    """Look a dataset up by stem ("oxford_pets") or Dassl name ("OxfordPets")."""
    from clipkd.errors import DataError

    if name in DATASETS:
        return DATASETS[name]
    for spec in DATASETS.values():
        if spec.name == name:
            return spec
    raise DataError(
        f"unknown dataset '{name}'; choose a stem ({', '.join(DATASETS)}) or its Dassl NAME"
    )

