"""What optimum-slm shows people: the model card (``card``), ``slm inspect`` (``inspect``), analysis plots
(``plots``)."""
