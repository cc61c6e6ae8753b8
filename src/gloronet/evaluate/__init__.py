"""Studies of a trained GloRo net, after the papers that followed GloRo (one module each):

- :mod:`.attack`     — empirical check of the certificates (PGD + APGD ensemble at ε and at each
  certified radius); a broken certificate is a soundness bug.
- :mod:`.degrade`    — degradation (denial-of-service) attacks on certification (Mangal et al.).
- :mod:`.privacy`    — membership inference with loss, confidence and certified-radius scores.
- :mod:`.overfit`    — robust overfitting curves and attributions vs a non-robust twin.
- :mod:`.tightness`  — empirical lower bounds of the Lipschitz constants vs the sound bounds.

Shared pieces: :mod:`.common` (the run directory, data, report files), :mod:`.pgd` (L2-ball
attacks), :mod:`.attributions` (integrated gradients), :mod:`.plots` (every figure).
This package imports the library; the library never imports it (the CLI does, lazily).
"""
