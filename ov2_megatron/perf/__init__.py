"""Performance models and measurement: what a layout costs and how fast it runs.

    hardware      GPU datasheet numbers and the bandwidths the planner assumes
    memory_model  bytes per rank: weights, gradients, optimizer state, activations, buffers
    planner       rank TP/PP/DP/recompute/micro-batch layouts by predicted step time
    peak_memory   measuring peak memory soundly (CUDA allocator stats; CPU RSS high-water)
    comm_timing   time spent blocked in collectives (CPU/gloo) or exposed NCCL time (CUDA)
    benchmark     warm-up + timed steps of the real training step, one JSON/markdown row
    report        markdown rows, sweep files, merging a sweep's results into one table
    side_by_side  megatron vs the pure-PyTorch twin, OpenVision 1 vs 2, in one process

The analytic parts (hardware, memory_model, planner) import neither megatron nor the
training code, so `tools/plan.py` runs anywhere in a second.
"""
