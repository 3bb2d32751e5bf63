"""``criteriapo serve``: an OpenAI-compatible HTTP server on one model, requests batched together."""
