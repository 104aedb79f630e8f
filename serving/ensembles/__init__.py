"""Pre/post-processing ensembles: ``<network>_preprocess`` → ``<network>`` → ``<network>_postprocess``.

:mod:`serving.ensembles.processing` holds the logic as plain numpy functions (importable anywhere);
:mod:`serving.ensembles.triton_models` wraps them as Triton Python-backend models (imported only
inside Triton's stub process).
"""
