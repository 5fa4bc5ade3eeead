"""linear_safedpo_loss versus eager and Liger-Kernel / Cut Cross-Entropy, forward + backward.

    python -m bench.linear_cpu [--N 8 --T 1024 --H 256 --V 32000 --dtype float32 --repeats 3]

Issue-sized view of bench.suite's linear_safedpo_loss cases (bench.cases): each variant in a fresh
process, median time after a warm-up, peak memory increase, and the loss's deviation from eager's.
"""

from bench.variant_table import main

if __name__ == "__main__":
    main("linear_safedpo_loss", __doc__, N=8, T=1024, H=256, V=32000, repeats=3)
