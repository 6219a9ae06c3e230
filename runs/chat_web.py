"""Serve a model over HTTP (web UI at /, OpenAI-compatible API at /v1): `python runs/chat_web.py [-i sft|rl|base] [-p 8000] ...`."""
from nanochat_nb.chat_web import main

main()
