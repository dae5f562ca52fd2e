"""Training components: parallelisation, optimisation, checkpointing, evaluation, the loop."""
