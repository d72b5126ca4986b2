"""Training: the data and the model spec, the engine that steps this process's ranks, the train(cfg) loop,
checkpoints and resume, metrics, the run directory, and what the simulator predicts of a configured run.

The top library floor: it may import every layer below (runtime, planning, schedules, mlp, config, errors).
"""
