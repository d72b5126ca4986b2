"""pipeline: pipeline-parallel training of MLPs on torch.distributed, from the chain rule up.

The package is a stack of floors; each imports only the floors below it (docs/architecture.md):

    commands     train, export, plan, simulate, schedule, report, memory, graph, hvp, gradcheck, equivalence
    training/    engine, the train(cfg) loop, checkpoint, resume, metrics, data, run directory
    runtime/     executor, transports, process groups, data parallelism, trace, lifecycle
    planning/    partition, costs, memory model, plan, planner, graph
    config       the typed, validated Hydra config
    schedules/   actions, placement, builders, registry, lowering, validator and simulator
    mlp/         layers, objective, model, stage, micro-batches
    errors       the user errors and how a command reports them
"""
