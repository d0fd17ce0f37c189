"""Evaluation: feature networks, reference statistics (cached), FID / sFID / IS / precision-recall.

    metrics.py     the formulas, on feature arrays
    features.py    feature networks: the fmnist classifier, FID Inception-v3 (torch-fidelity)
    classifier.py  the Fashion-MNIST CNN and its training
    npz.py         reading and checking ADM-layout sample / reference files
    reference.py   reference sets and the statistics cache
    evaluate.py    scoring a sample file, and the real-vs-real floor
"""

from ctfgen.evaluation.evaluate import EvalOptions, evaluate_floor, evaluate_images, evaluate_npz, evaluate_pipeline
from ctfgen.evaluation.features import FeatureNetwork, Features, extract_features, load_feature_network
from ctfgen.evaluation.metrics import frechet_distance, gaussian_stats, inception_score, precision_recall

__all__ = ["EvalOptions", "Features", "FeatureNetwork", "evaluate_floor", "evaluate_images", "evaluate_npz",
           "evaluate_pipeline", "extract_features", "frechet_distance", "gaussian_stats", "inception_score",
           "load_feature_network", "precision_recall"]
