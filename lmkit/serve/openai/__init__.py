"""The OpenAI-compatible api_server (`lmkit serve api_server`)."""
