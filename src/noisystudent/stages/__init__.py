"""The pipeline's stages, one module each. Every stage is one function of the same four parts:
skip if the manifest says it is done; read its inputs through the run directory's layout;
compute (engine, labeling, selection: tensors and small configs); write its outputs and mark
the manifest. Stages talk to each other only through the run directory.

Iteration i trains model i: i = 0 is the first teacher (labeled data only), i >= 1 a student
trained on labeled data plus the pseudo labels model i-1 made (iter<i-1>/select).
"""

from .evaluate import evaluate_stage
from .finetune import finetune_stage
from .pseudo_label import pseudo_label_stage
from .robustness import robustness_stage
from .select import select_stage
from .train import train_stage

__all__ = [
    "evaluate_stage",
    "finetune_stage",
    "pseudo_label_stage",
    "robustness_stage",
    "select_stage",
    "train_stage",
]
