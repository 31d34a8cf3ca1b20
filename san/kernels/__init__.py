"""The attention modules' fast paths as registered torch ops: SAN's ``san::san_mask`` (`san.kernels.san_op`), CBAM's
``san::cbam`` (`cbam_op`), BAM's ``san::bam`` (`bam_op`), each with its backward op, fake kernel and autocast
kernel; the modules call them through `san.kernels.node`. In float32 on CPU they run C passes (`san.kernels.native`,
built from ``native.c``). An implementation detail of `san.attention`: each op equals its module's stepwise
formulation, `san.attention.functional`, to float rounding (tests/test_attention_fused.py, test_attention_ops.py)."""
