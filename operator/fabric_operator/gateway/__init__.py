"""The fabric gateway: one OpenAI-compatible endpoint, a key per team that reaches its own
namespace's LLMBackends (admin keys: the namespaces they list), routes by model, fallback to
other backends of the namespace (remote providers on the admin's allow-list included)."""
