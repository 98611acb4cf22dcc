"""The measures of forgetting: the competition's epsilon score, membership inference, agreement, relearning."""
import numpy as np


def mean_std(values: np.ndarray) -> dict:
    """Mean and sample standard deviation over models (0 for one model)."""
    return {"mean": float(np.mean(values)), "std": float(np.std(values, ddof=1)) if len(values) > 1 else 0.0}
