"""Evaluation: image metrics with stated protocols, pluggable FID/KID/IS feature extractors, the Shapes probe,
and the JSON protocol record. Nothing here imports Lightning; a script and a validation loop share it."""
from ldm.eval.features import (EXTRACTORS, InceptionFeatures, LogitsView, ProbeFeatures, build_feature_extractor,
                               inception_weights_path)
from ldm.eval.metrics import (METRIC_DEFINITIONS, GenerativeMetrics, ReconstructionMetrics, lpips_distance, psnr,
                              rgb_to_y, ssim, to_unit)
from ldm.eval.probe import (ACCURACY_BAR, CachedProbe, ProbeAccuracyError, ProbeSettings, ShapesProbe, box_iou,
                            centre_in_box, check_probe_accuracy, evaluate_probe, load_or_train_probe,
                            probe_cache_dir)
from ldm.eval.protocol import EvalProtocol, machine_description

__all__ = ["EXTRACTORS", "InceptionFeatures", "LogitsView", "ProbeFeatures", "build_feature_extractor",
           "inception_weights_path", "METRIC_DEFINITIONS", "GenerativeMetrics", "ReconstructionMetrics",
           "lpips_distance", "psnr", "rgb_to_y", "ssim", "to_unit", "ACCURACY_BAR", "CachedProbe",
           "ProbeAccuracyError", "ProbeSettings", "ShapesProbe", "box_iou", "centre_in_box",
           "check_probe_accuracy", "evaluate_probe", "load_or_train_probe", "probe_cache_dir", "EvalProtocol",
           "machine_description"]
