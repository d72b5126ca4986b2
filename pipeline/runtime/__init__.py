"""Running one rank's actions: the executor, the transports behind one interface (torch.distributed point-to-point,
in-process mailboxes), process groups and collectives, the data-parallel gradient sum, traces, signals and exits.

It may import planning, schedules, mlp, config and errors; it never decides an order (the schedule does).
"""
