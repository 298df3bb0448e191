"""Logging namespace of prhs-compile.

``TORCH_LOGS="+prhs"`` (or ``options={"debug": True}``) turns on the backend's decision log
and before/after graph dumps. Torch resolves a ``TORCH_LOGS`` name to an importable module,
which is all this file is for; the code lives in ``prhs_compile``.
"""
