"""Calibration defaults and choices, in a module without torch so the command line can show them in ``--help``."""

#: how search-set sequences are drawn (see ``calibration.sample_token_crops``)
SAMPLINGS = ("auto", "crop", "pack")
#: the default fit set: 256 x 256 = 65,536 tokens (a d x d map over-fits on the 1,280 tokens of the search set)
FIT_SAMPLES = 256
FIT_SEQ_LEN = 256
