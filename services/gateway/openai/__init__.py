"""The gateway's OpenAI-compatible HTTP door (vLLM's layout): transport in api_router, request and
response models in protocol, the mapping onto the one MoA engine in serving."""
