"""The easy-VQA job: the demo (teacher -> students -> report, :mod:`.demo`), its report (:mod:`.report`) and
the ablation (:mod:`.ablate`)."""
