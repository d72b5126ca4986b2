"""Planning a run before it starts: the partition into stages, what each action costs, the one per-rank memory
model, the run's layout (Plan: placement and validated schedules) and the planner that picks one.

It may import mlp, schedules, config and errors; nothing here starts a process group.
"""
