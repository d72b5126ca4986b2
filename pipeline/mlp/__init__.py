"""The chapter's math: layers with their three operations (forward, gradient w.r.t. the input, w.r.t. the weights),
the objective J = L + s, the model's shape, a stage of consecutive layers, and micro-batches.

The ground floor: it imports torch, numpy and pipeline.errors only, and knows nothing of ranks or schedules.
"""
