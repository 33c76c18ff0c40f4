"""The 11 benchmark datasets and the 4 ImageNet variants of the domain-generalisation setting, described as data.

Three layouts cover the 11: a CoOp split JSON (9 datasets), FGVCAircraft's official txt files, and ImageNet's
wnid folders. Two more cover the evaluation-only variants, as CoOp's dataset classes read them: one folder per
wnid (ImageNet-Sketch, -A, -R) or one folder per ImageNet class index (ImageNetV2). Everything that differs
between datasets of one layout is a field here.
"""

from __future__ import annotations

from dataclasses import dataclass

from clipkd.errors import DataError

LAYOUT_SPLIT_JSON = "split_json"
LAYOUT_FGVC = "fgvc"
LAYOUT_IMAGENET = "imagenet"
# Evaluation-only ImageNet variants (test images only), each with a copy of ImageNet's classnames.txt:
LAYOUT_WNID_FOLDERS = "wnid_folders"  # <image_dir>/<wnid>/*: label = index in the sorted folder list
LAYOUT_INDEX_FOLDERS = "index_folders"  # <image_dir>/<i>/*, i = 0..N-1: class i = line i of classnames.txt


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
    # An evaluation set (CoOp: "used for testing only"): test images only, no train/val split, all classes; a
    # training run on it is refused.
    test_only: bool = False


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

# The domain-generalisation targets (CoOp's DATASETS.md and its imagenetv2/imagenet_sketch/imagenet_a/imagenet_r
# dataset classes): folder, image folder, classes (A and R: the 200 wnid folders their image folders hold).
_DG_SPECS = (
    DatasetSpec("imagenetv2", "ImageNetV2", "imagenetv2", LAYOUT_INDEX_FOLDERS,
                "imagenetv2-matched-frequency-format-val", None, 1000, "a photo of a {}.", (0, 0, 10000),
                test_only=True),
    DatasetSpec("imagenet_sketch", "ImageNetSketch", "imagenet-sketch", LAYOUT_WNID_FOLDERS, "images", None, 1000,
                "a photo of a {}.", (0, 0, 50889), test_only=True),
    DatasetSpec("imagenet_a", "ImageNetA", "imagenet-adversarial", LAYOUT_WNID_FOLDERS, "imagenet-a", None, 200,
                "a photo of a {}.", (0, 0, 7500), test_only=True),
    DatasetSpec("imagenet_r", "ImageNetR", "imagenet-rendition", LAYOUT_WNID_FOLDERS, "imagenet-r", None, 200,
                "a photo of a {}.", (0, 0, 30000), test_only=True),
)

STEMS: tuple[str, ...] = tuple(s.stem for s in _SPECS)  # the 11 benchmark datasets
DG_STEMS: tuple[str, ...] = tuple(s.stem for s in _DG_SPECS)  # the 4 evaluation-only ImageNet variants
DATASETS: dict[str, DatasetSpec] = {**{s.stem: s for s in _SPECS}, **{s.stem: s for s in _DG_SPECS},
                                    TOY_SPEC.stem: TOY_SPEC}

# Cross-dataset transfer and domain generalisation (CoOp/CoCoOp, PromptKD Table 2): a model learned on the source
# is evaluated on all classes of each target.
TRANSFER_SOURCE = "imagenet"
XD_TARGETS: tuple[str, ...] = tuple(s for s in STEMS if s != TRANSFER_SOURCE)  # the 10 other benchmark datasets
DG_TARGETS: tuple[str, ...] = DG_STEMS

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
    if name in DATASETS:
        return DATASETS[name]
    for spec in DATASETS.values():
        if spec.name == name:
            return spec
    raise DataError(
        f"unknown dataset '{name}'; choose a stem ({', '.join(DATASETS)}) or its Dassl NAME"
    )

