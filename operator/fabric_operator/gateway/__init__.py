"""The fabric gateway: one OpenAI-compatible endpoint, keys per tenant, routes to the
LLMBackends by model, fallback to other backends (remote providers included)."""
