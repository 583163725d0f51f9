// Measured thresholds that pick between code paths and bound workspace sizes. They are
// variables, not constants, only so that tests can shrink them and drive small problems down
// every path (fastconv.backend.tuning); the defaults are the measured values below.
// Compiled once (not per ISA).
#pragma once
#include <cstdint>

namespace fastconv {

struct Tuning {
  // Bytes of NHWC copies of NCHW images made at a time: tensors are converted in groups of
  // images under this, so the extra memory of a call does not grow with the batch.
  int64_t layout_budget_bytes = int64_t(16) << 20;
  // im2col: bytes of column matrix per GEMM call. Measured on ResNet-50's 3x3 layers at N=8
  // (GFLOP/s, when NCHW forward still built explicit columns): 256 KiB 155-226, 1 MiB
  // 241-306, 4 MiB 265-362, 16 MiB 259-361: below 4 MiB the per-call costs (barriers,
  // parallel regions, edge tiles) dominate; above it nothing is gained.
  int64_t im2col_column_budget_bytes = int64_t(4) << 20;
  // im2col: NCHW forward runs natively (no transposes: one GEMM per image, or pointwise one
  // over every image) when an image has at least this many output pixels; below, all images
  // form one NHWC GEMM (transposes in and out). Pointwise, batch 8, ms native vs NHWC (one
  // GEMM over all images, host in a slow phase): 1024>256 @14 4.48 vs 4.63, @7 2048>512
  // 4.35 vs 4.24, 512>2048 4.08 vs 4.17 (grad-input 4.22 vs 4.10, 4.64 vs 4.36); earlier,
  // GFLOP/s, with one GEMM per image: 1x1 512>2048 @7 (49 pixels) 263 vs 332; 3x3 256 @14
  // 280-363 vs 438-462, 3x3/2 128 @56 (784 pixels out) 265-353 vs 307-352, 3x3 64 @56
  // (3136) 313-371 vs 335. For spatial kernels the explicit tap-major columns feed the GEMM
  // faster than implicit packing unless the map is large enough that the transposes
  // dominate.
  int64_t im2col_native_min_pixels_pointwise = 128;
  int64_t im2col_native_min_pixels_spatial = 2048;
  // ... and a pointwise forward whose batch has this many output pixels (one GEMM over every
  // image): batch 8 @7 (392 pixels), ms native vs NHWC, 512>2048 4.53 vs 5.03, 2048>512
  // 4.82 vs 5.05, 1024>2048 8.44 vs 8.49 (grad-input not: 5.66 vs 5.43, 4.72 vs 4.50);
  // batch 1 @7 NHWC wins (0.62 vs 0.68, 0.66 vs 0.78).
  int64_t im2col_native_min_batch_pixels_pointwise_forward = 384;
  // Strided 1x1 (ResNet's downsample layers) packs its subsampled input straight from NCHW
  // at 784 output pixels (batch 8, ms, native vs NHWC: 256>512 @56 10.3 vs 12.6, torch
  // 11.7), but not at 196 (512>1024 @28: 10.4 vs 9.4) or 49.
  int64_t im2col_native_min_pixels_strided_1x1 = 512;
  // im2col NCHW grad-input of a strided spatial kernel runs natively (GEMM into (c, r, s)
  // columns, then col2im) from this many output pixels per image; smaller maps go through
  // NHWC.
  int64_t im2col_col2im_grad_input_min_pixels = 196;
  // im2col pointwise NCHW grad-weight: the threads split dW (inside one GEMM) rather than
  // the pixels (partial dW copies added at the end) when dW has more than this many
  // elements per pixel of the batch. Measured: see im2col_conv.cpp.
  int64_t pointwise_grad_weight_dw_per_pixel = 256;
  // im2col spatial grad-weight builds channel-major columns (dW written in place in OIHW
  // order, no tap-major copy to permute) when an image group has at most this many output
  // pixels per filter of a group. Measured: see pack_channel_major_cols.
  int64_t im2col_channel_major_grad_weight_max_pixels_per_filter = 1;
  // direct forward (and grad-input): a thread's (tile, channel block) units run the
  // channel blocks of one pixel tile back to back (the tile's input read once, from L1) when
  // all the packed weights fit in this many bytes of L2; otherwise the tiles of one block
  // (that block's weights read from L2 by every tile, the input once per block).
  int64_t direct_blocks_fastest_max_weight_bytes = int64_t(1) << 20;
  // direct grad-weight: output pixels per chunk that every dW tile sweeps (x and grad_y of a
  // chunk stay in L2).
  int64_t direct_grad_weight_chunk_pixels = 512;
  // direct grad-weight: where the units' sums take at most this many bytes, each thread
  // sums every unit over its share of the pixels into its own copy (grad_weight_bias).
  // Batch 8, ms, units split / pixel split, same process: stem 14.1 / 11.4, VGG-16 stem
  // 20.5 / 14.4, 3x3 64 @56 (152 KiB of sums) 13.1 / 11.2, 3x3/2 128 @56 (608 KiB) 17.5 /
  // 14.4, 3x3 128 @28 (608 KiB) 9.6 / 9.6, 3x3 256 @14 (2.4 MiB) 9.7 / 10.0, 3x3/2 512 @14
  // (9.5 MiB) 14.7 / 19.0.
  int64_t direct_grad_weight_pixel_split_max_bytes = int64_t(1) << 20;
  // GEMM (gemm.cpp, gemm_own_panels): products of one A block (at most MC rows or MC x KC
  // values, and at most this many rows) pack B a micro-panel at a time per thread, each
  // used at once, instead of a whole B block before a barrier. A setting for tests (1: that
  // path only for 1-row products); every product of one A block gains. NCHW forward, batch
  // 8, 2 threads, ms, own panels / shared B blocks, 5 interleaved rounds: 1x1 64>64 @56 1.39
  // / 1.52 (and 1.53 / 1.98 in another run), 1x1 256>64 @56 5.84 / 6.42, 1x1 512>128 @28
  // 5.03 / 6.20; with up to MC x KC values (rows capped at 240 / not): 1x1 64>256 @56 5.25 /
  // 6.99, 128>512 @28 4.64 / 5.18, 256>1024 @14 4.75 / 4.86. The stem (7x7/2, implicit
  // im2col) 12.9 / 12.7, within its noise.
  int64_t gemm_own_panels_max_rows = int64_t(1) << 30;
  // Winograd: tiles per block (the GEMMs' N) and output channels per block (their M). A
  // thread transforms one block of tiles for all input channels, then runs the (m+2)^2
  // GEMMs of each channel block on it. Sweep: see csrc/winograd/winograd_conv.cpp.
  int64_t winograd_tile_block = 64;
  int64_t winograd_channel_block = 96;
  // Winograd grad-weight: tiles per block (the GEMMs' K) and the channel block (output x
  // input channels, rounded to the GEMM tile) of the transform-domain sums one work item
  // owns. Swept on ResNet-50's 3x3 layers at batch 8 (64 @56, 128 @28, 256 @14 F4, 512 @7
  // F2; ms), tiles/channels: 64/32 6.7 5.7 8.2 11.8, 64/64 5.3 4.6 6.3 9.2, 64/128 5.3 4.4
  // 6.2 7.9, 128/64 5.6 5.0 6.7 9.8, 128/128 5.6 5.0 6.2 8.3, 256/128 5.8 4.9 6.7 9.0;
  // 32 tiles or 192-256 channels no better. Bigger channel blocks transform each tile fewer
  // times; 64 tiles keep one item's panels in L2.
  int64_t winograd_grad_weight_tile_block = 64;
  int64_t winograd_grad_weight_channel_block = 128;
  // Depthwise channels_last forward: outputs over this many bytes are written with
  // non-temporal stores. Measured: see stream_rows in depthwise_conv.cpp.
  int64_t depthwise_stream_min_bytes = int64_t(3) << 20;
  // Depthwise channels_last strided grad-input (grad_input_nhwc_phases): gx over this many
  // bytes is written with non-temporal stores. 3x3/2, 2 threads, 9 interleaved rounds, ms,
  // streamed / stored: 144 @56 batch 4 (6.9 MiB) 0.17 / 0.13, batch 8 (13.8 MiB) 0.53 / 0.85,
  // batch 16 1.47 / 2.40; 192 @28 batch 16 (9.2 MiB) 0.24 / 0.21.
  int64_t depthwise_grad_input_stream_min_bytes = int64_t(12) << 20;
};

// The process-wide values; set only between calls (fastconv.backend.tuning).
Tuning& tuning();

}  // namespace fastconv
