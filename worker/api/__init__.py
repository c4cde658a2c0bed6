"""The control API and console: ``campaign-worker api``, an aiohttp server over the client.

One module per concern: ``schemas`` (request and response models, the source of the
OpenAPI document), ``problems`` (RFC 9457 errors), ``auth`` (tokens, console sessions,
CSRF), ``routes`` (the ``/v1`` operations), ``openapi`` (the document built from the
routes), ``console`` (the HTML pages under ``/ui/``) and ``server`` (middleware, metrics,
traces, the process).
"""
