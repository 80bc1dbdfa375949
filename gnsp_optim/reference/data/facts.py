"""Facts about the 11 MTIL datasets, one record each: display name, class count, folder, where to get it.

Everything else in :mod:`.mtil` (the loaders, :func:`~.mtil.check_data`) reads these records; the old
per-fact dictionaries (``DISPLAY_NAMES``, ``NUM_CLASSES``, ``DATASET_FOLDERS``) are views of them.

Example:
    >>> DATASETS["dtd"].num_classes, DATASETS["dtd"].folder
    (47, 'dtd/dtd')
"""

from __future__ import annotations

from dataclasses import dataclass

__all__ = ["DATASETS", "DATASET_FOLDERS", "DISPLAY_NAMES", "DatasetFacts", "MTIL_DATASETS", "MTIL_ORDER_I",
           "MTIL_ORDER_II", "NUM_CLASSES", "SPLIT_SEED", "TRAIN_FRACTION", "display_name"]


@dataclass(frozen=True)
class DatasetFacts:
    """One MTIL dataset: ``key`` (as in the task orders), display name, class count (asserted on every load),
    folder under the data root, whether it has an official split, and how to obtain it (the hint of errors)."""

    key: str
    display_name: str
    num_classes: int
    folder: str
    official_split: bool
    hint: str


DATASETS: dict[str, DatasetFacts] = {f.key: f for f in (
    DatasetFacts('aircraft', 'Aircraft', 100, 'fgvc-aircraft-2013b', True,
                 'torchvision.datasets.FGVCAircraft(root, download=True), or extract fgvc-'
                 'aircraft-2013b.tar.gz from https://www.robots.ox.ac.uk/~vgg/data/fgvc-aircraft/ into root'),
    DatasetFacts('caltech101', 'Caltech101', 101, 'caltech101/101_ObjectCategories', False,
                 'torchvision.datasets.Caltech101(root, download=True), or extract '
                 '101_ObjectCategories.tar.gz (https://data.caltech.edu/records/mzrjq-6wc02) into '
                 'root/caltech101/'),
    DatasetFacts('cifar100', 'CIFAR100', 100, 'cifar-100-python', True,
                 'torchvision.datasets.CIFAR100(root, download=True), or extract cifar-100-python.tar.gz '
                 'from https://www.cs.toronto.edu/~kriz/cifar.html into root'),
    DatasetFacts('dtd', 'DTD', 47, 'dtd/dtd', True,
                 'torchvision.datasets.DTD(root, download=True), or extract dtd-r1.0.1.tar.gz '
                 '(https://www.robots.ox.ac.uk/~vgg/data/dtd/) into root/dtd/'),
    DatasetFacts('eurosat', 'EuroSAT', 10, 'eurosat/2750', False,
                 'torchvision.datasets.EuroSAT(root, download=True), or extract EuroSAT.zip (RGB jpgs, '
                 'folder 2750/) into root/eurosat/'),
    DatasetFacts('flowers', 'Flowers', 102, 'flowers-102', True,
                 'torchvision.datasets.Flowers102(root, download=True), or 102flowers.tgz + imagelabels.mat '
                 '+ setid.mat from https://www.robots.ox.ac.uk/~vgg/data/flowers/102/ into root/flowers-102/'),
    DatasetFacts('food', 'Food', 101, 'food-101', True,
                 'torchvision.datasets.Food101(root, download=True), or extract food-101.tar.gz '
                 '(https://data.vision.ee.ethz.ch/cvl/datasets_extra/food-101/) into root'),
    DatasetFacts('mnist', 'MNIST', 10, 'MNIST/raw', True,
                 'torchvision.datasets.MNIST(root, download=True) writes root/MNIST/raw/*-ubyte (raw or .gz)'),
    DatasetFacts('pets', 'OxfordPet', 37, 'oxford-iiit-pet', True,
                 'torchvision.datasets.OxfordIIITPet(root, download=True), or images.tar.gz + '
                 'annotations.tar.gz from https://www.robots.ox.ac.uk/~vgg/data/pets/ into root/oxford-iiit-'
                 'pet/'),
    DatasetFacts('cars', 'StanfordCars', 196, 'stanford_cars', True,
                 "torchvision.datasets.StanfordCars' download is broken (host gone): put a mirror's "
                 'cars_train/, cars_test/, devkit/ and cars_test_annos_withlabels.mat into '
                 'root/stanford_cars/'),
    DatasetFacts('sun397', 'SUN397', 397, 'SUN397', False,
                 'torchvision.datasets.SUN397(root, download=True), or extract SUN397.tar.gz '
                 '(https://vision.princeton.edu/projects/2010/SUN/) into root'),
)}

#: Dataset keys in MTIL Order I.
MTIL_ORDER_I: tuple[str, ...] = (
    "aircraft", "caltech101", "cifar100", "dtd", "eurosat", "flowers", "food", "mnist", "pets", "cars", "sun397",
)
#: MTIL Order II.
MTIL_ORDER_II: tuple[str, ...] = (
    "cars", "food", "mnist", "pets", "flowers", "sun397", "aircraft", "caltech101", "dtd", "eurosat", "cifar100",
)
MTIL_DATASETS = MTIL_ORDER_I

#: Views of :data:`DATASETS` (kept for callers of the earlier dictionaries).
DISPLAY_NAMES: dict[str, str] = {k: f.display_name for k, f in DATASETS.items()}
NUM_CLASSES: dict[str, int] = {k: f.num_classes for k, f in DATASETS.items()}
DATASET_FOLDERS: dict[str, str] = {k: f.folder for k, f in DATASETS.items()}

#: The 80/20 random split of the datasets without an official one (ZSCL convention).
SPLIT_SEED = 42
TRAIN_FRACTION = 0.8


def display_name(key: str) -> str:
    """The display name of a dataset key (the key itself when unknown, e.g. ``imagenet``).

    Example:
        >>> display_name("pets"), display_name("imagenet")
        ('OxfordPet', 'imagenet')
    """
    f = DATASETS.get(key)
    return f.display_name if f is not None else key
