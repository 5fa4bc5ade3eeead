"""sequence_logps forward + backward: fused backends versus eager PyTorch and torch.compile.

    python -m bench.logits_memory [--N 8 --T 1024 --V 32000 --dtype float32 --repeats 5]

Issue-sized view of bench.suite's sequence_logps cases (bench.cases): each variant in a fresh process,
median time over ``repeats`` runs after a warm-up (whose time, including torch.compile's compilation, is
reported apart), the peak memory increase above the resident logits (RSS high-water mark on the CPU,
max_memory_allocated on CUDA) and the result's deviation from eager's. A quarter of each row is prompt.
"""

from bench.variant_table import main

if __name__ == "__main__":
    main("sequence_logps", __doc__, N=8, T=1024, V=32000, repeats=5)
