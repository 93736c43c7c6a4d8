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

# Dense bf16 tensor-core peaks in TFLOP/s per accelerator, from the vendors' data sheets,
# matched against torch.cuda.get_device_name() (first match wins, so longer names first).
PEAK_TFLOPS = (
    ("H200", 989.0),
    ("H100", 989.0),
    ("A100", 312.0),
    ("L40S", 362.0),
    ("A10G", 70.0),
    ("A10", 125.0),
    ("L4", 121.0),
    ("V100", 125.0),  # fp16: V100 has no bf16
)


def flops_per_token(hidden: int, layers: int, intermediate: int, vocab: int, seq_len: int, mask_rate: float) -> float:
    """Training FLOPs per input token of a standard MLM step."""
    per_layer = 4 * hidden * hidden + 2 * hidden * intermediate  # Q, K, V, output; the two FFN matrices
    encoder = 6 * layers * per_layer + 12 * layers * hidden * seq_len
    head = 6 * (hidden * hidden + hidden * vocab)  # the head's transform and decoder
    return encoder + mask_rate * head


def model_flops_per_token(hf_config, seq_len: int, mask_rate: float) -> float:
    return flops_per_token(hf_config.hidden_size, hf_config.num_hidden_layers, hf_config.intermediate_size,
                           hf_config.vocab_size, seq_len, mask_rate)


def peak_flops(device_name: str, configured_tflops: float) -> float | None:
    """The accelerator's peak in FLOP/s: the configured value, else a known GPU's, else None."""
    if configured_tflops > 0:
        return configured_tflops * 1e12
    for name, tflops in PEAK_TFLOPS:
        if name in device_name:
            return tflops * 1e12
    return None


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
