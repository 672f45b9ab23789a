"""Counterfactual ImageNet generation, one import for the pieces kept in separate modules:

- imagenet_labels: class names (package data) and the class triple drawn per sample;
- imagenet_weights: checkpoint paths and files, the generation model;
- imagenet_factory: the sampler's settings (a frozen dataclass, rebuilt from a manifest);
- imagenet_sampler: the sampler (forward groups, uint8 mappings, encoding);
- imagenet_interp: class interpolation and its output folder.
"""
from cgn_dist.generate.imagenet_factory import (DEVICES, IMAGE_FORMATS, RANDOM_SOURCES,
                                                ImagenetCounterfactualFactory)
from cgn_dist.generate.imagenet_interp import (MECHANISMS, interpolate, interpolation_sheet, load_noise,
                                               write_interpolation)
from cgn_dist.generate.imagenet_labels import (CLASS_STREAM, IMAGENET_CLASSES, MODES, check_classes, class_name,
                                               draw_classes, imagenet_classes)
from cgn_dist.data.pixels import NORMALIZE, mask_to_uint8, to_uint8
from cgn_dist.generate.imagenet_sampler import SAMPLER_NAME, ImagenetCounterfactualSampler
from cgn_dist.generate.imagenet_weights import (CHECKPOINT_HELP, DEEPSPEED_MODEL_FILE, MECHANISMS_FILE,
                                                CGNCheckpointError, biggan_num_classes, build_generation_model,
                                                checkpoint_kind, read_cgn_weights, resolve_cgn_checkpoint,
                                                sha256_of)

__all__ = ["ImagenetCounterfactualFactory", "ImagenetCounterfactualSampler", "CGNCheckpointError",
           "build_generation_model", "resolve_cgn_checkpoint", "read_cgn_weights", "checkpoint_kind",
           "check_classes", "draw_classes", "class_name", "imagenet_classes", "to_uint8", "mask_to_uint8",
           "interpolation_sheet", "write_interpolation", "load_noise", "biggan_num_classes", "interpolate",
           "sha256_of", "CHECKPOINT_HELP", "DEEPSPEED_MODEL_FILE", "MECHANISMS_FILE", "CLASS_STREAM",
           "IMAGENET_CLASSES", "MODES", "MECHANISMS", "NORMALIZE", "SAMPLER_NAME", "DEVICES", "IMAGE_FORMATS",
           "RANDOM_SOURCES"]
