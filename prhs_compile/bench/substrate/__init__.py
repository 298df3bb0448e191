"""The evaluation substrate: its byte-level tokenizer, the synthetic and plain-English tasks, and the training of the small long-context model (``prhs-bench train-substrate``)."""
