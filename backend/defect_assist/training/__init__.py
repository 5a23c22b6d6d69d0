"""Training: the one train-and-publish path that the CLI, the retrain worker and the FiftyOne plugin call."""
