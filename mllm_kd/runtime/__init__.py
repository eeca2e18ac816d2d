"""Where and how a process runs: device, precision, seeds (:mod:`.device`), torchrun (:mod:`.distributed`)."""
