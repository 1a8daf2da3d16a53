"""The JSON APIs, each a blueprint in the shape its clients expect: Ollama's
(``ollama_api``, with the server's own ``/healthz`` and ``/openapi.json``), OpenAI's
(``openai_api``), vLLM's tokenizer routes (``tokenizer_api``), and the OpenAPI document
that describes them all (``openapi``). They import app.serving and app.platform, never
app.pages nor each other (openapi only describes the others).
"""
