"""More regularizers for regsearch, registered through the `regsearch.regularizers` entry point group."""

from regsearch.regularizers.early_stopping import EarlyStopping  # built into regsearch; still importable here
from regsearch_extras.cutmix import CutMix
from regsearch_extras.cutout import Cutout
from regsearch_extras.max_norm import MaxNorm
from regsearch_extras.noise import GaussianNoise
from regsearch_extras.swa import SWA
from regsearch_extras.targets import LabelSmoothing, Mixup

__all__ = ["CutMix", "Cutout", "EarlyStopping", "GaussianNoise", "LabelSmoothing", "MaxNorm", "Mixup", "SWA"]
