"""Evaluation: feature networks, reference statistics (cached), FID / sFID / IS / precision-recall.

    metrics.py     the formulas, on feature arrays
    features.py    feature networks: the fmnist classifier, FID Inception-v3 (torch-fidelity)
    classifier.py  the Fashion-MNIST CNN and its training
    npz.py         reading and checking ADM-layout sample / reference files
    reference.py   reference sets and the statistics cache
    evaluate.py    scoring a sample file, and the real-vs-real floor
"""

from ctfgen.lazy import lazy_names

_HOMES = {  # loaded on first use (`ctfgen.lazy`): the classifier's configs need no torch
    **dict.fromkeys(["EvalOptions", "evaluate_floor", "evaluate_images", "evaluate_npz", "evaluate_pipeline"],
                    "ctfgen.evaluation.evaluate"),
    **dict.fromkeys(["FeatureNetwork", "Features", "extract_features", "load_feature_network"],
                    "ctfgen.evaluation.features"),
    **dict.fromkeys(["frechet_distance", "gaussian_stats", "inception_score", "precision_recall"],
                    "ctfgen.evaluation.metrics"),
}
__all__ = list(_HOMES)
__getattr__, __dir__ = lazy_names(globals(), _HOMES)
