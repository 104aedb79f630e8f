"""SynthFACS: a deterministic procedural face generator with exact ground truth.

No face data set can be downloaded at run time, so every network of the platform (static FER,
landmarks + valence/arousal, micro-expressions, dynamic FER, action units) trains and is tested on
faces drawn here: a 68-point iBUG landmark model deformed by subject identity and FACS action units,
posed in 3-D and painted with OpenCV, under nuisances scaled by ``difficulty``::

    gen = SynthFACS(seed=0, image_size=64, difficulty=0.0)
    s = gen.expression_set(700)                  # ExpressionSet: images, labels, aus, VA, landmarks
    c = gen.micro_clips(50, scheme="casme2")     # ClipSet with onset/apex/offset
    c = gen.dynamic_clips(50)                    # ClipSet, 7 expressions, pose/light drift
    a = gen.au_sets(500, 500, 1000, 0.2)         # AUSets: clean / noisy / unlabelled
    p = gen.magnified_pairs(100)                 # MagnifiedPairs: onset, apex, exact magnified apex

Modules: :mod:`.face_model` (template, AUs, identity, pose), :mod:`.render` (painter, nuisances),
:mod:`.generator` (data sets); PNG previews: :mod:`fer_core.data.preview`.
"""

from fer_core.data.preview import save_contact_sheet
from fer_core.data.synthfacs.face_model import (
    AU_DISPLACEMENTS,
    EXPRESSION_PROTOTYPES,
    EXPRESSION_VA,
    MAX_INTENSITY,
    MIRROR_68,
    TEMPLATE_68,
    Identity,
    au_vector,
    sample_identity,
)
from fer_core.data.synthfacs.generator import (
    AU_ACTIVE_THRESHOLD,
    MICRO_PATTERNS,
    AUSets,
    AUSubset,
    ClipSet,
    ExpressionSet,
    MagnifiedPairs,
    SynthFACS,
    time_course,
)
from fer_core.data.synthfacs.render import Nuisance, Occluder, render_batch

__all__ = [
    "AU_ACTIVE_THRESHOLD", "AU_DISPLACEMENTS", "EXPRESSION_PROTOTYPES", "EXPRESSION_VA", "MAX_INTENSITY",
    "MICRO_PATTERNS", "MIRROR_68", "TEMPLATE_68", "AUSets", "AUSubset", "ClipSet", "ExpressionSet", "Identity",
    "MagnifiedPairs", "Nuisance", "Occluder", "SynthFACS", "au_vector", "render_batch", "sample_identity",
    "save_contact_sheet", "time_course",
]
