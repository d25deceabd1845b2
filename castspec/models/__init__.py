"""Model loading, formats, kernels, KV cache and the runner (the runtime under the decode loop)."""

# The target's formats (`--target-dtype`); kept here, free of torch, so the CLI can list them without loading it.
TARGET_DTYPES = ("auto", "fp32", "int8", "q4k")
# The draft's formats (`--draft-quant`): the draft only proposes, so any of them keeps the output exact.
DRAFT_QUANTS = ("auto", "int8", "q4k", "none")
