"""The attention modules' fast paths: SAN as the registered op ``san::san_mask`` (`san.kernels.san_op`), CBAM and
BAM as fused autograd functions (`san.kernels.fused`); in float32 on CPU they run C passes (`san.kernels.native`,
built from ``native.c``). An implementation detail of `san.attention`: each path equals its module's stepwise
formulation, `san.attention.functional`, to float rounding (tests/test_attention_fused.py, test_attention_ops.py)."""
