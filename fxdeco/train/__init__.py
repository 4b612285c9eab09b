"""Training loops: knowledge-distillation fine-tuning of a decomposed model and the loop pieces lockd shares
(``finetune.py``: ``fxdeco.finetune``, ``TrainingBatches``, progress and AMP helpers)."""
