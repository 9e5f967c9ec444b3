"""The plugin author's side of regsearch.testing: every check, for every plugin of this package, in one line."""

import regsearch.testing
from regsearch_extras import SWA, CutMix, Cutout, EarlyStopping, GaussianNoise, LabelSmoothing, MaxNorm, Mixup

test_contract = regsearch.testing.contract_tests(LabelSmoothing, Mixup, Cutout, CutMix, MaxNorm, EarlyStopping, SWA,
                                                 GaussianNoise, (GaussianNoise, {"input_std": 0, "weight_std": 0.1}))
