"""Label vocabularies shared by the generator, the loaders and the models."""

from __future__ import annotations

# FER2013's class order (emotion 0..6); the platform's canonical 7-class order.
EXPRESSIONS: tuple[str, ...] = ("angry", "disgust", "fear", "happy", "sad", "surprise", "neutral")

# Action units the generator renders and the AU network predicts.
AU_NAMES: tuple[str, ...] = (
    "AU1", "AU2", "AU4", "AU5", "AU6", "AU7", "AU9", "AU12", "AU15", "AU17", "AU20", "AU23", "AU25", "AU26",
)

# Micro-expression schemes.
CASME2_CLASSES: tuple[str, ...] = ("happiness", "disgust", "repression", "surprise", "others")
SMIC_CLASSES: tuple[str, ...] = ("positive", "negative", "surprise")

# DFEW's label ids 1..7 in file order (its CSVs are 1-based).
DFEW_CLASSES: tuple[str, ...] = ("happy", "sad", "neutral", "angry", "surprise", "disgust", "fear")
