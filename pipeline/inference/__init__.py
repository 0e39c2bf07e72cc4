"""Using a trained method: the prompt path (:mod:`.prompts`) and the SamPredictor-compatible :class:`Predictor`."""
from pipeline.inference.predictor import MaskChunk, Predictor, resolve_device
from pipeline.inference.prompts import Prompt, collate, group_by_signature

__all__ = ["MaskChunk", "Predictor", "Prompt", "collate", "group_by_signature", "resolve_device"]
