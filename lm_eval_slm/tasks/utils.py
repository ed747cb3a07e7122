"""The functions the task YAMLs reference as ``!function utils.<name>`` (lm-eval loads this file by path)."""

from lm_eval_slm.tasks.preprocess import (  # noqa: F401
    hellaswag_process_docs,
    winogrande_doc_to_choice,
    winogrande_doc_to_target,
    winogrande_doc_to_text,
)
from lm_eval_slm.tasks.sources import (  # noqa: F401
    load_arc_challenge,
    load_arc_easy,
    load_boolq,
    load_corpus,
    load_hellaswag,
    load_openbookqa,
    load_piqa,
    load_winogrande,
)
