"""Training: the stage runner (:mod:`.stage`), the loop (:mod:`.trainer`), the objective on the chosen loss path
(:mod:`.objective`), the optimizer and schedule (:mod:`.optim`)."""
