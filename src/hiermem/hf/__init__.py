"""Hugging Face integration (loading checkpoints and wrapping their MLPs is the model layer's: model/hf/):
exporting a run's anchor with its memory (export.py), running an export with fetched memory
(memory_model.py: MemoryModel) and lm-eval-harness (lm_eval.py, imported on its own: it needs lm-eval)."""

from hiermem.hf.memory_model import MemoryModel

__all__ = ["MemoryModel"]
