"""Serving: the OpenAI-compatible api_server, the proxy in front of many of them, and a gradio chat page."""
