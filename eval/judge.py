"""The demo's independent digit judge: does a generated digit show the class it was asked for?

A classifier that never sees anything the pipeline produced: scikit-learn's logistic regression on
the real digits' 8×8 pixels (train split); images are greyed and box-averaged to that 8×8 grid.
"""

from __future__ import annotations

import numpy as np

from ..pipeline.sources import digits_split


def _to_8x8(images: np.ndarray) -> np.ndarray:
    """uint8 (N, H, W, 3) -> (N, 64) in [0, 1]: grey, box-averaged to the digits' 8×8 grid."""
    from PIL import Image

    small = [
        np.asarray(Image.fromarray(im).convert("L").resize((8, 8), Image.BOX)) for im in images
    ]
    return np.stack(small).reshape(len(images), 64).astype(np.float64) / 255.0


def digit_judge():
    """Logistic regression on the real train-split digits (8×8, scaled to [0, 1]), and its accuracy
    on the real val split: the judge knows digits, not anything the pipeline made."""
    from sklearn.linear_model import LogisticRegression

    (x_train, y_train), (x_val, y_val) = digits_split("train"), digits_split("val")
    clf = LogisticRegression(max_iter=5000).fit(x_train / 16.0, y_train)
    return clf, float((clf.predict(x_val / 16.0) == y_val).mean())


def judge(clf, images: np.ndarray, labels: np.ndarray) -> dict:
    """Class accuracy of uint8 images against the labels they were generated for."""
    pred = clf.predict(_to_8x8(images))
    classes = np.unique(labels)
    per_class = {str(c): float((pred[labels == c] == c).mean()) for c in classes}
    return {
        "accuracy": float((pred == labels).mean()),
        "n": int(len(labels)),
        "per_class": per_class,
    }
