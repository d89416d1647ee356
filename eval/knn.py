"""`flatdino eval knn`: weighted k-NN classification on pooled features (paper §4.1, Appendix I).

As DINO's eval_knn.py (Caron et al. 2021): each image becomes the mean over its patches (feature
stores) or tokens (latents stores) of view 0, L2-normalised; a validation image votes with its k
nearest training images by cosine similarity, each weighted exp(sim / T) (k = 20, T = 0.07);
top-1 and top-5 accuracy of the summed class votes. Stores are read chunk by chunk, so pooling an
ImageNet-sized feature store needs memory for the pooled vectors only.
"""

from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F

from ..pipeline.errors import FlatDinoError
from ..pipeline.feature_store import FeatureStore
from ..pipeline.latent_store import LatentStore
from ..pipeline.store import store_kind

STORES = {FeatureStore.KIND: FeatureStore, LatentStore.KIND: LatentStore}


def pooled(path: str, progress: bool = False) -> tuple[np.ndarray, np.ndarray]:
    """(vectors (n, C) float32 of the valid rows, their labels): view 0 averaged over positions."""
    kind = store_kind(path)
    if kind not in STORES:
        raise FlatDinoError(f"{path!r} is neither a feature nor a latents store (kind {kind!r})")
    store = STORES[kind](path)
    out = list(store.pooled_view0(desc=f"pool {path}" if progress else None))
    return np.concatenate(out), store.labels()[store.valid_mask()]


@torch.no_grad()
def knn_classify(
    train: np.ndarray,
    train_labels: np.ndarray,
    val: np.ndarray,
    val_labels: np.ndarray,
    k: int = 20,
    temperature: float = 0.07,
    chunk: int = 1024,
    device: str = "cpu",
) -> dict[str, float]:
    """Top-1 and top-5 accuracy of temperature-weighted k-NN votes (cosine similarity)."""
    if train.shape[1] != val.shape[1]:
        raise FlatDinoError(
            f"train vectors have {train.shape[1]} dims, val {val.shape[1]}: pair stores of one kind"
        )
    k = min(k, len(train))
    classes = int(max(train_labels.max(), val_labels.max())) + 1
    xt = F.normalize(torch.from_numpy(train).to(device), dim=1)  # (Nt, C)
    yt = torch.from_numpy(train_labels).to(device)
    top1 = top5 = 0
    for lo in range(0, len(val), chunk):
        xv = F.normalize(torch.from_numpy(val[lo : lo + chunk]).to(device), dim=1)  # (b, C)
        sim, idx = (xv @ xt.T).topk(k, dim=1)  # (b, k)
        votes = torch.zeros(len(xv), classes, device=device)
        votes.scatter_add_(1, yt[idx], (sim / temperature).exp())  # (b, classes)
        ranked = votes.topk(min(5, classes), dim=1).indices  # (b, 5)
        truth = torch.from_numpy(val_labels[lo : lo + chunk]).to(device)[:, None]
        top1 += (ranked[:, :1] == truth).sum().item()
        top5 += (ranked == truth).any(1).sum().item()
    return {
        "top1": top1 / len(val),
        "top5": top5 / len(val),
        "k": k,
        "temperature": temperature,
        "train": len(train),
        "val": len(val),
    }


def knn_eval(
    pairs: list[tuple[str, str]],
    k: int = 20,
    temperature: float = 0.07,
    device: str = "cpu",
    progress: bool = False,
) -> list[dict]:
    """One result per (train store, val store) pair, e.g. DINOv2 features and FlatDINO latents."""
    results = []
    for train_path, val_path in pairs:
        train, train_labels = pooled(train_path, progress)
        val, val_labels = pooled(val_path, progress)
        row = knn_classify(train, train_labels, val, val_labels, k, temperature, device=device)
        results.append(
            {
                "train": train_path,
                "val": val_path,
                "kind": store_kind(train_path),
                "dim": int(train.shape[1]),
                **{k_: v for k_, v in row.items() if k_ not in ("train", "val")},
                "n_train": row["train"],
                "n_val": row["val"],
            }
        )
    return results
