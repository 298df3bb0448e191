"""Speed harnesses: decode-attention latency, windowed prefill, end-to-end throughput and their timers (``prhs-bench latency``, ``prefill``, ``throughput``)."""
