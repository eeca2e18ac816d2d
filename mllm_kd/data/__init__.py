"""Training data: records (one validator), encoding (templates, images), data sets and batching."""
