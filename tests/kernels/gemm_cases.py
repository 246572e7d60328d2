"""Group layouts shared by the grouped-GEMM tests."""

# (rows per expert, K, P): random loads, empty experts, one expert taking every row,
# zero rows, a single row, odd sizes.
CASES = {
    "random": ([7, 0, 12, 3, 9], 16, 24),
    "empty_experts": ([0, 0, 5, 0, 0, 0, 1, 0], 8, 16),
    "one_expert_takes_all": ([0, 0, 23, 0], 12, 8),
    "zero_rows": ([0, 0, 0], 8, 8),
    "single_row": ([0, 1], 4, 4),
    "odd_sizes": ([5, 0, 3], 13, 7),
    "many_tiles": ([70, 1, 0, 130], 40, 72),
    # Past every tile and block size of the avx512 kernels, odd in every dim.
    "large_odd": ([201, 3, 0, 77, 33], 131, 301),
    # Over 256 rows per expert on average: the forward packs the weight instead of the rows
    # (cpu_gemm.cpp, gmm_x_wt: from 128) and the input gradient a panel of its columns at a
    # time (gmm_x_w: from 128 or 256), also across NC-column and MR-row tiles; the weight
    # gradient packs a group over 512 rows in parts (gmm_at_b).
    "many_rows_per_expert": ([701, 0, 411], 131, 150),
    # Under 128 rows per expert on average, where the forward reads each weight in place but
    # packs it for the experts whose own rows make that cheaper (cpu_gemm.cpp,
    # pack_costs_less: 3, 70, 34 and 50 rows here; 28 and 12 in place), in two passes over
    # one output.
    "mixed_paths": ([3, 70, 34, 0, 50, 28, 12], 24, 40),
    # A reduction over several of the input gradient's weight blocks (cpu_gemm.cpp,
    # gmm_x_w_streamed_into: 256 rows of a bfloat16 weight or 128 of float32 read in place,
    # 126 of a float32 weight packed), odd at the end.
    "long_reduction": ([40, 0, 17, 65], 601, 520),
}

# Outputs past 2 MB in bfloat16 (and float32), which the avx512 kernels write with streaming
# stores where a tile row covers whole lines (cpu_gemm.cpp, STREAM_BYTES): rows of 1030 and
# 1000 columns, so that some rows start on a line and some do not, and a last panel is
# partial. Many rows per expert (the packed forward, the input gradient by column panels)
# and few (the streamed input gradient, the forward packed per expert over 64 rows).
WIDE_CASES = {
    "wide_many_rows": ([600, 0, 500], 1000, 1030),
    "wide_few_rows": ([90, 0, 100, 120, 95, 110, 100, 85, 105, 98, 0, 97], 1000, 1100),
}
