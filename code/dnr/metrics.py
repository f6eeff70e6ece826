"""Classification metrics from collected logits: accuracy, macro-F1, support-weighted F1, mAP
(one-vs-rest)."""
from __future__ import annotations

import warnings
from typing import Dict

import numpy as np
import torch
from torch import Tensor


def accuracy(logits: Tensor, labels: Tensor) -> float:
    return float((logits.argmax(1) == labels).float().mean())


def macro_f1(logits: Tensor, labels: Tensor) -> float:
    """Mean F1 over the classes that occur in the labels or the predictions (scikit-learn's macro)."""
    from sklearn.metrics import f1_score

    return float(f1_score(labels.cpu().numpy(), logits.argmax(1).cpu().numpy(), average="macro",
                          zero_division=0))


def weighted_f1(logits: Tensor, labels: Tensor) -> float:
    """F1 per class weighted by its support in the labels (scikit-learn's weighted): the F1 that
    MMSA reports beside Acc-2 on CMU-MOSI."""
    from sklearn.metrics import f1_score

    return float(f1_score(labels.cpu().numpy(), logits.argmax(1).cpu().numpy(), average="weighted",
                          zero_division=0))


def mean_average_precision(logits: Tensor, labels: Tensor, num_classes: int) -> float:
    """Mean over classes present in `labels` of the one-vs-rest average precision of softmax scores."""
    from sklearn.metrics import average_precision_score

    probs = torch.softmax(logits.float(), 1).cpu().numpy()
    y = labels.cpu().numpy()
    aps = []
    for c in range(num_classes):
        positives = y == c
        if positives.any():
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                aps.append(average_precision_score(positives, probs[:, c]))
    return float(np.mean(aps))


def classification_metrics(logits: Tensor, labels: Tensor, num_classes: int) -> Dict[str, float]:
    return {
        "acc": accuracy(logits, labels),
        "macro_f1": macro_f1(logits, labels),
        "f1_weighted": weighted_f1(logits, labels),
        "map": mean_average_precision(logits, labels, num_classes),
    }


def linear_probe_accuracy(train_x: Tensor, train_y: Tensor, test_x: Tensor, test_y: Tensor,
                          seed: int = 0) -> float:
    """Accuracy on test of a logistic-regression probe fitted on frozen train features.

    How much label information one encoder holds on its own, whatever the fusion head does."""
    from sklearn.linear_model import LogisticRegression
    from sklearn.preprocessing import StandardScaler

    scaler = StandardScaler().fit(train_x.cpu().double().numpy())
    clf = LogisticRegression(max_iter=2000, random_state=seed)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # convergence warnings: the probe is a measurement, not a model
        clf.fit(scaler.transform(train_x.cpu().double().numpy()), train_y.cpu().numpy())
    pred = clf.predict(scaler.transform(test_x.cpu().double().numpy()))
    return float((pred == test_y.cpu().numpy()).mean())
