"""OpenAI's API in front of the client library: `app` is the ASGI app and
its server (`encrypted-vllm-gateway`), `openai_chat` translates chat and
text completions, and `in_process` gives `openai` clients that call the
same app inside the caller's process. Needs the `gateway` extra."""
