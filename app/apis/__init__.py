"""The JSON APIs, each a blueprint in the shape its clients expect: Ollama's
(``ollama_api``, with the server's own ``/healthz`` and ``/openapi.json``), OpenAI's
(``openai_api``) and vLLM's tokenizer routes (``tokenizer_api``). Every answer is built
as a model of ``responses``, the same models ``openapi`` documents. They import
app.serving and app.platform, never app.pages; no blueprint imports another.
"""
