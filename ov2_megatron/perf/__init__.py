"""Performance models and measurement: what a layout costs and how fast it runs.

    hardware      GPU datasheet numbers and the per-generation calibrated constants
    kernel_time   seconds of one layer: size-dependent GEMMs, attention, elementwise traffic
    collectives   NCCL alpha-beta costs (ring / tree all-reduce, all-gather, reduce-scatter)
    transformer_plan  one given layout of a plain ViT / CLIP / GPT: step time, throughput, MFU
    published_runs    runs by others the planner is checked against (docs/benchmarks)
    memory_model  bytes per rank: weights, gradients, optimizer state, activations, buffers
    planner       rank TP/PP/DP/recompute/micro-batch layouts by predicted step time
    peak_memory   measuring peak memory soundly (CUDA allocator stats; CPU RSS high-water)
    comm_timing   time spent blocked in collectives (CPU/gloo) or exposed NCCL time (CUDA)
    benchmark     warm-up + timed steps of the real training step, one JSON/markdown row
    report        markdown rows, sweep files, merging a sweep's results into one table
    side_by_side  megatron vs the pure-PyTorch twin, OpenVision 1 vs 2, in one process

The analytic parts (hardware, kernel_time, collectives, memory_model, planners) import neither megatron nor the
training code, so `tools/plan.py` runs anywhere in a second.
"""
