"""The parts of `bench/gpu_check.py`: one GPU check of everything that matters, in one short run.

    runner        budget, watchdog, results, the JSON and markdown report
    environment   what machine and software ran the check
    pipelines     real-size checkpoints, our pipeline vs diffusers' (parity, ms per image)
    memory        peak memory per component, the manager's OOM retry and budget offload
    engine        the service engine's throughput by batch size, batched vs alone
    weight_pool   Ray mode's weight pool with a fractional-GPU replica (idle offload)

Every check runs the same code on CUDA (the full check) and on a CPU at tiny size (`--smoke`,
which `make test` runs), so the GPU paths are exercised everywhere and cannot rot unseen.

Not handled here: deciding which checks run in which order (`bench/gpu_check.py`).
"""
