"""What every request passes through, whatever answers it: the settings (``FABLE_*``), the
security wiring (headers, CSRF, API keys and CORS, the rate limit), the metrics and
``/metrics``, and the HTTP helpers every blueprint shares (error shapes, streamed
responses, the admin check). It imports no other wing.
"""
