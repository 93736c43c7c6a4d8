"""Model FLOPs per token and model FLOPs utilisation (MFU), for `perf/mfu`.

The count is that of a standard MLM step (forward and backward, weights' gradients
included) of a BERT/RoBERTa encoder, as in PaLM's definition of MFU: only the FLOPs the
model needs, matrix multiplications only (norms, activations and softmax are a few percent
at most). Per token, each weight matrix of the encoder costs 6 FLOPs per parameter; the
attention scores and their weighted sum 12 x layers x hidden x sequence length; the MLM head
(transform and decoder) runs only at masked positions, so it is scaled by the mask rate.
An ALUM step does more work than this (its ascent and adversarial passes), so its MFU
reads lower: that is its cost, shown as such.
"""

from __future__ import annotations

# Dense (no sparsity) peaks in TFLOP/s per precision, keyed by the exact name
# torch.cuda.get_device_name() reports: variants of one GPU differ (H100 PCIe 756 bf16, SXM 989),
# so a name is never matched by a part of it. From NVIDIA's data sheets, which print the tensor
# figures with sparsity (the dense ones are half, rounded down): H100 Tensor Core GPU (SXM, PCIe,
# NVL), H200 Tensor Core GPU (SXM, NVL), A100 Tensor Core GPU (SXM4 and PCIe, 40 and 80 GB), L40S,
# L40, L4, A10, and V100 Tensor Core GPU (fp16 is its tensor figure; it has no bf16, so none).
# fp32 is the CUDA-core figure, not TF32's: nothing here sets torch.backends.cuda.matmul.allow_tf32
# or torch.set_float32_matmul_precision, so fp32 matmuls run at torch's default "highest" (IEEE
# fp32). A10G is AWS's variant, with no NVIDIA data sheet: 70 dense bf16/fp16 is the figure quoted
# for it; no fp32 figure could be sourced, so none.
_DATA_SHEETS = (
    (("NVIDIA H100 80GB HBM3", "NVIDIA H200"), {"bf16": 989, "fp16": 989, "fp32": 67}),
    (("NVIDIA H100 NVL", "NVIDIA H200 NVL"), {"bf16": 835, "fp16": 835, "fp32": 60}),
    (("NVIDIA H100 PCIe",), {"bf16": 756, "fp16": 756, "fp32": 51}),
    (
        ("NVIDIA A100-SXM4-80GB", "NVIDIA A100-SXM4-40GB", "NVIDIA A100-PCIE-40GB", "NVIDIA A100 80GB PCIe"),
        {"bf16": 312, "fp16": 312, "fp32": 19.5},
    ),
    (("NVIDIA L40S",), {"bf16": 362, "fp16": 362, "fp32": 91.6}),
    (("NVIDIA L40",), {"bf16": 181, "fp16": 181, "fp32": 90.5}),
    (("NVIDIA L4",), {"bf16": 121, "fp16": 121, "fp32": 30.3}),
    (("NVIDIA A10",), {"bf16": 125, "fp16": 125, "fp32": 31.2}),
    (("NVIDIA A10G",), {"bf16": 70, "fp16": 70}),
    (("Tesla V100-SXM2-16GB", "Tesla V100-SXM2-32GB"), {"fp16": 125, "fp32": 15.7}),
    (("Tesla V100-PCIE-16GB", "Tesla V100-PCIE-32GB"), {"fp16": 112, "fp32": 14}),
)
PEAK_TFLOPS = {name: peaks for names, peaks in _DATA_SHEETS for name in names}


def flops_per_token(
    *, hidden: int, layers: int, intermediate: int, vocab: int, seq_len: int, mask_rate: float
) -> float:
    """Training FLOPs per input token of a standard MLM step."""
    per_layer = 4 * hidden * hidden + 2 * hidden * intermediate  # Q, K, V, output; the two FFN matrices
    encoder = 6 * layers * per_layer + 12 * layers * hidden * seq_len
    head = 6 * (hidden * hidden + hidden * vocab)  # the head's transform and decoder
    return encoder + mask_rate * head


def model_flops_per_token(hf_config, seq_len: int, mask_rate: float) -> float:
    return flops_per_token(
        hidden=hf_config.hidden_size,
        layers=hf_config.num_hidden_layers,
        intermediate=hf_config.intermediate_size,
        vocab=hf_config.vocab_size,
        seq_len=seq_len,
        mask_rate=mask_rate,
    )


def peak_flops(device_name: str, precision: str, configured_tflops: float) -> float | None:
    """One accelerator's peak in FLOP/s at the precision the run computes in (bf16, fp16 or
    fp32): the configured value, else the data sheet's for this exact GPU. None (no perf/mfu)
    for a GPU or precision the table lacks: no MFU is better than one against another part's peak."""
    if configured_tflops > 0:
        return configured_tflops * 1e12
    tflops = PEAK_TFLOPS.get(device_name, {}).get(precision)
    return tflops * 1e12 if tflops else None


def mfu(flops_per_tok: float, tokens_per_s: float, peak_per_device: float, devices: int) -> float:
    return flops_per_tok * tokens_per_s / (peak_per_device * devices)


class Throughput:
    """The perf/* keys of a logged step: tokens/s and seconds, and MFU where the accelerator's
    peak is known."""

    def __init__(self, hf_config, tokens_per_step: int, seq_len: int, peak_per_device: float | None, devices: int):
        self.hf_config, self.tokens_per_step, self.seq_len = hf_config, tokens_per_step, seq_len
        self.peak_per_device, self.devices = peak_per_device, devices

    def record(self, seconds: float, mask_rate: float) -> dict:
        tokens_per_s = self.tokens_per_step / max(seconds, 1e-9)
        record = {"perf/tokens_per_s": tokens_per_s, "perf/step_seconds": seconds}
        if self.peak_per_device:
            per_token = model_flops_per_token(self.hf_config, self.seq_len, mask_rate)
            record["perf/mfu"] = mfu(per_token, tokens_per_s, self.peak_per_device, self.devices)
        return record
