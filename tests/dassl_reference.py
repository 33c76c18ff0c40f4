"""An independent, plain re-statement of the Dassl/CoOp data procedure, written from PROTOCOL.md §1.

It deliberately shares no code with clipkd.data: it uses the global `random` module seeded with
`random.seed(S)` as Dassl's train.py does, a defaultdict to group by label, and os.path joins.
Items are (relative path, label, classname) tuples.
"""

from __future__ import annotations

import json
import math
import os
import random
from collections import defaultdict

SPLIT_JSON = {
    "caltech101": ("caltech-101", "101_ObjectCategories", "split_zhou_Caltech101.json"),
    "oxford_pets": ("oxford_pets", "images", "split_zhou_OxfordPets.json"),
    "stanford_cars": ("stanford_cars", "", "split_zhou_StanfordCars.json"),
    "oxford_flowers": ("oxford_flowers", "jpg", "split_zhou_OxfordFlowers.json"),
    "food101": ("food-101", "images", "split_zhou_Food101.json"),
    "sun397": ("sun397", "SUN397", "split_zhou_SUN397.json"),
    "dtd": ("dtd", "images", "split_zhou_DescribableTextures.json"),
    "eurosat": ("eurosat", "2750", "split_zhou_EuroSAT.json"),
    "ucf101": ("ucf101", "UCF-101-midframes", "split_zhou_UCF101.json"),
}


def read(root, stem):
    if stem in SPLIT_JSON:
        folder, image_dir, split_file = SPLIT_JSON[stem]
        with open(os.path.join(root, folder, split_file)) as f:
            split = json.load(f)
        def conv(items):
            return [(os.path.join(image_dir, p) if image_dir else p, int(y), c) for p, y, c in items]
        return conv(split["train"]), conv(split["val"]), conv(split["test"])
    if stem == "fgvc_aircraft":
        d = os.path.join(root, "fgvc_aircraft")
        with open(os.path.join(d, "variants.txt")) as f:
            names = [line.strip() for line in f.readlines()]
        cname2lab = {c: i for i, c in enumerate(names)}
        out = []
        for s in ("train", "val", "test"):
            items = []
            with open(os.path.join(d, f"images_variant_{s}.txt")) as f:
                for line in f.readlines():
                    parts = line.strip().split(" ")
                    cname = " ".join(parts[1:])
                    items.append((os.path.join("images", parts[0] + ".jpg"), cname2lab[cname], cname))
            out.append(items)
        return tuple(out)
    if stem == "imagenet":
        d = os.path.join(root, "imagenet")
        names = {}
        with open(os.path.join(d, "classnames.txt")) as f:
            for line in f.readlines():
                parts = line.strip().split(" ")
                names[parts[0]] = " ".join(parts[1:])
        def listing(sub):
            sd = os.path.join(d, "images", sub)
            folders = sorted(e.name for e in os.scandir(sd) if e.is_dir())
            items = []
            for label, folder in enumerate(folders):
                for im in sorted(x for x in os.listdir(os.path.join(sd, folder)) if not x.startswith(".")):
                    items.append((os.path.join("images", sub, folder, im), label, names[folder]))
            return items
        return listing("train"), [], listing("val")
    raise KeyError(stem)


def fewshot(data, k):
    if k < 1:
        return data
    tracker = defaultdict(list)
    for item in data:
        tracker[item[1]].append(item)
    out = []
    for label, items in tracker.items():
        out.extend(random.sample(items, k) if len(items) >= k else items)
    return out


def subsample(train, *rest, sub):
    if sub == "all":
        return [train, *rest]
    labels = sorted(set(item[1] for item in train))
    m = math.ceil(len(labels) / 2)
    selected = labels[:m] if sub == "base" else labels[m:]
    relabel = {y: i for i, y in enumerate(selected)}
    return [[(p, relabel[y], c) for p, y, c in lst if y in selected] for lst in (train, *rest)]


def classnames(train):
    mapping = {y: c for _, y, c in train}
    return [mapping[y].replace("_", " ") for y in sorted(mapping)]


def resolve(root, stem, k, seed, sub):
    train, val, test = read(root, stem)
    random.seed(seed)
    if k >= 1:
        train = fewshot(train, k)
        if stem != "imagenet":
            val = fewshot(val, min(k, 4))
    train, val, test = subsample(train, val, test, sub=sub)
    return {
        "classnames": classnames(train),
        "train": [[p, y] for p, y, _ in train],
        "val": [[p, y] for p, y, _ in val],
        "test": [[p, y] for p, y, _ in test],
    }
