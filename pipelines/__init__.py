"""Diffusers-compatible pipelines, packaged as ``latentdiff.pipelines``."""

from .text_to_image import LatentDiffusionPipeline

__all__ = ["LatentDiffusionPipeline"]
