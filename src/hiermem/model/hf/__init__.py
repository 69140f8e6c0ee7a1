"""transformers causal LMs in the model layer: loading a local checkpoint (load.py), fetched memory in its MLPs
(mlp.py), hiermem's own architecture (modeling_hiermem.py) and the adapter that lets the trainer, evaluation and
generation run such a model as they run the native anchor (causal_lm.py). Importing this package imports
transformers, so model/build.py imports it only for runs that name a checkpoint (model.hf)."""
